"""Meta-World 3.1.1 behind the ``damvla.envs.base.Env`` interface.

- Task suites: ``mt10``, ``mt50``, ``grip`` (tasks whose scripted expert opens or closes the gripper) or
  comma-separated task names (``resolve_suite``).
- A hand-written instruction per task (``INSTRUCTIONS``).
- Native action: 4-D ``(dx, dy, dz, effort)``; xyz in [-1, 1] moves the end-effector target by up to
  1 cm per step (``action_scale`` 0.01 m), effort in [-1, 1] is the finger position servo target,
  +1 closes. Our 7-D layout keeps xyz as is, rotation 0, gripper binarised 1 = open / 0 = closed.
  Closing maps back to the *expert's own* closing effort per task (``GRIPPER_CLOSED_EFFORT``), because a
  full +1 squeeze breaks several experts (assembly, basketball, pick-out-of-hole go from 10/10 to 0/10).
- Images: rendered with our own ``mujoco.Renderer`` (no shadows, reflections or multisampling: ~7 ms per
  128x128 frame on one CPU core instead of ~65 ms) and turned upright. Meta-World's corner cameras have
  their "up" axis pointing at the floor, so the raw image is upside down *and* mirrored left-right; a
  180-degree rotation (both axes flipped) gives the un-mirrored upright view.
- Initial states: Meta-World draws a "random vector" (object + goal positions) at reset; we draw it from
  a seed with the env's own sampler and record it (``InitialState.data["rand_vec"]``), then replay it
  frozen. Training collection uses seeds ``[0, EVAL_SEED_OFFSET)``, evaluation seeds
  ``EVAL_SEED_OFFSET + i`` (``initial_state_seeds``), so the pools never overlap.
"""

from __future__ import annotations

import os

# EGL renders headless on CPU through Mesa; must be chosen before mujoco is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")

import atexit  # noqa: E402
import warnings  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from damvla.envs.base import (  # noqa: E402
    GRIPPER_INDEX,
    GRIPPER_OPEN,
    GRIPPER_THRESHOLD,
    ActionMapping,
    Env,
    InitialState,
    Observation,
)

SIMULATOR = "metaworld_v3"
DEFAULT_CAMERA = "corner4"  # closest fixed view with gripper, object and goal in frame for all 50 tasks
# Free cameras of our own, by name, beside the model's fixed ones: (lookat xyz [m], distance [m], azimuth
# [deg], elevation [deg]) for a ``mujoco.MjvCamera``. "workspace" frames the region where Meta-World draws
# objects and goals (x in [-0.1, 0.1], y in [0.6, 0.9]) from the corner4 side at about 1.5x corner4's scale,
# so a 5 cm goal tolerance spans more pixels at the same render size (our choice; not a Meta-World camera).
# "front" looks at the same region from the far side of the table, facing the robot, at about 2.5x corner4's
# scale: table x runs straight across the image, so the view is mirror-symmetric about the hand's start
# (x = 0). From corner4 (and "workspace", on the same side) an object at -x projects just under the fingers
# of the hand's start pose, and grip3 policies trained on corner4 reach such objects far less often
# (docs/results.md); from the front every object position is separated from the hand by the same margin.
FREE_CAMERAS: dict[str, tuple[tuple[float, float, float], float, float, float]] = {
    "workspace": ((0.0, 0.72, 0.15), 0.75, -135.0, -40.0),
    "front": ((0.0, 0.74, 0.11), 0.82, -90.0, -42.0),
}
DEFAULT_RESOLUTION = 128
EVAL_SEED_OFFSET = 1_000_000  # training seeds are [0, EVAL_SEED_OFFSET), evaluation seeds from here on
RELEASE_HOLD_STEPS = 10  # steps the release variant keeps the gripper open and the arm still

# Order of Meta-World's MT10 / MT50 benchmarks (metaworld.env_dict.MT10_V3 / ALL_V3_ENVIRONMENTS).
MT10 = [
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
]

INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and put it into the hoop",
    "bin-picking-v3": "pick up the cube and place it into the other bin",
    "box-close-v3": "grasp the lid and put it on the box to close it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front, behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the coffee mug out from under the machine",
    "coffee-push-v3": "push the coffee mug under the coffee machine",
    "dial-turn-v3": "rotate the dial 180 degrees",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "turn the door lock down to lock the door",
    "door-open-v3": "open the door by pulling the handle",
    "door-unlock-v3": "turn the door lock up to unlock the door",
    "hand-insert-v3": "grasp the puck and insert it into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "rotate the faucet handle to open it",
    "faucet-close-v3": "rotate the faucet handle to close it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "grasp the peg and insert it sideways into the hole",
    "peg-unplug-side-v3": "grasp the peg and unplug it sideways",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and use it to push the thermos to the goal",
    "stick-pull-v3": "grasp the stick and use it to pull the thermos to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position over the wall",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
MT50 = list(INSTRUCTIONS)  # the same 50 tasks and order as metaworld.env_dict.ALL_V3_ENVIRONMENTS

# Tasks whose scripted expert changes the binarised gripper state (effort > 0 = closed) during an
# episode. Derived empirically with ``gripper_flip_stats`` (expert of metaworld.policies, executed with
# binarised gripper, seeds 0-9): every task below flips in >= 8 of 10 episodes, every other task in 0 of
# 10 (their experts hold one constant effort: +1 for door/drawer/window/faucet/..., -1 or 0 for
# button/reach/plate-slide/...; box-close moves 0.5 -> 1.0, i.e. stays closed). button-press-wall starts
# closed and opens once; all others close on an object (sweep/push-back/peg-unplug/handle-pull-side may
# regrasp, giving 2+ flips). tests/test_envs_metaworld.py re-checks a few.
GRIP_TASKS = [
    "assembly-v3",
    "basketball-v3",
    "bin-picking-v3",
    "button-press-wall-v3",
    "coffee-pull-v3",
    "coffee-push-v3",
    "disassemble-v3",
    "hand-insert-v3",
    "hammer-v3",
    "handle-pull-side-v3",
    "pick-place-wall-v3",
    "pick-out-of-hole-v3",
    "pick-place-v3",
    "peg-insert-side-v3",
    "peg-unplug-side-v3",
    "stick-push-v3",
    "stick-pull-v3",
    "push-v3",
    "push-wall-v3",
    "push-back-v3",
    "shelf-place-v3",
    "sweep-into-v3",
    "sweep-v3",
]

# Native effort a closed (0) 7-D gripper maps to: the largest effort the task's expert commands (read from
# metaworld/policies/*.py and confirmed by rollouts); tasks not listed use 1.0. With these levels and
# -1 for "open", the binarised expert succeeds exactly as often as the raw expert (seeds 0-9, all 50).
GRIPPER_CLOSED_EFFORT: dict[str, float] = {
    "assembly-v3": 0.6,
    "basketball-v3": 0.6,
    "bin-picking-v3": 0.6,
    "coffee-pull-v3": 0.7,
    "coffee-push-v3": 0.5,
    "disassemble-v3": 0.8,
    "hand-insert-v3": 0.65,
    "hammer-v3": 0.8,
    "handle-pull-side-v3": 0.6,
    "pick-place-wall-v3": 0.9,
    "pick-out-of-hole-v3": 0.1,
    "peg-insert-side-v3": 0.6,
    "peg-unplug-side-v3": 0.1,
    "stick-push-v3": 0.7,
    "stick-pull-v3": 0.7,
    "push-v3": 0.6,
    "push-wall-v3": 0.6,
    "push-back-v3": 0.9,
    "shelf-place-v3": 0.7,
    "sweep-into-v3": 0.7,
    "sweep-v3": 0.7,
}
GRIPPER_OPEN_EFFORT = -1.0

# The CPU comparison's tasks (docs/results.md): pick, push and sweep, each with a grasp.
GRIP3 = ["pick-place-v3", "push-v3", "sweep-into-v3"]
SUITES: dict[str, list[str]] = {"mt10": MT10, "mt50": MT50, "grip": GRIP_TASKS, "grip3": GRIP3}


