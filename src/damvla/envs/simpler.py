"""SIMPLER (SimplerEnv, ManiSkill2-real2sim) behind the ``damvla.envs.base.Env`` interface.

SimplerEnv runs in its own interpreter (``--simpler-python`` / ``DAMVLA_SIMPLER_PYTHON``): each
``SimplerEnv`` starts ``damvla/envs/simpler_server.py`` with it and talks to it over the server's stdin /
stdout (protocol in that file). Setup and the CPU workaround: docs/simpler.md.

- Suites (``resolve_suite``): ``simpler:TASK[,TASK]`` with SimplerEnv's prepackaged visual-matching tasks
  (``google_robot_open_drawer``, ``widowx_carrot_on_plate``, ...; the episode layout is drawn from the reset
  seed) or the protocol columns of the named suites; ``simpler:google_vm``, ``simpler:google_va`` and
  ``simpler:widowx`` run the paper tables' full grids (``damvla.envs.simpler_suites``).
- Actions, CogACT's conventions exactly (``sim_cogact/cogact_policy.py``): our 7-D action
  ``(dx, dy, dz, droll, dpitch, dyaw, gripper)`` with the gripper 1 = open (after the adaptive ensemble it can
  lie between 0 and 1) becomes SIMPLER's ``(xyz, axis-angle, gripper)``: xyz as is, the Euler deltas turned
  into an axis-angle vector (transforms3d's ``euler2axangle``, static x-y-z), and the gripper
  - Google robot: relative and "sticky" (``StickyGripper``): ``previous - current`` open-ness, and once its
    magnitude exceeds 0.5 the command is held for 10 steps;
  - WidowX: absolute, ``+1`` (open) when the value is > 0.5, else ``-1``.
- Images: the robot's camera (Google: ``overhead_camera``, WidowX: ``3rd_view_camera``) resized to
  ``resolution`` (224: CogACT's input size) by area averaging, aspect ratio not kept (the frame is squashed
  into the square, as CogACT's ``cv2.resize(..., INTER_AREA)`` does).
- Success: SIMPLER's episodes run to the time limit and count the task as solved when it is solved at the
  *last* step (``success_at_end``); a drawer opened and closed again is a failure.
- Long-horizon tasks (put the apple in the drawer) switch instruction mid-episode; ``instruction`` follows
  it and the sticky gripper restarts, as CogACT's wrapper resets on a new instruction.
- Phase flags (``info["milestones"]``): the boolean entries of SIMPLER's ``episode_stats`` (grasped, lifted,
  moved the correct object, drawer open, ...); the drawer tasks have none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from damvla.envs.base import ActionMapping, Env, InitialState, Observation
from damvla.envs.simpler_server import PROTOCOL_VERSION, ProtocolError, read_message, write_message
from damvla.envs.simpler_suites import NAMED_SUITES, PROTOCOL_TASKS, SUITE_ALIASES

SIMULATOR = "simpler"
DEFAULT_RESOLUTION = 224  # CogACT's image size
PYTHON_ENV_VAR = "DAMVLA_SIMPLER_PYTHON"
SERVER_ENV_VAR = "DAMVLA_SIMPLER_SERVER"  # another server script speaking the same protocol (tests: a fake)
SERVER_SCRIPT = Path(__file__).with_name("simpler_server.py")
SHADERS = ("ibl", "rt", "default")
STICKY_REPEAT = {"google_robot": 10, "widowx": 1}
ENSEMBLE_HORIZON = {"google_robot": 2, "widowx": 7}  # CogACT's adaptive ensemble K per robot
ADAPTIVE_ALPHA = 0.1

# SimplerEnv's prepackaged tasks (``simpler_env.ENVIRONMENTS``, HEAD 4ab7178) -> ManiSkill2 env id and kwargs.
PREPACKAGED: dict[str, tuple[str, dict[str, Any]]] = {
    "google_robot_pick_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {}),
    "google_robot_pick_horizontal_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"lr_switch": True}),
    "google_robot_pick_vertical_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"laid_vertically": True}),
    "google_robot_pick_standing_coke_can": ("GraspSingleOpenedCokeCanInScene-v0", {"upright": True}),
    "google_robot_pick_object": ("GraspSingleRandomObjectInScene-v0", {}),
    "google_robot_move_near": ("MoveNearGoogleBakedTexInScene-v1", {}),
    "google_robot_move_near_v0": ("MoveNearGoogleBakedTexInScene-v0", {}),
    "google_robot_move_near_v1": ("MoveNearGoogleBakedTexInScene-v1", {}),
    "google_robot_open_drawer": ("OpenDrawerCustomInScene-v0", {}),
    "google_robot_open_top_drawer": ("OpenTopDrawerCustomInScene-v0", {}),
    "google_robot_open_middle_drawer": ("OpenMiddleDrawerCustomInScene-v0", {}),
    "google_robot_open_bottom_drawer": ("OpenBottomDrawerCustomInScene-v0", {}),
    "google_robot_close_drawer": ("CloseDrawerCustomInScene-v0", {}),
    "google_robot_close_top_drawer": ("CloseTopDrawerCustomInScene-v0", {}),
    "google_robot_close_middle_drawer": ("CloseMiddleDrawerCustomInScene-v0", {}),
    "google_robot_close_bottom_drawer": ("CloseBottomDrawerCustomInScene-v0", {}),
    "google_robot_place_in_closed_drawer": ("PlaceIntoClosedDrawerCustomInScene-v0", {}),
    "google_robot_place_in_closed_top_drawer": ("PlaceIntoClosedTopDrawerCustomInScene-v0", {}),
    "google_robot_place_in_closed_middle_drawer": ("PlaceIntoClosedMiddleDrawerCustomInScene-v0", {}),
    "google_robot_place_in_closed_bottom_drawer": ("PlaceIntoClosedBottomDrawerCustomInScene-v0", {}),
    "google_robot_place_apple_in_closed_top_drawer": (
        "PlaceIntoClosedTopDrawerCustomInScene-v0",
        {"model_ids": "baked_apple_v2"},
    ),
    "widowx_spoon_on_towel": ("PutSpoonOnTableClothInScene-v0", {}),
    "widowx_carrot_on_plate": ("PutCarrotOnPlateInScene-v0", {}),
    "widowx_stack_cube": ("StackGreenCubeOnYellowCubeBakedTexInScene-v0", {}),
    "widowx_put_eggplant_in_basket": ("PutEggplantInBasketScene-v0", {}),
}


# ---- suites and initial states -------------------------------------------------------------------
def is_simpler_suite(suite: str) -> bool:
    return suite.startswith("simpler:")


def resolve_suite(spec: str) -> list[str]:
    """``simpler:NAME`` (a named suite) or ``simpler:TASK[,TASK]`` -> task names, in order."""
    if not is_simpler_suite(spec):
        raise ValueError(f"not a SIMPLER suite: {spec!r} (expected 'simpler:TASK[,TASK]' or 'simpler:SUITE')")
    body = spec.split(":", 1)[1].strip()
    name = SUITE_ALIASES.get(body, body)
    if name in NAMED_SUITES:
        return list(NAMED_SUITES[name])
    tasks = [t.strip() for t in body.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--suite {spec!r} names no task")
    unknown = [t for t in tasks if t not in PREPACKAGED and t not in PROTOCOL_TASKS]
    if unknown:
        raise ValueError(
            f"--suite {spec!r}: unknown SIMPLER task(s) {unknown}; named suites: {sorted(NAMED_SUITES)}; "
            f"tasks: {sorted(PREPACKAGED)} and the named suites' columns {sorted(PROTOCOL_TASKS)}"
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--suite {spec!r} names a task twice")
    return tasks


def robot_of_task(task: str) -> str:
    """``google_robot`` or ``widowx``."""
    if task in PROTOCOL_TASKS:
        return PROTOCOL_TASKS[task][0]
    if task in PREPACKAGED:
        return "google_robot" if task.startswith("google_robot") else "widowx"
    raise ValueError(f"unknown SIMPLER task {task!r}")


def protocol_size(task: str) -> int | None:
    """Episodes in a protocol task's grid; None for a prepackaged task (any number of seeds)."""
    return len(PROTOCOL_TASKS[task][1]()) if task in PROTOCOL_TASKS else None


