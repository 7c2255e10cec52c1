"""Closed-loop rollouts: one policy, many simulator processes, batched inference.

    from damvla.envs.rollout import RolloutSpec, rollout
    specs = [RolloutSpec("pick-place-v3", state) for state in eval_states]
    results = rollout(policy_fn, specs, num_workers=2)

Each worker process owns one env. At every step the main process gathers the current observation of
every running episode into one batch, calls ``policy_fn(batch) -> (B, 7)`` once, and sends each worker
its action; workers step in parallel. A worker whose episode ends starts the next pending one, so the
batch shrinks only at the very end.

The batch given to ``policy_fn`` (B = running episodes, order = ``batch["slot"]``):

| key | type / shape | meaning |
|---|---|---|
| ``observation.images.image`` | uint8 (B, 3, H, W) | upright camera image, channel-first (docs/CONTRACTS.md) |
| ``observation.images.<name>`` | uint8 (B, 3, H, W) | each of the specs' ``extra_cameras``, likewise |
| ``observation.state`` | float32 (B, S) | proprio state |
| ``task`` | list[str] | instruction of each episode |
| ``slot`` | int64 (B,) | worker slot; stable for the whole episode |
| ``episode_start`` | bool (B,) | True on an episode's first step: reset per-slot policy state (action queues) |
| ``episode_index`` | int64 (B,) | index into ``specs`` |
| ``has_image`` | bool (B,) | False for specs with ``render=False`` (their image is all zeros) |

With ``rollout(..., privileged=True)`` the batch also holds ``privileged`` (float64 (B, P), the full
simulator state): only scripted experts read it (``damvla eval --policy expert``), never a learned policy.

Failures are per episode: an exception in a worker's env (reset or step), a worker that dies, or one
that does not answer within ``timeout_s`` ends *that* episode with ``EpisodeResult.error`` set; the worker
is restarted and the run goes on. An exception raised by ``policy_fn`` itself still aborts the run (it
is a bug in the policy or the caller, and it would hit every episode alike).

Meta-World (``simulator="metaworld_v3"``) and SIMPLER (``"simpler"``, ``damvla.envs.simpler``) are wired
in; another simulator plugs in through ``make_env`` and ``mapping_from_dict``.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from damvla.envs.base import ActionMapping, Env, InitialState
from damvla.keys import MAIN_IMAGE_KEY, STATE_KEY, image_key

PolicyFn = Callable[[dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class RolloutSpec:
    """One evaluation episode: the task, its exact initial state and the env settings.

    ``action_mapping``: a dataset's ``info["damvla"]["action_mapping"]`` dict; when set, the env maps the
    policy's 7-D action to the native one with it (evaluation uses the checkpoint's mapping, not the
    env's default). ``record_frames``: keep this episode's images (``EpisodeResult.frames``; needs
    ``render``). ``render=False`` skips rendering, ~20x faster for image-blind policies; the batch then
    carries an all-zero image for that row and ``has_image`` False.
    """

    task: str
    initial_state: InitialState
    camera: str | None = None  # None: the simulator's default
    # Further cameras, rendered as batch keys observation.images.<name> (Meta-World only)
    extra_cameras: tuple[str, ...] = ()
    resolution: int = 128
    max_steps: int | None = None  # None: the simulator's default time limit
    stop_on_success: bool = True  # benchmarks count the first success; stop there
    action_mapping: dict[str, Any] | None = None
    record_frames: bool = False
    render: bool = True  # False: no image (policies that do not look: scripted expert, random)
    # True: the episode counts as solved when it is solved at its last step (SIMPLER), not at any step.
    success_at_end: bool = False
    env_options: tuple[tuple[str, Any], ...] = ()  # simulator-specific constructor arguments (SIMPLER)


@dataclass
class EpisodeResult:
    """Outcome of one spec. ``frames`` (uint8 (T, H, W, 3), upright) only when recorded; with extra cameras
    each frame holds every camera side by side, the first camera leftmost (W = cameras x width).

    ``error`` is None for an episode that ran to its end, else what went wrong (then ``success`` is
    False and ``steps`` counts the steps done before the failure). ``env_seconds``: wall time the
    worker spent inside ``env.step`` (simulation + rendering), for the steps-per-second figure.
    ``info["milestones"]``: {name: bool}, whether the env's task-progress flag was ever set (see ``Env.step``).
    ``info["goal_distance"]``: {"min", "final"} object-to-goal distance [m], where the env reports one, and
    where it reports ``goal_offset`` too, ``offset_min`` / ``offset_final``: object minus goal [m] at those steps.
    ``info["hand_object"]``: {"min", "offset_min"} the hand's closest distance to the object [m] and the hand
    minus the object at that step, where the env reports ``hand_offset``.
    """

    task: str
    key: str
    success: bool
    steps: int
    total_reward: float
    frames: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    env_seconds: float = 0.0


def make_env(spec: RolloutSpec) -> Env:
    """Build the env of ``spec`` (dispatch on ``spec.initial_state.simulator``)."""
    sim = spec.initial_state.simulator
    if sim == "metaworld_v3":
        from damvla.envs.metaworld import DEFAULT_CAMERA, MetaWorldEnv

        return MetaWorldEnv(
            spec.task, spec.camera or DEFAULT_CAMERA, spec.resolution, spec.max_steps, render=spec.render,
            extra_cameras=spec.extra_cameras,
        )  # fmt: skip
    if sim == "simpler":
        from damvla.envs.simpler import SimplerEnv

        if spec.extra_cameras:
            raise ValueError(f"rollout: SIMPLER envs render one camera, not extra_cameras {list(spec.extra_cameras)}")

        return SimplerEnv(spec.task, spec.resolution, spec.max_steps, **dict(spec.env_options))
    raise ValueError(f"rollout: no env for simulator {sim!r} (episode {spec.initial_state.key})")


def mapping_from_dict(simulator: str, mapping: dict[str, Any], task: str) -> ActionMapping:
    """Rebuild ``task``'s action mapping of ``simulator`` from a dataset's ``action_mapping`` dict."""
    if simulator == "metaworld_v3":
        from damvla.envs.metaworld import action_mapping_from_dict

        return action_mapping_from_dict(mapping, task)
    raise ValueError(f"rollout: no action mapping reader for simulator {simulator!r}")


# ---- workers -------------------------------------------------------------------------------------
class _EnvHost:
    """Owns one env (rebuilt when the settings change) and answers reset/step requests."""

    def __init__(self, privileged: bool = False) -> None:
        self.env: Env | None = None
        self.env_key: tuple[Any, ...] | None = None
        self.privileged = privileged

    def handle(self, msg: tuple[Any, ...]) -> Any:
        kind = msg[0]
        if kind == "reset":
            spec: RolloutSpec = msg[1]
            key = (
                spec.initial_state.simulator,
                spec.task,
                spec.camera,
                spec.extra_cameras,
                spec.resolution,
                spec.max_steps,
                spec.render,
                spec.env_options,
            )
            if self.env is None or self.env_key != key:
                self.close()
                self.env, self.env_key = make_env(spec), key
            if spec.action_mapping is not None:
                # Set on every reset: the env is reused across episodes of a task, and specs could differ.
                self.env.action_mapping = mapping_from_dict(
                    spec.initial_state.simulator, spec.action_mapping, spec.task
                )
            obs = self.env.reset(spec.initial_state)
            # What the simulator chose at reset beyond the recorded state (SIMPLER: drawer, overlay, ...).
            return self._slim(obs), self.env.instruction, dict(getattr(self.env, "last_reset_info", {}) or {})
        if kind == "step":
            assert self.env is not None, "step before reset"
            t0 = time.perf_counter()
            obs, reward, done, info = self.env.step(msg[1])
            dt = time.perf_counter() - t0
            flags = {str(k): bool(v) for k, v in (info.get("milestones") or {}).items()}
            reply = {"success": bool(info["success"]), "step_s": dt, "milestones": flags}
            if info.get("goal_distance") is not None:
                reply["goal_distance"] = float(info["goal_distance"])
                if info.get("goal_offset") is not None:
                    reply["goal_offset"] = [float(x) for x in info["goal_offset"]]
            if info.get("hand_offset") is not None:
                reply["hand_offset"] = [float(x) for x in info["hand_offset"]]
            return self._slim(obs), reward, done, {**reply, "instruction": self.env.instruction}
        raise ValueError(f"rollout worker: unknown request {kind!r}")

    def _slim(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Drop privileged simulator state unless asked for: a policy never sees it, and it need not
        cross processes."""
        out = {"image": obs["image"], "state": obs["state"]}
        if obs.get("images"):
            out["images"] = obs["images"]
        if self.privileged:
            out["privileged"] = np.asarray(obs["privileged"], dtype=np.float64)
        return out

    def close(self) -> None:
        if self.env is not None:
            env, self.env = self.env, None
            env.close()


