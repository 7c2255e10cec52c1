"""Closed-loop rollout harness (damvla.envs.rollout) with the scripted expert as the policy."""

from __future__ import annotations

import numpy as np
import pytest

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

from damvla.envs.metaworld import MetaWorldEnv, initial_state_seeds  # noqa: E402
from damvla.envs.rollout import RolloutSpec, rollout  # noqa: E402

pytestmark = pytest.mark.sim


def eval_specs(task: str, n: int, **kw) -> list[RolloutSpec]:
    env = MetaWorldEnv(task, render=False)
    try:
        return [RolloutSpec(task, env.sample_initial_state(s), **kw) for s in initial_state_seeds("eval", n)]
    finally:
        env.close()


def test_rollout_batches_all_running_episodes_and_reports_each():
    specs = eval_specs("reach-v3", 3, resolution=32, max_steps=30)
    seen = []

    def policy(batch):
        seen.append(batch)
        b = len(batch["task"])
        assert batch["observation.images.image"].shape == (b, 3, 32, 32)
        assert batch["observation.images.image"].dtype == np.uint8
        return np.tile(np.array([0, 0, 0.5, 0, 0, 0, 1], dtype=np.float32), (b, 1))

    results = rollout(policy, specs, num_workers=2, record_frames=True)
    assert [r.key for r in results] == [s.initial_state.key for s in specs]
    assert all(r.steps == 30 and not r.success for r in results)  # moving up never reaches the goal
    assert results[0].frames.shape == (30, 32, 32, 3)
    assert len(seen[0]["task"]) == 2 and seen[0]["episode_start"].all()  # two workers, one batch
    assert sum(b["episode_start"].sum() for b in seen) == 3


def test_rollout_counts_success_of_a_policy_that_solves_the_task():
    """The expert, fed only what a policy sees plus privileged state from a side env, succeeds."""
    from damvla.envs.metaworld import MetaWorldExpert

    specs = eval_specs("reach-v3", 2, resolution=32)
    shadow = {i: MetaWorldEnv("reach-v3", render=False) for i in range(2)}
    expert = MetaWorldExpert("reach-v3")
    last = {}

    def policy(batch):
        out = []
        for slot, idx, start in zip(batch["slot"], batch["episode_index"], batch["episode_start"]):
            env = shadow[int(slot)]
            if start:
                last[int(slot)] = env.reset(specs[int(idx)].initial_state)
            a = expert.act(last[int(slot)])
            last[int(slot)], *_ = env.step(a)  # keep the shadow env in lock-step with the worker
            out.append(a)
        return np.stack(out)

    try:
        results = rollout(policy, specs, num_workers=0)
    finally:
        for e in shadow.values():
            e.close()
    assert all(r.success for r in results) and all(r.steps < 100 for r in results)


def test_phase_flags_show_how_far_an_episode_got():
    """The expert reaches, grasps and places; a policy that only rises reaches nothing."""
    from damvla.envs.metaworld import MetaWorldExpert

    specs = eval_specs("pick-place-v3", 1, render=False)
    scripted = MetaWorldExpert("pick-place-v3")

    def expert(batch):
        return np.stack([scripted.act({"privileged": p}) for p in batch["privileged"]])

    done = rollout(expert, specs, num_workers=0, privileged=True)
    assert done[0].success and done[0].info["milestones"] == {"reached": True, "grasped": True}
    up = rollout(lambda b: np.tile(np.array([0, 0, 1, 0, 0, 0, 1], np.float32), (len(b["task"]), 1)),
                 eval_specs("pick-place-v3", 1, render=False, max_steps=40), num_workers=1)  # fmt: skip
    assert not up[0].success and up[0].info["milestones"] == {"reached": False, "grasped": False}
    # How close each came: the expert brings the object within Meta-World's 7 cm of the goal; rising alone
    # never moves it, so its closest and final distances are the starting one.
    assert done[0].info["goal_distance"]["min"] <= 0.07
    start = specs[0].initial_state.data
    d0 = float(np.linalg.norm(np.subtract(start["obj_init_pos"], start["goal_pos"])))
    assert up[0].info["goal_distance"]["min"] == pytest.approx(d0, abs=0.005)
    assert up[0].info["goal_distance"]["final"] == pytest.approx(d0, abs=0.005)
    # Where the hand went (the end effector of observation.state, a little above the fingertips): the expert's
    # grasps the puck; rising from the start moves it away, so its closest approach is the first step's, above
    # the puck (hand minus object: z > 0).
    assert done[0].info["hand_object"]["min"] < 0.05
    ho = up[0].info["hand_object"]
    assert np.linalg.norm(ho["offset_min"]) == pytest.approx(ho["min"], abs=1e-9)
    assert ho["min"] > 0.05 and ho["offset_min"][2] > 0.05