def initial_state(task: str, seed: int) -> InitialState:
    """The initial state of episode ``seed`` of ``task``: for a protocol task the ``seed``-th grid
    episode; for a prepackaged task ``env.reset(seed=seed)`` of SimplerEnv's visual-matching config."""
    robot = robot_of_task(task)
    if task in PROTOCOL_TASKS:
        episodes = PROTOCOL_TASKS[task][1]()
        if not 0 <= seed < len(episodes):
            raise ValueError(
                f"{task} has {len(episodes)} protocol episodes (0..{len(episodes) - 1}), not {seed}"
            )
        return InitialState(SIMULATOR, task, int(seed), episodes[seed].data(robot))
    env_name, kwargs = PREPACKAGED[task]
    data = {
        "env_name": env_name,
        "kwargs": dict(kwargs),
        "options": {},
        "reset_seed": int(seed),
        "prepackaged": True,
        "robot_kind": robot,
        "variant": "prepackaged visual matching",
    }
    return InitialState(SIMULATOR, task, int(seed), data)


def sample_initial_states(tasks: list[str], episodes: int, offset: int = 0) -> list[InitialState]:
    """``episodes`` states per task starting at ``offset``; a protocol task gives at most its grid (the
    whole grid is the paper's protocol)."""
    states = []
    for task in tasks:
        n = protocol_size(task)
        stop = offset + episodes if n is None else min(offset + episodes, n)
        if stop <= offset:
            raise ValueError(f"{task}: --state-offset {offset} is past its {n} protocol episodes")
        states.extend(initial_state(task, s) for s in range(offset, stop))
    return states