def _worker_main(conn: Connection, privileged: bool = False) -> None:
    # Ctrl-C reaches the whole process group: the main process handles it (it records the finished
    # episodes and closes the workers); a worker that died of it first would count as a failed episode.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("LP_NUM_THREADS", "1")  # one raster thread per worker process
    os.environ.setdefault("MUJOCO_GL", "egl")
    host = _EnvHost(privileged)
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            try:
                conn.send(("ok", host.handle(msg)))
            except Exception as e:  # report, keep serving: the main process decides
                conn.send(("error", f"{type(e).__name__}: {e}"))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        host.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


class WorkerError(RuntimeError):
    """A worker failed one request (its env raised, the process died, or it timed out)."""


class _Slot:
    """A worker process (``proc=True``) or an in-process env host, behind one send/recv API."""

    def __init__(
        self, index: int, proc: bool, privileged: bool = False, timeout_s: float | None = None
    ) -> None:
        self.index = index
        self.timeout_s = timeout_s
        self._host: _EnvHost | None = None
        self._reply: Any = None
        self._proc: Any = None
        self._send_error: str | None = None
        if proc:
            ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited GL context or MuJoCo state
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_worker_main, args=(child, privileged), daemon=True)
            with _sigint_ignored():  # inherited: the child starts up ignoring Ctrl-C (see _worker_main)
                self._proc.start()
            child.close()
        else:
            self._host = _EnvHost(privileged)

    @property
    def pid(self) -> int | None:
        """The worker's process id (None in-process)."""
        return None if self._proc is None else self._proc.pid

    def send(self, msg: tuple[Any, ...]) -> None:
        self._send_error = None
        if self._host is not None:
            try:
                self._reply = ("ok", self._host.handle(msg))
            except Exception as e:
                self._reply = ("error", f"{type(e).__name__}: {e}")
            return
        try:
            self._conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            self._send_error = f"worker {self.index} is gone ({type(e).__name__})"  # reported by recv

    def recv(self, what: str) -> Any:
        if self._host is not None:
            status, payload = self._reply
        else:
            if self._send_error is not None:
                raise WorkerError(f"rollout worker {self.index} died before {what}: {self._send_error}")
            try:
                if self.timeout_s is not None and not self._conn.poll(self.timeout_s):
                    raise WorkerError(
                        f"rollout worker {self.index} did not answer {what} within {self.timeout_s:g} s"
                    )
                status, payload = self._conn.recv()
            except (EOFError, ConnectionResetError, OSError) as e:
                code = self._proc.exitcode if self._proc is not None else None
                raise WorkerError(f"rollout worker {self.index} died during {what} (exit code {code})") from e
        if status != "ok":
            raise WorkerError(f"rollout worker {self.index} failed during {what}: {payload}")
        return payload

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
        elif self._proc is not None:
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
            self._conn.close()


