"""Typed training configuration. ``RunConfig`` = policy config + training config: the whole run, saved as
``train_config.json`` in every checkpoint and enough to rebuild the run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from damvla.config import PolicyConfig

FREEZE_STAGES = ("full", "vision", "llm", "heads_only")
SCHEDULES = ("cosine", "constant")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    """Everything about the optimisation run (the architecture lives in ``PolicyConfig``)."""

    dataset: str = ""
    out: str = ""
    preset: str = "tiny"
    ablation: str | None = None
    overrides: list[str] = field(default_factory=list)  # dotted PolicyConfig overrides, kept for the record
    # A damvla checkpoint folder whose architecture and weights start the run (e.g. `damvla convert cogact`
    # output); preset and ablation then come from it. The dataset's normalisation stats replace its own.
    init: str | None = None
    steps: int = 1000  # total optimiser steps of the run (a resumed run stops here too)
    batch_size: int = 8  # per device and micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100  # linear warm-up steps
    schedule: str = "cosine"
    weight_decay: float = 0.0  # applied to matrices only (not norms, biases, tokens)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema: float | None = None  # EMA decay of the trainable weights; the exported policy then holds the EMA
    freeze: str = "full"  # full | vision | llm | heads_only (see damvla.training.arguments.FREEZE_HELP)
    lora: int = 0  # LoRA rank on the LLM's linear layers; 0 = off
    lora_alpha: float | None = None  # default 2 * rank
    save_every: int = 1000
    keep_last: int = 3
    # DataLoader workers per process; None = 0 when training on cached features or on a machine with at
    # most 4 cores (workers beside the compute threads oversubscribe it), else 4.
    num_workers: int | None = None
    # Torch compute threads per process; None = the cores divided by the local processes.
    threads: int | None = None
    # Episodes shuffled together (EpisodeBlockSampler); None = resolved when the run starts: all of them
    # (a full shuffle) when the frames come from the feature cache or fit the decoded-frame cache, else 8.
    block_episodes: int | None = None
    # Frozen vision towers: "auto" computes their features once per frame into the default cache folder
    # ($DAMVLA_FEATURE_CACHE or ~/.cache/damvla/features), a path picks the folder, "off" runs them online.
    feature_cache: str = "auto"
    # Held-out episodes (evenly spaced over the dataset) for validation loss and open-loop action error,
    # computed every val_every steps and at the end; 0 = no validation.
    val_episodes: int = 0
    val_every: int = 500
    seed: int = 0
    parallel: str = "ddp"  # with several processes: ddp | fsdp (FSDP2, fully_shard)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 10
    wandb: bool = False
    # Image augmentation (damvla.training.augment), drawn per sample: random shift as a fraction of the image
    # side, and colour-jitter strength. Off by default, as in CogACT's recipe; an option for small datasets.
    aug_shift: float = 0.0
    aug_color: float = 0.0
    # With a frozen tower's feature cache: features of this many views per frame are cached (the frame and
    # aug_views - 1 augmented copies; damvla.training.feature_cache), each sample reading one. 0: none.
    aug_views: int = 0

    def validate(self) -> TrainConfig:
        errs = []
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
            if getattr(self, name) < 1:
                errs.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup < 0 or (self.num_workers or 0) < 0 or self.lora < 0 or self.keep_last < 1:
            errs.append("warmup, num_workers and lora must be >= 0; keep_last >= 1")
        if self.threads is not None and self.threads < 1:
            errs.append(f"threads={self.threads} must be >= 1")
        if self.block_episodes is not None and self.block_episodes < 1:
            errs.append(f"block_episodes={self.block_episodes} must be >= 1")
        if self.val_episodes < 0 or self.val_every < 1:
            errs.append("val_episodes must be >= 0 and val_every >= 1")
        if self.lr <= 0:
            errs.append(f"lr={self.lr} must be > 0")
        if self.schedule not in SCHEDULES:
            errs.append(f"schedule={self.schedule!r}: expected one of {SCHEDULES}")
        if self.freeze not in FREEZE_STAGES:
            errs.append(f"freeze={self.freeze!r}: expected one of {FREEZE_STAGES}")
        if self.parallel not in PARALLEL:
            errs.append(f"parallel={self.parallel!r}: expected one of {PARALLEL}")
        if self.precision not in ("auto", "bf16", "fp32"):
            errs.append(f"precision={self.precision!r}: expected auto|bf16|fp32")
        if not 0.0 <= self.aug_shift <= 0.25 or not 0.0 <= self.aug_color < 1.0:
            errs.append(f"aug_shift={self.aug_shift} must be in [0, 0.25] and aug_color={self.aug_color} in [0, 1)")
        if self.aug_views < 0 or self.aug_views == 1:
            errs.append(f"aug_views={self.aug_views}: 0 (none) or >= 2 (the frame and its augmented copies)")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            errs.append(f"ema={self.ema}: the decay must be in (0, 1)")
        if errs:
            raise ValueError("invalid training config: " + "; ".join(errs))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"train config: unknown keys {sorted(unknown)}")
        d = dict(d)
        # Runs saved before augmentation existed trained without it; resuming them must not switch it on.
        d.setdefault("aug_shift", 0.0)
        d.setdefault("aug_color", 0.0)
        d.setdefault("aug_views", 0)
        # Runs saved before these fields existed: online vision, no validation.
        d.setdefault("feature_cache", "off")
        d.setdefault("val_episodes", 0)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d).validate()


@dataclass
class RunConfig:
    policy: PolicyConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy.to_dict(), "train": self.train.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if set(d) != {"policy", "train"}:
            raise ValueError(f"run config: expected keys 'policy' and 'train', got {sorted(d)}")
        return cls(PolicyConfig.from_dict(d["policy"]).validate(), TrainConfig.from_dict(d["train"]))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
