"""Per-slot batched execution of a checkpoint (action queues, per-episode noise) and the random
policy's determinism, on fake batches (no simulator)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from damvla.config import preset
from damvla.evaluation.executors import CheckpointExecutor, RandomExecutor, episode_seed
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer

KEYS = ["reach-v3/seed-1000000", "reach-v3/seed-1000001", "push-v3/seed-1000000"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy() -> DAMVLAPolicy:
    torch.manual_seed(0)
    cfg = preset("tiny")
    return DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)


def batch(slots, episodes, starts, res=32):
    images = np.stack(
        [np.random.default_rng(e).integers(0, 256, (3, res, res), dtype=np.uint8) for e in episodes]
    )
    return {
        "observation.images.image": images,
        "observation.state": np.zeros((len(slots), 4), dtype=np.float32),
        "task": [f"task {e}" for e in episodes],
        "slot": np.asarray(slots, dtype=np.int64),
        "episode_start": np.asarray(starts),
        "episode_index": np.asarray(episodes, dtype=np.int64),
    }


def test_episode_seed_is_stable_and_distinct():
    assert episode_seed(0, KEYS[0]) == episode_seed(0, KEYS[0])
    assert len({episode_seed(s, k) for s in (0, 1) for k in KEYS}) == 6


def test_chunk_mode_predicts_once_per_n_steps_for_all_slots_in_one_call():
    policy = tiny_policy()
    ex = CheckpointExecutor(
        policy, KEYS, seed=0, inference=replace(policy.config.inference, execution="chunk", execute_steps=4)
    )
    for t in range(8):
        a = ex(batch([0, 1], [0, 1], [t == 0, t == 0]))
        assert a.shape == (2, 7) and set(np.unique(a[:, 6])) <= {0.0, 1.0}
    assert ex.calls == 2  # steps 0 and 4, both slots in one forward each
    assert len(ex.logs[0].router_weight) == 8 and all(0 < w < 1 for w in ex.logs[0].router_weight)
    # A new episode in slot 1 mid-chunk resets that slot's queue: it predicts at once, slot 0 does not.
    ex(batch([0, 1], [0, 2], [False, True]))
    assert ex.calls == 3


def test_ensemble_modes_predict_every_step():
    policy = tiny_policy()
    for mode in ("adaptive_ensemble", "temporal_ensemble"):
        ex = CheckpointExecutor(
            policy, KEYS, seed=0, inference=replace(policy.config.inference, execution=mode)
        )
        for t in range(3):
            ex(batch([0], [0], [t == 0]))
        assert ex.calls == 3


def test_an_episode_gets_the_same_actions_alone_or_batched_with_others():
    """Noise is drawn per episode, so batch composition (worker count, timing) does not change it."""
    policy = tiny_policy()
    inf = replace(policy.config.inference, execution="chunk", execute_steps=2)
    alone = CheckpointExecutor(policy, KEYS, seed=7, inference=inf)
    mixed = CheckpointExecutor(policy, KEYS, seed=7, inference=inf)
    a_alone = [alone(batch([0], [1], [t == 0]))[0] for t in range(4)]
    a_mixed = [mixed(batch([0, 1], [2, 1], [t == 0, t == 0]))[1] for t in range(4)]
    np.testing.assert_allclose(np.stack(a_alone), np.stack(a_mixed), atol=1e-4)
    np.testing.assert_allclose(alone.logs[1].router_weight, mixed.logs[1].router_weight, atol=1e-5)
    other_seed = CheckpointExecutor(policy, KEYS, seed=8, inference=inf)
    a_other = [other_seed(batch([0], [1], [t == 0]))[0] for t in range(4)]
    assert not np.allclose(np.stack(a_alone)[:, :6], np.stack(a_other)[:, :6])


def test_random_policy_depends_on_seed_and_episode_not_on_slot_or_batch():
    one = RandomExecutor(KEYS, seed=3)
    two = RandomExecutor(KEYS, seed=3)
    a = np.stack([one(batch([0], [2], [t == 0]))[0] for t in range(5)])
    b = np.stack([two(batch([0, 1], [0, 2], [t == 0, t == 0]))[1] for t in range(5)])
    np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(a[:, :6]) <= 1) and np.all((a[:, 6] >= 0) & (a[:, 6] <= 1))
    assert np.isnan(one.logs[2].router_weight).all() and one.logs[2].head == [-1] * 5