def resolve_suite(spec: str) -> list[str]:
    """``"mt10" | "mt50" | "grip" | "grip3" | "task-a-v3,task-b-v3"`` -> list of task names (order kept, no
    duplicates). The ``-v3`` suffix may be left out."""
    key = spec.strip().lower()
    if key in SUITES:
        return list(SUITES[key])
    tasks: list[str] = []
    for raw in key.split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in INSTRUCTIONS and f"{name}-v3" in INSTRUCTIONS:
            name = f"{name}-v3"
        if name not in INSTRUCTIONS:
            raise ValueError(
                f"unknown Meta-World task {raw.strip()!r} in suite {spec!r}; expected one of "
                f"{sorted(SUITES)} or task names such as 'pick-place-v3'"
            )
        if name not in tasks:
            tasks.append(name)
    if not tasks:
        raise ValueError(f"empty Meta-World suite {spec!r}")
    return tasks


def initial_state_seeds(split: str, num: int, offset: int = 0) -> list[int]:
    """Seeds of the ``"train"`` or ``"eval"`` initial-state pool: ``offset + i`` for ``i < num``, shifted
    by ``EVAL_SEED_OFFSET`` for eval. Raises if a train seed would reach into the eval range."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if num < 0 or offset < 0:
        raise ValueError(f"num and offset must be >= 0, got num={num}, offset={offset}")
    if split == "train":
        if offset + num > EVAL_SEED_OFFSET:
            raise ValueError(
                f"train seeds {offset}..{offset + num - 1} reach the eval pool (seeds >= {EVAL_SEED_OFFSET})"
            )
        return list(range(offset, offset + num))
    return list(range(EVAL_SEED_OFFSET + offset, EVAL_SEED_OFFSET + offset + num))


# ---- action mapping ------------------------------------------------------------------------------
class MetaWorldActionMapping(ActionMapping):
    """7-D ``(dx, dy, dz, droll, dpitch, dyaw, gripper)`` <-> Meta-World's 4-D ``(dx, dy, dz, effort)``.

    xyz pass through clipped to [-1, 1] (native units: 1.0 = 1 cm end-effector target step). Rotations are
    dropped (Meta-World fixes the hand orientation). gripper > 0.5 (open) -> effort -1; otherwise the
    task's closing effort. Back: effort > 0 -> 0 (closed), else 1 (open).
    """

    def __init__(self, closed_effort: float = 1.0, open_effort: float = GRIPPER_OPEN_EFFORT) -> None:
        if not (0.0 < closed_effort <= 1.0 and -1.0 <= open_effort <= 0.0):
            raise ValueError(
                f"closed_effort must be in (0, 1] and open_effort in [-1, 0], got {closed_effort}, {open_effort}"
            )
        self.closed_effort = float(closed_effort)
        self.open_effort = float(open_effort)

    @classmethod
    def for_task(cls, task: str) -> MetaWorldActionMapping:
        return cls(GRIPPER_CLOSED_EFFORT.get(task, 1.0))

    def to_native(self, action7: np.ndarray) -> np.ndarray:
        a = np.asarray(action7, dtype=np.float64)
        if a.shape[-1] != 7:
            raise ValueError(f"expected a 7-D action (..., 7), got shape {a.shape}")
        out = np.empty(a.shape[:-1] + (4,), dtype=np.float32)
        out[..., :3] = np.clip(a[..., :3], -1.0, 1.0)
        is_open = a[..., GRIPPER_INDEX] > GRIPPER_THRESHOLD
        out[..., 3] = np.where(is_open, self.open_effort, self.closed_effort)
        return out

    def from_native(self, native: np.ndarray) -> np.ndarray:
        n = np.asarray(native, dtype=np.float64)
        if n.shape[-1] != 4:
            raise ValueError(f"expected a 4-D Meta-World action (..., 4), got shape {n.shape}")
        out = np.zeros(n.shape[:-1] + (7,), dtype=np.float32)
        out[..., :3] = np.clip(n[..., :3], -1.0, 1.0)
        out[..., GRIPPER_INDEX] = np.where(n[..., 3] > 0.0, 0.0, GRIPPER_OPEN)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": SIMULATOR,
            "xyz_index": [0, 1, 2],
            "rotation_index": [3, 4, 5],  # always 0: Meta-World has no rotation control
            "gripper_index": GRIPPER_INDEX,
            "gripper_open": GRIPPER_OPEN,
            "gripper_threshold": GRIPPER_THRESHOLD,
            "native_dim": 4,
            "native_xyz_index": [0, 1, 2],
            "native_xyz_scale": 1.0,  # native = ours * scale, clipped to [-1, 1]
            "native_xyz_units": "1.0 = 0.01 m end-effector target displacement per step",
            "native_gripper_index": 3,
            "native_gripper_open_effort": self.open_effort,
            "native_gripper_closed_effort": self.closed_effort,
        }


def dataset_action_mapping(tasks: list[str]) -> dict[str, Any]:
    """The mapping dict for a dataset of several tasks: the single-task dict plus a per-task table of
    closing efforts (``native_gripper_closed_effort`` becomes ``{task: effort}``)."""
    d = MetaWorldActionMapping().to_dict()
    d["native_gripper_closed_effort"] = {t: GRIPPER_CLOSED_EFFORT.get(t, 1.0) for t in tasks}
    return d


def action_mapping_from_dict(d: dict[str, Any], task: str) -> MetaWorldActionMapping:
    """Rebuild the mapping for ``task`` from a dataset's ``action_mapping`` dict."""
    if d.get("type") != SIMULATOR:
        raise ValueError(f"action_mapping type {d.get('type')!r} is not {SIMULATOR!r}")
    closed = d.get("native_gripper_closed_effort", 1.0)
    if isinstance(closed, dict):
        if task not in closed:
            raise ValueError(f"action_mapping has no closing effort for task {task!r} (has {sorted(closed)})")
        closed = closed[task]
    return MetaWorldActionMapping(
        float(closed), float(d.get("native_gripper_open_effort", GRIPPER_OPEN_EFFORT))
    )


