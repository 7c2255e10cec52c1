import math

import numpy as np
import pytest

from damvla.weighting import (
    chunk_weights,
    expert_weights,
    gripper_flips,
    labels_from_weights,
    phase_events,
    routing_labels,
    signal_events,
    trajectory_weights,
)

OPEN_THEN_CLOSED = np.r_[np.ones(20), np.zeros(20)]  # open for steps 0-19, closed from step 20 on


def test_flip_is_the_first_step_of_the_new_state():
    assert gripper_flips(OPEN_THEN_CLOSED).tolist() == [20]
    assert gripper_flips([0, 0, 1, 1, 0]).tolist() == [2, 4]
    assert gripper_flips(np.ones(5)).tolist() == []


def test_trajectory_weights_match_the_asymmetric_gaussian_by_hand():
    w = trajectory_weights(OPEN_THEN_CLOSED)
    assert w[20] == 1.0
    assert w[14] == pytest.approx(math.exp(-0.5))  # 6 steps before: sigma_lead = 6
    assert w[22] == pytest.approx(math.exp(-0.5))  # 2 steps after: sigma_trail = 2
    assert w[8] == pytest.approx(math.exp(-2.0))  # 12 steps before
    assert np.all((w >= 0) & (w <= 1))


def test_trajectory_weights_take_the_max_over_flips_and_are_zero_without_flips():
    g = np.r_[np.ones(10), np.zeros(10), np.ones(10)]
    w = trajectory_weights(g)
    assert w[10] == 1.0 and w[20] == 1.0
    assert w[15] == pytest.approx(max(math.exp(-25 / 8), math.exp(-25 / 72)))
    assert np.all(trajectory_weights(np.zeros(12)) == 0)


def test_router_label_is_one_inside_grasp_window():
    labels = routing_labels(OPEN_THEN_CLOSED)
    w = trajectory_weights(OPEN_THEN_CLOSED)
    assert labels.tolist() == (w >= 0.5).astype(int).tolist()
    assert labels[20] == 1 and labels[14] == 1 and labels[22] == 1 and labels[8] == 0 and labels[25] == 0


def test_chunk_weights_decay_geometrically():
    assert chunk_weights(4, 0.5).tolist() == [1.0, 0.5, 0.25, 0.125]
    assert chunk_weights(16)[15] == pytest.approx(0.9**15)


def test_any_phase_signal_and_more_than_two_experts():
    # A contact-force signal with no gripper flip still yields events.
    force = np.r_[np.zeros(10), np.full(5, 3.0), np.zeros(10)]
    assert signal_events(force, threshold=1.0).tolist() == [10, 15]
    # Three experts from hand-written phase labels: 0 arm, 1 grasp, 2 screw.
    phases = np.r_[np.zeros(10), np.ones(5), np.zeros(5), np.full(10, 2)].astype(int)
    ev = phase_events(phases, 3)
    assert ev[1].tolist() == [10, 15] and ev[2].tolist() == [20]
    w = expert_weights(len(phases), ev)
    assert w.shape == (30, 3)
    assert np.allclose(w[:, 0], 1 - w[:, 1:].max(axis=1))
    labels = labels_from_weights(w)
    assert labels[10] == 1 and labels[20] == 2 and labels[0] == 0


def test_two_expert_generalisation_reduces_to_the_paper():
    ev = phase_events((OPEN_THEN_CLOSED < 0.5).astype(int), 2)
    w = expert_weights(len(OPEN_THEN_CLOSED), ev)
    assert np.allclose(w[:, 1], trajectory_weights(OPEN_THEN_CLOSED))
    assert labels_from_weights(w).tolist() == routing_labels(OPEN_THEN_CLOSED).tolist()


def test_bad_signals_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        gripper_flips([1.0, np.nan, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        trajectory_weights(np.ones((3, 2)))
    with pytest.raises(ValueError, match="integers"):
        phase_events([0, 3], 2)
