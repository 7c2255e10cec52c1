"""What a user watches: TensorBoard (OUT/tb), optional wandb, OUT/metrics.jsonl, and OUT/loss_curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BAR_KEYS = ("loss", "loss_arm", "loss_gripper", "loss_action", "loss_router", "loss_env_state", "router_acc")


class Smoother:
    """Exponential moving average of each logged value, for the progress bar."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta, self.values, self.n = beta, {}, 0

    def update(self, logs: dict[str, float]) -> dict[str, float]:
        self.n += 1
        for k, v in logs.items():
            prev = self.values.get(k, v)
            self.values[k] = self.beta * prev + (1 - self.beta) * v
        return dict(self.values)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. A torn last line (the process died mid-write) is dropped with a
    note, so a crash never blocks a resume; a bad line before it is corruption and a ``ValueError``
    naming the file and line."""
    lines = path.read_text().splitlines()
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                print(f"note: {path}: line {i} is cut short (the run stopped mid-write); dropped it", flush=True)
                break
            raise ValueError(f"{path}: line {i} is not a JSON record ({e}); fix or delete that line") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    return rows


class MetricLogger:
    """Rank 0 only. Appends to metrics.jsonl (so a resumed run continues the same file)."""

    def __init__(self, out: Path, run_config: dict[str, Any], use_wandb: bool, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out = out
        self.tb = SummaryWriter(str(out / "tb"), purge_step=resumed_step if resumed_step else None)
        self.jsonl_path = out / "metrics.jsonl"
        if resumed_step and self.jsonl_path.is_file():
            # drop records past the checkpoint we resume from (they will be redone)
            keep = [r for r in read_metrics(self.jsonl_path) if r.get("step", 0) <= resumed_step]
            self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self.jsonl = open(self.jsonl_path, "a")
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                print("warning: --wandb given but wandb is not installed; logging to TensorBoard only")
            else:
                self.wandb = wandb.init(project="damvla", dir=str(out), config=run_config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(jsonl: Path, png: Path, title: str | None = None) -> Path | None:
    """Loss curves from metrics.jsonl (one panel per term, raw and smoothed) -> PNG. None when empty.

    ``title`` defaults to the run folder's name (``jsonl``'s parent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl) if jsonl.is_file() else []
    # A resumed run logs the steps after its checkpoint again: keep the last record of each step.
    # A validation record shares its step with that step's training record: keep one of each kind.
    rows = list({(r["step"], "val_loss" in r): r for r in rows if "step" in r}.values())
    rows.sort(key=lambda r: r["step"])
    keys = [k for k in (*BAR_KEYS, "lr", "grad_norm") if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.4, label="raw (logged values)")
        # Centred moving average: unlike an EMA it does not lag behind the raw curve.
        half = max(1, len(ys) // 40)
        sm = [sum(ys[max(0, i - half) : i + half + 1]) / len(ys[max(0, i - half) : i + half + 1]) for i in range(len(ys))]
        ax.plot(xs, sm, lw=1.5, label="smoothed (centred moving average)")
        ax.set_ylabel(k)
        if k.startswith("loss") and min(ys) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(loc="upper right", fontsize=7, framealpha=0.8)  # the same two lines in every panel
    last = rows[-1]["step"]
    fig.suptitle(f"{title or jsonl.resolve().parent.name}: training curves to step {last}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
