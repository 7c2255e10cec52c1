"""Per-episode figure: the router weight against the phase labels (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_router(
    path: str | Path,
    title: str,
    router_weight: np.ndarray,
    executed_labels: np.ndarray,
    expert_labels: np.ndarray | None,
    gripper: np.ndarray | None = None,
) -> Path:
    """Write a PNG: router weight w per step (the gripper head runs where w >= 0.5), the routing label
    of the executed gripper commands, and the label of the scripted expert replayed from the same start
    (its own length: it may finish earlier or later than the policy).

    ``router_weight`` may be all NaN (expert / random / no router): then only the labels are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless; a no-op if already selected
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = np.asarray(router_weight, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(8, 2.8), dpi=100)
    try:
        t = np.arange(len(w))
        if len(w) and np.isfinite(w).any():
            ax.step(t, w, where="post", color="tab:blue", lw=1.5, label="router weight w")
            ax.axhline(0.5, color="tab:blue", lw=0.6, ls=":", label="w = 0.5 (head switch)")
        if gripper is not None and len(gripper):
            ax.step(
                np.arange(len(gripper)),
                0.02 + 0.96 * np.asarray(gripper),  # inset so it does not hide the labels at 0 and 1
                where="post",
                color="0.6",
                lw=0.8,
                label="gripper cmd (1 open)",
            )
        lab = np.asarray(executed_labels)
        if len(lab):
            ax.step(
                np.arange(len(lab)),
                lab,
                where="post",
                color="tab:orange",
                lw=1.2,
                ls="--",
                label="label (executed gripper)",
            )
        if expert_labels is not None and len(expert_labels):
            e = np.asarray(expert_labels)
            ax.fill_between(
                np.arange(len(e)),
                0,
                e,
                step="post",
                color="tab:green",
                alpha=0.25,
                label="label (expert replay)",
            )
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("router w (≥ 0.5: gripper head)\n/ label (1 = gripper phase)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out