# ---- action conventions --------------------------------------------------------------------------
def euler_to_axis_angle(rpy: np.ndarray) -> np.ndarray:
    """(roll, pitch, yaw) static x-y-z Euler angles -> axis * angle, exactly transforms3d's
    ``axis, angle = euler2axangle(r, p, y); axis * angle`` (CogACT's SIMPLER wrapper): the angle is
    ``2 acos(w)`` of the unnormalised-sign quaternion, so it lies in [0, 2 pi]; the identity gives 0."""
    roll, pitch, yaw = (float(v) for v in np.asarray(rpy, dtype=np.float64).reshape(3))
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    w = cr * cp * cy + sr * sp * sy
    xyz = np.array([sr * cp * cy - cr * sp * sy, cr * sp * cy + sr * cp * sy, cr * cp * sy - sr * sp * cy])
    n2 = float(xyz @ xyz)
    if n2 < (3 * np.finfo(np.float64).eps) ** 2:
        return np.zeros(3)
    angle = 2.0 * np.arccos(np.clip(w / np.sqrt(w * w + n2), -1.0, 1.0))
    return xyz / np.sqrt(n2) * angle


def axis_angle_to_euler(rotvec: np.ndarray) -> np.ndarray:
    """Inverse of ``euler_to_axis_angle`` (static x-y-z Euler angles, roll and yaw in (-pi, pi])."""
    v = np.asarray(rotvec, dtype=np.float64).reshape(3)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.zeros(3)
    x, y, z = v / angle
    c, s, t = np.cos(angle), np.sin(angle), 1 - np.cos(angle)
    r = np.array(
        [
            [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
            [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
            [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
        ]
    )
    pitch = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    return np.array([np.arctan2(r[2, 1], r[2, 2]), pitch, np.arctan2(r[1, 0], r[0, 0])])


class StickyGripper:
    """The Google robot's relative gripper of CogACT's SIMPLER wrapper, step for step.

    ``__call__(open_value)`` takes the policy's gripper value (1 = open, 0 = closed; the adaptive ensemble
    can give values in between) and returns SIMPLER's relative gripper command (> 0 closes). The first call
    of an episode returns 0 and remembers the value. Afterwards ``previous - current`` is the command; when
    its magnitude exceeds 0.5 and no command is being held, it is latched and repeated for ``repeat`` steps
    (the latched step included), and ``previous`` becomes the current value. ``previous`` is updated *only*
    when a command is latched (CogACT's fix of SimplerEnv's RT-1 wrapper), so a small drift never re-fires.
    """

    def __init__(self, repeat: int = 10) -> None:
        if repeat < 1:
            raise ValueError(f"sticky gripper repeat must be >= 1, got {repeat}")
        self.repeat = int(repeat)
        self.reset()

    def reset(self) -> None:
        self.previous: float | None = None
        self.sticky_on = False
        self.sticky_value = 0.0
        self.count = 0

    def __call__(self, open_value: float) -> float:
        current = float(open_value)
        if self.previous is None:
            relative = 0.0
            self.previous = current
        else:
            relative = self.previous - current
        if abs(relative) > 0.5 and not self.sticky_on:
            self.sticky_on = True
            self.sticky_value = relative
            self.previous = current
        if self.sticky_on:
            self.count += 1
            relative = self.sticky_value
        if self.count == self.repeat:
            self.sticky_on = False
            self.count = 0
            self.sticky_value = 0.0
        return relative


def widowx_gripper(open_value: float) -> float:
    """WidowX: ``+1`` (open) when the value is > 0.5, else ``-1`` (CogACT: ``2 * (g > 0.5) - 1``)."""
    return 2.0 * float(float(open_value) > 0.5) - 1.0


class SimplerActionMapping(ActionMapping):
    """Our 7-D action -> SIMPLER's native 7-D ``(xyz, axis-angle, gripper)`` for one robot.

    Stateful for the Google robot (its sticky gripper): ``to_native`` takes one (7,) action per control
    step, in order, and ``reset()`` starts an episode. ``from_native`` inverts the arm part; the Google
    robot's relative gripper cannot be inverted without the episode's history and raises."""

    def __init__(self, robot: str) -> None:
        if robot not in STICKY_REPEAT:
            raise ValueError(f"SIMPLER robot must be one of {sorted(STICKY_REPEAT)}, got {robot!r}")
        self.robot = robot
        self.sticky = StickyGripper(STICKY_REPEAT[robot]) if robot == "google_robot" else None

    def reset(self) -> None:
        if self.sticky is not None:
            self.sticky.reset()

    def to_native(self, action7: np.ndarray) -> np.ndarray:
        a = np.asarray(action7, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"SIMPLER action mapping: one (7,) action per step, got shape {a.shape}")
        grip = self.sticky(a[6]) if self.sticky is not None else widowx_gripper(a[6])
        return np.concatenate([a[:3], euler_to_axis_angle(a[3:6]), [grip]])

    def from_native(self, native: np.ndarray) -> np.ndarray:
        n = np.asarray(native, dtype=np.float64)
        if n.shape != (7,):
            raise ValueError(f"SIMPLER native action: expected shape (7,), got {n.shape}")
        if self.robot == "google_robot":
            raise ValueError(
                "the Google robot's native gripper command is relative (sticky): it cannot be turned back into "
                "an open/closed state without the episode's previous commands"
            )
        grip = 1.0 if n[6] > 0 else 0.0
        return np.concatenate([n[:3], axis_angle_to_euler(n[3:6]), [grip]]).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": f"{SIMULATOR}_{self.robot}",
            "rotation": "euler_xyz_to_axis_angle",
            "gripper": "sticky_relative_10" if self.robot == "google_robot" else "absolute_pm1",
            "gripper_index": 6,
        }


# ---- images --------------------------------------------------------------------------------------
def resize_area(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3) by area averaging (PIL's box filter, which for shrinking is
    OpenCV's ``INTER_AREA`` up to rounding); the aspect ratio is not kept."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BOX))


# ---- the server process --------------------------------------------------------------------------
def simpler_python(flag: str | None = None) -> str:
    """The interpreter that has SimplerEnv: ``flag``, else ``$DAMVLA_SIMPLER_PYTHON``; raises if neither."""
    path = flag or os.environ.get(PYTHON_ENV_VAR)
    if not path:
        raise ValueError(
            "SIMPLER runs in its own Python environment: give --simpler-python PATH (or set "
            f"{PYTHON_ENV_VAR}) to the interpreter that has simpler_env installed (docs/simpler.md)"
        )
    if shutil.which(path) is None and not Path(path).is_file():
        raise ValueError(f"SIMPLER interpreter {path!r} does not exist (--simpler-python / {PYTHON_ENV_VAR})")
    return path


class SimplerServerError(RuntimeError):
    """The SIMPLER server failed a request or died; the message carries its stderr tail."""


class SimplerClient:
    """One server process: ``request(header, arrays) -> (reply, arrays)``; raises ``SimplerServerError``."""

    def __init__(self, python: str, server: str | Path | None = None) -> None:
        script = str(server or os.environ.get(SERVER_ENV_VAR) or SERVER_SCRIPT)
        self._log = tempfile.NamedTemporaryFile(prefix="damvla-simpler-", suffix=".log", delete=False)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.command = [python, script]
        self.proc = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env
        )
        try:
            hello, _ = self.request({"cmd": "hello"})
        except SimplerServerError:
            self.close()
            raise
        if hello.get("protocol") != PROTOCOL_VERSION:
            self.close()
            raise SimplerServerError(
                f"{script} speaks protocol {hello.get('protocol')!r}, damvla needs {PROTOCOL_VERSION}"
            )
        self.hello = hello

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def request(
        self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            write_message(self.proc.stdin, header, arrays)
            reply, out = read_message(self.proc.stdout)
        except (BrokenPipeError, ProtocolError, OSError) as e:
            try:
                code = self.proc.wait(timeout=5)  # a closed stream usually means the process is exiting
            except subprocess.TimeoutExpired:
                code = None
            raise SimplerServerError(
                f"SIMPLER server ({' '.join(self.command)}) died during {header.get('cmd')!r} "
                f"(exit code {code}, {type(e).__name__}: {e}); its stderr ends with:\n{self.stderr_tail()}"
            ) from e
        if not reply.get("ok"):
            raise SimplerServerError(
                f"SIMPLER server failed {header.get('cmd')!r}: {reply.get('error')}\n{reply.get('traceback', '')}"
            )
        return reply, out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request({"cmd": "close"})
            except SimplerServerError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:  # unflushed bytes to a dead process
                    pass
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


# ---- the env -------------------------------------------------------------------------------------
class SimplerEnv(Env):
    """One SIMPLER task, in a server process of SimplerEnv's interpreter.

    ``python``: that interpreter (else ``$DAMVLA_SIMPLER_PYTHON``); ``shader``: replace the configs'
    shader (``ibl`` on a CPU; None keeps the benchmark's, ray-traced ``rt`` for the drawer tasks);
    ``max_steps``: end earlier than the task's time limit. Observations: ``image`` uint8
    (resolution, resolution, 3), ``state`` the robot's joint positions (not a policy input here)."""

    simulator = SIMULATOR
    fps = 3.0  # Google robot control rate (WidowX: 5); set per robot on reset

    def __init__(
        self,
        task: str,
        resolution: int = DEFAULT_RESOLUTION,
        max_steps: int | None = None,
        python: str | None = None,
        shader: str | None = None,
        server: str | Path | None = None,
    ) -> None:
        if shader is not None and shader not in SHADERS:
            raise ValueError(f"SIMPLER shader must be one of {SHADERS}, got {shader!r}")
        self.task = task
        self.robot = robot_of_task(task)
        self.resolution = int(resolution)
        self.max_steps_override = max_steps
        self.max_steps = max_steps or 0
        self.shader = shader
        self.instruction = ""
        self.state_names: list[str] = []
        self.action_mapping = SimplerActionMapping(self.robot)
        self.fps = 3.0 if self.robot == "google_robot" else 5.0
        self.last_reset_info: dict[str, Any] = {}
        self._client = SimplerClient(simpler_python(python), server)
        self._steps = 0

    @property
    def server_info(self) -> dict[str, Any]:
        return dict(self._client.hello)

    def sample_initial_state(self, seed: int) -> InitialState:
        return initial_state(self.task, seed)

    def reset(self, initial_state: InitialState) -> Observation:
        if initial_state.simulator != SIMULATOR or initial_state.task != self.task:
            raise ValueError(
                f"initial state {initial_state.simulator}/{initial_state.key} is not for {SIMULATOR}/{self.task}"
            )
        reply, arrays = self._client.request(
            {"cmd": "reset", "state": initial_state.to_dict(), "shader": self.shader}
        )
        robot = reply.get("robot") or ""
        if self.robot not in robot:
            raise ValueError(f"{self.task}: SIMPLER built robot {robot!r}, the task expects a {self.robot}")
        self.instruction = str(reply["instruction"])
        limit = reply.get("max_steps")
        if self.max_steps_override is not None:
            self.max_steps = int(self.max_steps_override)
        elif limit:
            self.max_steps = int(limit)
        else:
            raise ValueError(f"{self.task}: the SIMPLER server reported no time limit; pass --max-steps")
        self.last_reset_info = dict(reply.get("info") or {})
        self.action_mapping.reset()
        self._steps = 0
        return self._obs(arrays)

    def step(self, action7: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        native = self.action_mapping.to_native(np.asarray(action7, dtype=np.float64).reshape(7))
        reply, arrays = self._client.request({"cmd": "step"}, {"action": native})
        self._steps += 1
        done = bool(reply["done"]) or self._steps >= self.max_steps
        new = reply.get("instruction")
        if new and new != self.instruction:
            # The next subtask of a long-horizon task: CogACT resets its policy state (ensemble and sticky
            # gripper) when the instruction changes; the executor restarts its ensemble on the new text.
            self.instruction = str(new)
            self.action_mapping.reset()
        info = {
            "success": bool(reply["success"]),
            "milestones": {str(k): bool(v) for k, v in (reply.get("milestones") or {}).items()},
            "native_action": native,
            "episode_stats": reply.get("info", {}).get("episode_stats", {}),
        }
        return self._obs(arrays), float(reply.get("reward", 0.0)), done, info

    def _obs(self, arrays: dict[str, np.ndarray]) -> Observation:
        image = np.asarray(arrays["image"])
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"SIMPLER server sent an image of {image.dtype} {image.shape}, expected uint8 (H, W, 3)"
            )
        state = np.asarray(arrays.get("state", np.zeros(0)), dtype=np.float32)
        if not self.state_names:
            self.state_names = [f"qpos_{i}" for i in range(state.shape[0])]
        return {"image": resize_area(image, self.resolution), "state": state, "privileged": np.zeros(0)}

    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            self._client = None
            client.close()
