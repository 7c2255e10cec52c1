"""Per-episode failure handling of the rollout harness: a failing env or a dead worker costs one
episode (recorded with ``error``), never the run."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

from damvla.envs.base import InitialState  # noqa: E402
from damvla.envs.metaworld import MetaWorldEnv, initial_state_seeds  # noqa: E402
from damvla.envs.rollout import RolloutSpec, rollout  # noqa: E402

pytestmark = pytest.mark.sim

UP = np.array([0, 0, 0.5, 0, 0, 0, 1], dtype=np.float32)  # never solves reach: every episode runs out


def specs(n: int, **kw) -> list[RolloutSpec]:
    env = MetaWorldEnv("reach-v3", render=False)
    try:
        states = [env.sample_initial_state(s) for s in initial_state_seeds("eval", n)]
    finally:
        env.close()
    return [RolloutSpec("reach-v3", s, resolution=32, max_steps=10, **kw) for s in states]


def test_env_error_at_reset_is_recorded_and_the_other_episodes_complete():
    good = specs(2)
    broken = RolloutSpec(
        "reach-v3", InitialState("metaworld_v3", "reach-v3", 1_000_099, {}), resolution=32, max_steps=10
    )
    results = rollout(lambda b: np.tile(UP, (len(b["task"]), 1)), [good[0], broken, good[1]], num_workers=0)
    assert [r.key for r in results] == [
        good[0].initial_state.key,
        broken.initial_state.key,
        good[1].initial_state.key,
    ]
    assert results[1].error is not None and "rand_vec" in results[1].error and not results[1].success
    assert results[1].steps == 0
    assert all(r.error is None and r.steps == 10 for r in (results[0], results[2]))


def test_a_worker_killed_mid_episode_costs_that_episode_only_and_is_restarted():
    sp = specs(4)
    calls = {"n": 0, "killed": None}

    def policy(batch):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-episode: kill one worker process outright (like a simulator segfault)
            victim = sorted(mp.active_children(), key=lambda p: p.pid)[0]
            calls["killed"] = victim.pid
            os.kill(victim.pid, signal.SIGKILL)
        return np.tile(UP, (len(batch["task"]), 1))

    results = rollout(policy, sp, num_workers=2, timeout_s=60)
    assert calls["killed"] is not None
    assert len(results) == 4
    errors = [r for r in results if r.error is not None]
    assert len(errors) == 1 and "died" in errors[0].error and errors[0].steps == 2
    assert all(r.steps == 10 for r in results if r.error is None)  # the rest ran to the time limit
