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
| ``observation.state`` | float32 (B, S) | proprio state |
| ``task`` | list[str] | instruction of each episode |
| ``slot`` | int64 (B,) | worker slot; stable for the whole episode |
| ``episode_start`` | bool (B,) | True on an episode's first step: reset per-slot policy state (action queues) |
| ``episode_index`` | int64 (B,) | index into ``specs`` |

Only Meta-World is wired in (``simulator="metaworld_v3"``); another simulator plugs in through
``make_env``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from damvla.envs.base import Env, InitialState

PolicyFn = Callable[[dict[str, Any]], np.ndarray]


@dataclass(frozen=True)
class RolloutSpec:
    """One evaluation episode: the task, its exact initial state and the env settings."""

    task: str
    initial_state: InitialState
    camera: str | None = None  # None: the simulator's default
    resolution: int = 128
    max_steps: int | None = None  # None: the simulator's default time limit
    stop_on_success: bool = True  # benchmarks count the first success; stop there


@dataclass
class EpisodeResult:
    """Outcome of one spec. ``frames`` (uint8 (T, H, W, 3), upright) only with ``record_frames``."""

    task: str
    key: str
    success: bool
    steps: int
    total_reward: float
    frames: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def make_env(spec: RolloutSpec) -> Env:
    """Build the env of ``spec`` (dispatch on ``spec.initial_state.simulator``)."""
    sim = spec.initial_state.simulator
    if sim == "metaworld_v3":
        from damvla.envs.metaworld import DEFAULT_CAMERA, MetaWorldEnv

        return MetaWorldEnv(spec.task, spec.camera or DEFAULT_CAMERA, spec.resolution, spec.max_steps)
    raise ValueError(f"rollout: no env for simulator {sim!r} (episode {spec.initial_state.key})")


# ---- workers -------------------------------------------------------------------------------------
class _EnvHost:
    """Owns one env (rebuilt when the settings change) and answers reset/step requests."""

    def __init__(self) -> None:
        self.env: Env | None = None
        self.env_key: tuple[Any, ...] | None = None

    def handle(self, msg: tuple[Any, ...]) -> Any:
        kind = msg[0]
        if kind == "reset":
            spec: RolloutSpec = msg[1]
            key = (spec.initial_state.simulator, spec.task, spec.camera, spec.resolution, spec.max_steps)
            if self.env is None or self.env_key != key:
                self.close()
                self.env, self.env_key = make_env(spec), key
            obs = self.env.reset(spec.initial_state)
            return _slim(obs), self.env.instruction
        if kind == "step":
            assert self.env is not None, "step before reset"
            obs, reward, done, info = self.env.step(msg[1])
            return _slim(obs), reward, done, {"success": bool(info["success"])}
        raise ValueError(f"rollout worker: unknown request {kind!r}")

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


def _slim(obs: dict[str, Any]) -> dict[str, Any]:
    """Drop privileged simulator state: a policy never sees it, and it need not cross processes."""
    return {"image": obs["image"], "state": obs["state"]}


def _worker_main(conn: Connection) -> None:
    os.environ.setdefault("LP_NUM_THREADS", "1")  # one raster thread per worker process
    os.environ.setdefault("MUJOCO_GL", "egl")
    host = _EnvHost()
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


class _Slot:
    """A worker process (``proc=True``) or an in-process env host, behind one send/recv API."""

    def __init__(self, index: int, proc: bool) -> None:
        self.index = index
        self._host: _EnvHost | None = None
        self._reply: Any = None
        self._proc: Any = None
        if proc:
            ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited GL context or MuJoCo state
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            self._proc.start()
            child.close()
        else:
            self._host = _EnvHost()

    def send(self, msg: tuple[Any, ...]) -> None:
        if self._host is not None:
            try:
                self._reply = ("ok", self._host.handle(msg))
            except Exception as e:
                self._reply = ("error", f"{type(e).__name__}: {e}")
        else:
            self._conn.send(msg)

    def recv(self, what: str) -> Any:
        if self._host is not None:
            status, payload = self._reply
        else:
            try:
                status, payload = self._conn.recv()
            except EOFError as e:
                raise RuntimeError(f"rollout worker {self.index} died during {what}") from e
        if status != "ok":
            raise RuntimeError(f"rollout worker {self.index} failed during {what}: {payload}")
        return payload

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
        elif self._proc is not None:
            try:
                self._conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()


# ---- main loop -----------------------------------------------------------------------------------
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
    frames: list[np.ndarray] = field(default_factory=list)


def rollout(
    policy_fn: PolicyFn,
    specs: list[RolloutSpec],
    num_workers: int = 2,
    record_frames: bool = False,
    progress: Callable[[EpisodeResult], None] | None = None,
) -> list[EpisodeResult]:
    """Run every spec to the end with ``policy_fn`` and return one result per spec, in spec order.

    ``num_workers=0`` runs one env in this process (debugging, tests). ``progress`` is called with each
    finished episode. An episode ends at its first success (``stop_on_success``) or its time limit.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if not specs:
        return []
    n = min(max(num_workers, 1), len(specs))
    slots = [_Slot(i, proc=num_workers > 0) for i in range(n)]
    results: list[EpisodeResult | None] = [None] * len(specs)
    running: dict[int, _Running] = {}
    pending = list(range(len(specs)))[::-1]  # pop() takes the next spec in order

    def start(slot: _Slot) -> None:
        i = pending.pop()
        slot.send(("reset", specs[i]))
        obs, instruction = slot.recv(f"reset of {specs[i].initial_state.key}")
        running[slot.index] = _Running(i, specs[i], obs, instruction)

    try:
        for slot in slots:  # resets are sequential once; env construction dominates and is one-off
            if pending:
                start(slot)
        while running:
            order = sorted(running)
            cur = [running[s] for s in order]
            batch = {
                "observation.images.image": np.stack([r.obs["image"].transpose(2, 0, 1) for r in cur]),
                "observation.state": np.stack([r.obs["state"] for r in cur]).astype(np.float32),
                "task": [r.instruction for r in cur],
                "slot": np.asarray(order, dtype=np.int64),
                "episode_start": np.asarray([r.start for r in cur]),
                "episode_index": np.asarray([r.spec_index for r in cur], dtype=np.int64),
            }
            actions = np.asarray(policy_fn(batch), dtype=np.float32)
            if actions.shape != (len(cur), 7):
                raise ValueError(f"policy_fn returned shape {actions.shape}, expected ({len(cur)}, 7)")
            for s, r, a in zip(order, cur, actions):
                if record_frames:
                    r.frames.append(r.obs["image"])
                slots[s].send(("step", a))
            for s, r in zip(order, cur):  # all workers step in parallel, then we collect
                obs, reward, done, info = slots[s].recv(f"step {r.steps} of {r.spec.initial_state.key}")
                r.obs, r.start = obs, False
                r.steps += 1
                r.reward += float(reward)
                r.success = r.success or info["success"]
                if done or (r.success and r.spec.stop_on_success):
                    res = EpisodeResult(
                        task=r.spec.task,
                        key=r.spec.initial_state.key,
                        success=r.success,
                        steps=r.steps,
                        total_reward=r.reward,
                        frames=np.stack(r.frames) if record_frames and r.frames else None,
                    )
                    results[r.spec_index] = res
                    del running[s]
                    if progress is not None:
                        progress(res)
                    if pending:
                        start(slots[s])
    finally:
        for slot in slots:
            slot.close()
    return [r for r in results if r is not None]