# ---- environment ---------------------------------------------------------------------------------
# Envs with a live renderer. MuJoCo's EGL backend registers ``eglTerminate`` with atexit when its first
# context is made; a renderer freed after that (by garbage collection at exit) raises EGL_NOT_INITIALIZED
# noise. Our hook is registered after the first context exists, so it runs first (atexit is LIFO).
_LIVE_ENVS: weakref.WeakSet[MetaWorldEnv] = weakref.WeakSet()
_ATEXIT_HOOKED = False


def _close_live_envs() -> None:
    for env in list(_LIVE_ENVS):
        env.close()


def _parse_resolution(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def _privileged_names() -> list[str]:
    pose = ["x", "y", "z", "qw", "qx", "qy", "qz"]
    frame = ["hand_x", "hand_y", "hand_z", "gripper_distance"] + [f"obj{i}_{p}" for i in (0, 1) for p in pose]
    return frame + [f"prev_{n}" for n in frame] + ["goal_x", "goal_y", "goal_z"]


# Meta-World's 39-d observation (``obs["privileged"]``): hand, finger distance and up to two objects' poses
# (zero padded), the same 18 values one step earlier, and the goal (goal-observable, as in MT10/MT50).
PRIVILEGED_NAMES = _privileged_names()


class MetaWorldEnv(Env):
    """One Meta-World v3 task with the goal observable (as in MT10/MT50) and one rendered camera (or more).

    Observation: ``image`` uint8 (H, W, 3) upright, ``state`` float32 (4,) = end-effector xyz [m] and
    finger opening in [0, 1], ``privileged`` float64 (39,) = Meta-World's full observation (what the
    scripted experts read). ``render=False`` skips the image (``obs["image"]`` is None), for fast tests.
    With ``extra_cameras``: ``images`` = {name: uint8 (H, W, 3) upright} of those cameras, same size.
    """

    simulator = SIMULATOR
    state_names = ["ee_x", "ee_y", "ee_z", "gripper_opening"]

    def __init__(
        self,
        task: str,
        camera: str = DEFAULT_CAMERA,
        resolution: int | tuple[int, int] = DEFAULT_RESOLUTION,
        max_steps: int | None = None,
        render: bool = True,
        extra_cameras: Sequence[str] = (),
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # heavy import, only when an env is built

        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown Meta-World v3 task {task!r}; expected one of {MT50}")
        self.task = task
        self.instruction = INSTRUCTIONS[task]
        self.action_mapping = MetaWorldActionMapping.for_task(task)
        self.camera = camera
        self.extra_cameras = tuple(extra_cameras)
        if camera in self.extra_cameras or len(set(self.extra_cameras)) != len(self.extra_cameras):
            raise ValueError(f"extra_cameras {list(self.extra_cameras)} repeat a camera (camera {camera!r})")
        self.height, self.width = _parse_resolution(resolution)

        env = ALL_V3_ENVIRONMENTS[task]()  # render_mode=None: we render ourselves
        # Same setup as metaworld's goal-observable envs / MT benchmarks: goal in the observation.
        env._partially_observable = False
        del env.sawyer_observation_space  # cached_property, recomputed for the new observability
        env._set_task_called = True
        env._freeze_rand_vec = True
        self._env = env
        self.max_steps = int(max_steps or env.max_path_length)
        # Meta-World raises past max_path_length and uses it for nothing else; our time limit is
        # ``max_steps`` (reported as ``done``), and the release variant may step a few steps past it.
        env.max_path_length = 2**31 - 1
        self.fps = 1.0 / float(env.dt)  # 80 Hz (timestep 2.5 ms x frame_skip 5)
        self._steps = 0
        self._started = False
        self._renderer: mujoco.Renderer | None = None
        self._views: dict[str, tuple[Any, bool]] = {}  # camera -> (what update_scene takes, turn upright)
        if render:
            self._init_renderer()

    # -- rendering --
    def _init_renderer(self) -> None:
        model = self._env.model
        # Shadows, multisampling and reflections cost ~10x the frame time on a CPU (Mesa) renderer and
        # carry nothing a policy needs at 128 px.
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        self._views = {name: self._view(name) for name in (self.camera, *self.extra_cameras)}
        self._renderer = mujoco.Renderer(model, self.height, self.width)
        global _ATEXIT_HOOKED
        _LIVE_ENVS.add(self)
        if not _ATEXIT_HOOKED:
            atexit.register(_close_live_envs)
            _ATEXIT_HOOKED = True
        flags = self._renderer.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0

    def _view(self, name: str) -> tuple[Any, bool]:
        """(what ``mujoco.Renderer.update_scene`` takes for camera ``name``, whether to turn its renders)."""
        model = self._env.model
        if name in FREE_CAMERAS:  # free cameras render upright
            lookat, distance, azimuth, elevation = FREE_CAMERAS[name]
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            cam.lookat[:] = lookat
            cam.distance, cam.azimuth, cam.elevation = distance, azimuth, elevation
            return cam, False
        cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        if cam_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)] + sorted(FREE_CAMERAS)
            raise ValueError(f"unknown camera {name!r} for {self.task}; expected one of {names}")
        # A fixed camera whose "up" axis points below the horizon renders the world upside down (all of
        # Meta-World's corner cameras); rotating by 180 degrees makes it upright without mirroring.
        # Tracking cameras (gripperPOV, behindGripper) move with the hand, so they are left as they are.
        if model.cam_mode[cam_id] != mujoco.mjtCamLight.mjCAMLIGHT_FIXED:
            return name, False
        mujoco.mj_forward(model, self._env.data)
        up_z = self._env.data.cam_xmat[cam_id].reshape(3, 3)[2, 1]
        return name, bool(up_z < 0)

    def render_raw(self, camera: str | None = None) -> np.ndarray:
        """The renderer's image of ``camera`` (default this env's camera) exactly as MuJoCo returns it, uint8
        (H, W, 3) (upside down for corners)."""
        if self._renderer is None:
            raise RuntimeError(f"{self.task}: built with render=False, cannot render")
        self._renderer.update_scene(self._env.data, camera=self._camera_view(camera)[0])
        return self._renderer.render()

    def _camera_view(self, camera: str | None) -> tuple[Any, bool]:
        name = camera or self.camera
        if name not in self._views:
            raise ValueError(f"camera {name!r} is not rendered by this env (cameras: {[self.camera, *self.extra_cameras]})")
        return self._views[name]

    @property
    def render_camera(self) -> Any:
        """What ``mujoco.Renderer.update_scene`` takes for this env's camera: a name, or a free camera."""
        return self._camera_view(None)[0]

    def upright(self, img: np.ndarray, camera: str | None = None) -> np.ndarray:
        """Turn a raw (H, W, ...) render of ``camera`` (default this env's) upright (a no-op for upright cameras)."""
        return np.ascontiguousarray(img[::-1, ::-1]) if self._camera_view(camera)[1] else img

    def render(self, camera: str | None = None) -> np.ndarray:
        """Upright uint8 (H, W, 3) image of ``camera`` (default this env's camera) in the current state."""
        return self.upright(self.render_raw(camera), camera)

    @property
    def sim(self) -> Any:
        """The wrapped Meta-World env (``model``, ``data``), for tests and diagnostics."""
        return self._env

    # -- Env API --
    def sample_initial_state(self, seed: int) -> InitialState:
        """Draw the object/goal "random vector" with Meta-World's own seeded sampler (including its
        rejection loops, e.g. pick-place re-draws goals too close to the object). Resets the simulator.

        ``reset(state)`` then replays the vector frozen, bit-identically whatever ran before (checked for
        all 50 tasks). For tasks whose reset moves model bodies (disassemble, assembly, ...) that replayed
        start can differ slightly from the one Meta-World's own seeded reset produced (its first internal
        reset still saw the previous layout); collection and evaluation both use the replayed one."""
        env = self._env
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env.seed(int(seed))
        try:
            env.reset()
        finally:
            env._freeze_rand_vec = True
        rand_vec = np.asarray(env._last_rand_vec, dtype=np.float64)
        data = {
            "rand_vec": [float(x) for x in rand_vec],
            # Informational (reset ignores them): where the object and goal ended up.
            "obj_init_pos": [float(x) for x in np.asarray(env.obj_init_pos).reshape(-1)],
            "goal_pos": [float(x) for x in np.asarray(env._target_pos).reshape(-1)],
        }
        self._started = False  # the sampled state is not a started episode: force reset()
        return InitialState(SIMULATOR, self.task, int(seed), data)

    def reset(self, initial_state: InitialState) -> Observation:
        if initial_state.simulator != SIMULATOR or initial_state.task != self.task:
            raise ValueError(
                f"initial state {initial_state.key} ({initial_state.simulator}) does not belong to "
                f"{SIMULATOR}/{self.task}"
            )
        if "rand_vec" not in initial_state.data:
            raise ValueError(f"initial state {initial_state.key}: data has no 'rand_vec'")
        env = self._env
        env._freeze_rand_vec = True
        env._last_rand_vec = np.asarray(initial_state.data["rand_vec"], dtype=np.float64)
        obs, _ = env.reset()
        self._steps = 0
        self._started = True
        return self._observation(obs)

    def step(self, action7: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        if not self._started:
            raise RuntimeError(f"{self.task}: call reset() before step()")
        native = self.action_mapping.to_native(np.asarray(action7))
        obs, reward, _, _, info = self._env.step(native)
        self._steps += 1
        info = dict(info)
        info["success"] = bool(info["success"])
        # Meta-World's own per-step flags: the hand within 3 cm of the object, and its grasp test (for
        # pick tasks: the object held and lifted 2 cm). Each task defines them in its evaluate_state.
        info["milestones"] = {"reached": bool(info.get("near_object", 0.0)), "grasped": bool(info.get("grasp_success", 0.0))}
        if "obj_to_target" in info:  # each task's own success distance (hand-to-goal for reach tasks)
            info["goal_distance"] = d = float(info["obj_to_target"])
            # Which way the object misses, where that distance is the object's (goal observable: its position
            # at obs[4:7], the goal at obs[-3:]); tasks that measure from the hand or a handle get none.
            offset = np.asarray(obs[4:7] - obs[-3:], dtype=np.float64)
            if abs(float(np.linalg.norm(offset)) - d) < 1e-6:
                info["goal_offset"] = [float(x) for x in offset]
        # Where the hand is against the task's (first) object: which way a policy that never reaches it misses.
        info["hand_offset"] = [float(x) for x in obs[:3] - obs[4:7]]
        return self._observation(obs), float(reward), self._steps >= self.max_steps, info

    def _observation(self, native_obs: np.ndarray) -> Observation:
        obs = {
            "image": self.render() if self._renderer is not None else None,
            "state": native_obs[:4].astype(np.float32),
            "privileged": native_obs,
        }
        if self.extra_cameras:
            obs["images"] = {c: self.render(c) if self._renderer is not None else None for c in self.extra_cameras}
        return obs

    @property
    def steps(self) -> int:
        return self._steps

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()


# ---- scripted experts ----------------------------------------------------------------------------
class MetaWorldExpert:
    """Meta-World's hand-written policy for ``task`` (``metaworld.policies``), emitting our 7-D action
    (xyz clipped to [-1, 1], gripper binarised 1 = open / 0 = closed)."""

    def __init__(self, task: str) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise ValueError(f"no Meta-World scripted policy for task {task!r}")
        self.task = task
        self._policy = ENV_POLICY_MAP[task]()
        self._mapping = MetaWorldActionMapping.for_task(task)

    def reset(self) -> None:
        """The experts are stateless; kept for the policy-callable interface."""

    @property
    def done(self) -> bool:
        return False

    def act(self, obs: Observation, info: dict[str, Any] | None = None) -> np.ndarray:
        """obs from ``MetaWorldEnv`` -> (7,) float32 action."""
        with warnings.catch_warnings():
            # The experts' p-controllers exceed [-1, 1] by design (the env clips) and warn every step.
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
            native = self._policy.get_action(obs["privileged"])
        return self._mapping.from_native(native)


class ReleaseAtSuccess:
    """Wraps an expert: once the env reports success, open the gripper and hold the arm still for
    ``hold_steps`` steps, then report ``done``. Pick-and-place episodes thus carry two gripper flips
    (close on the object, open at the goal) instead of ending with the object still held.

    The gripper is our binarised 0/1 value throughout. Episodes count as successful when success was
    reached before the release (objects placed in mid-air goals fall after release).
    """

    def __init__(self, expert: MetaWorldExpert, hold_steps: int = RELEASE_HOLD_STEPS) -> None:
        if hold_steps < 1:
            raise ValueError(f"hold_steps must be >= 1, got {hold_steps}")
        self.expert = expert
        self.hold_steps = int(hold_steps)
        self._released = 0

    def reset(self) -> None:
        self._released = 0
        self.expert.reset()

    @property
    def releasing(self) -> bool:
        return self._released > 0

    @property
    def done(self) -> bool:
        return self._released >= self.hold_steps

    def act(self, obs: Observation, info: dict[str, Any] | None = None) -> np.ndarray:
        """``info`` is the previous step's info (None at the first step)."""
        if self._released == 0 and not (info and info.get("success")):
            return self.expert.act(obs, info)
        self._released += 1
        a = np.zeros(7, dtype=np.float32)
        a[GRIPPER_INDEX] = GRIPPER_OPEN
        return a


def gripper_flip_stats(task: str, seeds: list[int], max_steps: int | None = None) -> dict[str, Any]:
    """Run the binarised expert of ``task`` without rendering; per seed, whether it succeeded and how
    many times the gripper flipped. This is how ``GRIP_TASKS`` was derived."""
    from damvla.weighting import gripper_flips

    env = MetaWorldEnv(task, max_steps=max_steps, render=False)
    expert = MetaWorldExpert(task)
    out: dict[str, Any] = {"task": task, "success": [], "flips": []}
    try:
        for seed in seeds:
            obs = env.reset(env.sample_initial_state(seed))
            grip, success, done = [], False, False
            while not (success or done):
                a = expert.act(obs)
                grip.append(a[GRIPPER_INDEX])
                obs, _, done, info = env.step(a)
                success = info["success"]
            out["success"].append(success)
            out["flips"].append(int(len(gripper_flips(np.asarray(grip)))))
    finally:
        env.close()
    return out