# ---- main loop -----------------------------------------------------------------------------------
def _film_frame(r: _Running) -> np.ndarray:
    """What the episode's video shows at this step: every camera the policy sees, side by side (a
    two-camera policy's failures are often visible in only one of them)."""
    if not r.spec.extra_cameras:
        return r.obs["image"]
    return np.concatenate([r.obs["image"], *(r.obs["images"][c] for c in r.spec.extra_cameras)], axis=1)


def _chw(r: _Running, camera: str | None = None) -> np.ndarray:
    """The episode's image (of extra camera ``camera``) channel-first, or zeros of the spec's size when it is
    not rendered."""
    img = r.obs["image"] if camera is None else (r.obs.get("images") or {}).get(camera)
    if img is None:
        return np.zeros((3, r.spec.resolution, r.spec.resolution), dtype=np.uint8)
    return img.transpose(2, 0, 1)


@dataclass
class _Running:
    spec_index: int
    spec: RolloutSpec
    obs: dict[str, Any]
    instruction: str
    start: bool = True
    steps: int = 0
    reward: float = 0.0
    success: bool = False
    env_seconds: float = 0.0
    frames: list[np.ndarray] = field(default_factory=list)
    milestones: dict[str, bool] = field(default_factory=dict)  # each: reached at any step so far
    goal_distance: dict[str, Any] = field(default_factory=dict)  # {"min", "final"[, "offset_min", "offset_final"]}
    hand_object: dict[str, Any] = field(default_factory=dict)  # {"min", "offset_min"}
    reset_info: dict[str, Any] = field(default_factory=dict)


