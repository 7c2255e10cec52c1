"""Dual-scale action weighting and routing labels (METHOD.md §3-4). Pure numpy, no torch.

The paper derives everything from gripper flips. The review's main criticism is that contact-rich
phases without a flip (screw, wipe, push) stay invisible, so every function here also accepts *any*
per-step phase signal (contact force, end-effector speed, hand-written labels) and any number of experts:

- ``signal_events`` turns a scalar per-step signal into event times (threshold crossings);
- ``phase_events`` turns integer phase labels (0 = default expert) into per-expert entry times;
- ``expert_weights`` turns per-expert event times into a (T, K) soft assignment, column 0 the default;
- ``labels_from_weights`` gives the per-step router label (argmax, default expert on ties below 0.5).

For the paper's two experts (arm = 0, gripper = 1) these reduce exactly to ``trajectory_weights`` and
``routing_labels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "gripper_flips",
    "signal_events",
    "asymmetric_gaussian",
    "trajectory_weights",
    "routing_labels",
    "chunk_weights",
    "phase_events",
    "expert_weights",
    "labels_from_weights",
]


def _as_1d(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D per-step array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        bad = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name}: non-finite value at step {bad}")
    return a


def signal_events(signal: np.ndarray | Sequence[float], threshold: float = 0.5) -> np.ndarray:
    """Steps t where ``signal > threshold`` differs from step t-1: the first step of the new state.

    Works for any scalar per-step signal (gripper opening, contact force norm, a 0/1 phase flag).
    """
    s = _as_1d(signal, "signal") > threshold
    return (np.flatnonzero(s[1:] != s[:-1]) + 1).astype(np.int64)


def gripper_flips(gripper: np.ndarray | Sequence[float], threshold: float = 0.5) -> np.ndarray:
    """Flip times t_k of the binarised gripper state (``gripper > threshold``)."""
    return signal_events(gripper, threshold)


def asymmetric_gaussian(
    num_steps: int, events: np.ndarray | Sequence[int], sigma_lead: float = 6.0, sigma_trail: float = 2.0
) -> np.ndarray:
    """w(s) = max_k exp(-(s - t_k)^2 / (2 sigma^2)), sigma_lead before t_k, sigma_trail from t_k on.

    Returns a float array of length ``num_steps`` in [0, 1]: 1 at every event, 0 everywhere without events.
    """
    if sigma_lead <= 0 or sigma_trail <= 0:
        raise ValueError(f"sigmas must be positive, got sigma_lead={sigma_lead}, sigma_trail={sigma_trail}")
    ev = np.asarray(events, dtype=np.float64).reshape(-1)
    if ev.size == 0:
        return np.zeros(num_steps, dtype=np.float64)
    s = np.arange(num_steps, dtype=np.float64)[:, None]  # (T, 1)
    d = s - ev[None, :]  # (T, E)
    sigma = np.where(d < 0, sigma_lead, sigma_trail)
    return np.exp(-(d**2) / (2 * sigma**2)).max(axis=1)


def trajectory_weights(
    gripper: np.ndarray | Sequence[float],
    sigma_lead: float = 6.0,
    sigma_trail: float = 2.0,
    threshold: float = 0.5,
) -> np.ndarray:
    """Trajectory-level weight w^t of every step of one episode (the gripper head's share)."""
    g = _as_1d(gripper, "gripper")
    return asymmetric_gaussian(len(g), gripper_flips(g, threshold), sigma_lead, sigma_trail)


def routing_labels(gripper: np.ndarray | Sequence[float], **kw: float) -> np.ndarray:
    """Router label per step: 1 (gripper phase) where w^t >= 0.5, else 0 (arm phase)."""
    return (trajectory_weights(gripper, **kw) >= 0.5).astype(np.int64)


def chunk_weights(horizon: int, gamma: float = 0.9) -> np.ndarray:
    """Action-chunk weight w^a(j) = gamma**j for j = 0..horizon-1."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    return gamma ** np.arange(horizon, dtype=np.float64)


# ---- K experts, any phase signal ----------------------------------------------------------------
def phase_events(phases: np.ndarray | Sequence[int], num_experts: int) -> list[np.ndarray]:
    """Per expert k, the steps where integer phase labels switch *into* k (or out of it for k's end).

    ``phases[t]`` in [0, num_experts) is a hand-written or detected phase; 0 is the default expert
    (the arm). For each expert k >= 1 the events are the steps where the label enters or leaves k, so a
    0/1 phase column reproduces ``signal_events`` on that column. Entry 0 of the result is empty.
    """
    p = np.asarray(phases)
    if p.ndim != 1:
        raise ValueError(f"phases: expected a 1-D per-step array, got shape {p.shape}")
    if p.size and (p.min() < 0 or p.max() >= num_experts or not np.all(p == np.round(p))):
        raise ValueError(f"phases: expected integers in [0, {num_experts}), got range [{p.min()}, {p.max()}]")
    p = p.astype(np.int64)
    out = [np.zeros(0, dtype=np.int64)]
    for k in range(1, num_experts):
        out.append(signal_events((p == k).astype(np.float64), 0.5))
    return out


def expert_weights(
    num_steps: int,
    events: Sequence[np.ndarray | Sequence[int]],
    sigma_lead: float = 6.0,
    sigma_trail: float = 2.0,
) -> np.ndarray:
    """(T, K) soft expert assignment from per-expert event times; ``events[0]`` (default expert) unused.

    Column k >= 1 is the asymmetric Gaussian around expert k's events; column 0 is 1 minus the largest
    other column, so for two experts the result is ``[1 - w^t, w^t]``.
    """
    k = len(events)
    if k < 2:
        raise ValueError(f"expert_weights needs at least 2 experts, got {k}")
    w = np.zeros((num_steps, k), dtype=np.float64)
    for i in range(1, k):
        w[:, i] = asymmetric_gaussian(num_steps, events[i], sigma_lead, sigma_trail)
    w[:, 0] = 1.0 - w[:, 1:].max(axis=1)
    return w


def labels_from_weights(weights: np.ndarray) -> np.ndarray:
    """Per-step router label from (T, K) expert weights: the strongest non-default expert where its
    weight is >= 0.5, else 0. For two experts this is exactly ``routing_labels``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"weights: expected (T, K>=2), got shape {w.shape}")
    best = w[:, 1:].argmax(axis=1) + 1
    return np.where(w[:, 1:].max(axis=1) >= 0.5, best, 0).astype(np.int64)