def rollout(
    policy_fn: PolicyFn,
    specs: list[RolloutSpec],
    num_workers: int = 2,
    record_frames: bool = False,
    progress: Callable[[EpisodeResult], None] | None = None,
    privileged: bool = False,
    timeout_s: float | None = None,
) -> list[EpisodeResult]:
    """Run every spec to the end with ``policy_fn`` and return one result per spec, in spec order.

    ``num_workers=0`` runs one env in this process (debugging, tests). ``record_frames`` keeps the
    images of every episode (else only of specs with ``record_frames``). ``progress`` is called with
    each finished episode. An episode ends at its first success (``stop_on_success``), its time limit,
    or an env failure (``EpisodeResult.error``; the worker is restarted). ``privileged`` adds the
    simulator state to the batch (scripted experts only). ``timeout_s`` bounds each worker answer.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not specs:
        return []
    n = min(max(num_workers, 1), len(specs))

    def new_slot(i: int) -> _Slot:
        return _Slot(i, proc=num_workers > 0, privileged=privileged, timeout_s=timeout_s)

    slots = [new_slot(i) for i in range(n)]
    results: list[EpisodeResult | None] = [None] * len(specs)
    running: dict[int, _Running] = {}
    pending = list(range(len(specs)))[::-1]  # pop() takes the next spec in order

    def finish(res: EpisodeResult, index: int) -> None:
        results[index] = res
        if progress is not None:
            progress(res)

    def fail(s: int, index: int, error: str, r: _Running | None = None) -> None:
        """Record spec ``index`` as failed and give slot ``s`` a fresh worker (its env may be broken)."""
        spec = specs[index]
        frames = np.stack(r.frames) if r is not None and r.frames else None
        finish(
            EpisodeResult(
                task=spec.task,
                key=spec.initial_state.key,
                success=False,
                steps=r.steps if r is not None else 0,
                total_reward=r.reward if r is not None else 0.0,
                frames=frames,
                error=error,
                env_seconds=r.env_seconds if r is not None else 0.0,
            ),
            index,
        )
        running.pop(s, None)
        slots[s].close()
        slots[s] = new_slot(s)

    def start(s: int) -> None:
        """Start the next pending spec on slot ``s``; specs whose reset fails are recorded and skipped."""
        while pending:
            i = pending.pop()
            slots[s].send(("reset", specs[i]))
            try:
                obs, instruction, reset_info = slots[s].recv(f"reset of {specs[i].initial_state.key}")
            except WorkerError as e:
                fail(s, i, str(e))
                continue
            running[s] = _Running(i, specs[i], obs, instruction, reset_info=reset_info)
            return

    try:
        for s in range(n):  # resets are sequential once; env construction dominates and is one-off
            start(s)
        while running:
            order = sorted(running)
            cur = [running[s] for s in order]
            batch = {
                MAIN_IMAGE_KEY: np.stack([_chw(r) for r in cur]),
                "has_image": np.asarray([r.obs["image"] is not None for r in cur]),
                STATE_KEY: np.stack([r.obs["state"] for r in cur]).astype(np.float32),
                "task": [r.instruction for r in cur],
                "slot": np.asarray(order, dtype=np.int64),
                "episode_start": np.asarray([r.start for r in cur]),
                "episode_index": np.asarray([r.spec_index for r in cur], dtype=np.int64),
            }
            for cam in dict.fromkeys(c for r in cur for c in r.spec.extra_cameras):
                batch[image_key(cam)] = np.stack([_chw(r, cam) for r in cur])
            if privileged:
                batch["privileged"] = np.stack([r.obs["privileged"] for r in cur])
            actions = np.asarray(policy_fn(batch), dtype=np.float32)
            if actions.shape != (len(cur), 7):
                raise ValueError(f"policy_fn returned shape {actions.shape}, expected ({len(cur)}, 7)")
            for s, r, a in zip(order, cur, actions):
                if (record_frames or r.spec.record_frames) and r.obs["image"] is not None:
                    r.frames.append(_film_frame(r))
                slots[s].send(("step", a))
            for s, r in zip(order, cur):  # all workers step in parallel, then we collect
                try:
                    obs, reward, done, info = slots[s].recv(f"step {r.steps} of {r.spec.initial_state.key}")
                except WorkerError as e:
                    fail(s, r.spec_index, str(e), r)
                    start(s)
                    continue
                r.obs, r.start = obs, False
                r.instruction = info.get("instruction") or r.instruction  # long-horizon tasks change it
                r.steps += 1
                r.reward += float(reward)
                r.env_seconds += float(info.get("step_s", 0.0))
                r.success = info["success"] if r.spec.success_at_end else (r.success or info["success"])
                for name, hit in info.get("milestones", {}).items():
                    r.milestones[name] = r.milestones.get(name, False) or hit
                if "goal_distance" in info:
                    d, offset = float(info["goal_distance"]), info.get("goal_offset")
                    closer = d < r.goal_distance.get("min", math.inf)
                    r.goal_distance = {**r.goal_distance, "min": min(r.goal_distance.get("min", d), d), "final": d}
                    if offset is not None:
                        r.goal_distance["offset_final"] = offset
                        if closer:
                            r.goal_distance["offset_min"] = offset
                if "hand_offset" in info:
                    h = float(np.linalg.norm(info["hand_offset"]))
                    if h < r.hand_object.get("min", math.inf):
                        r.hand_object = {"min": h, "offset_min": info["hand_offset"]}
                if done or (r.success and r.spec.stop_on_success):
                    finish(
                        EpisodeResult(
                            task=r.spec.task,
                            key=r.spec.initial_state.key,
                            success=r.success,
                            steps=r.steps,
                            total_reward=r.reward,
                            frames=np.stack(r.frames) if r.frames else None,
                            env_seconds=r.env_seconds,
                            info={
                                "milestones": dict(r.milestones),
                                **({"goal_distance": dict(r.goal_distance)} if r.goal_distance else {}),
                                **({"hand_object": dict(r.hand_object)} if r.hand_object else {}),
                                "instruction": r.instruction,
                                **({"reset_info": r.reset_info} if r.reset_info else {}),
                            },
                        ),
                        r.spec_index,
                    )
                    del running[s]
                    start(s)
    finally:
        for slot in slots:
            slot.close()
    return [r for r in results if r is not None]
