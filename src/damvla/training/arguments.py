"""`damvla train`'s command line, kept free of torch so a bad argument is refused at once (the training
code, and torch with it, is imported only when the command runs: ``RUN_MODULE``)."""

from __future__ import annotations

import argparse

from damvla.config import ABLATIONS, PRESETS
from damvla.training.config import FREEZE_STAGES, PARALLEL, SCHEDULES, TrainConfig

RUN_MODULE = "damvla.train"
FREEZE_HELP = (
    "full: everything trains; vision: both vision encoders frozen; llm: vision encoders and the LLM frozen "
    "(projector, router, heads train; LoRA adapters train when --lora is set); heads_only: only the DiT heads "
    "and the router train"
)

# CLI flag -> TrainConfig field. None defaults let us tell "given" from "default" (matters on resume).
FLAGS = {
    "steps": "steps", "batch_size": "batch_size", "grad_accum": "grad_accum", "lr": "lr", "warmup": "warmup",
    "schedule": "schedule", "ema": "ema", "freeze": "freeze", "lora": "lora", "save_every": "save_every",
    "keep_last": "keep_last", "num_workers": "num_workers", "seed": "seed", "wandb": "wandb",
    "parallel": "parallel", "precision": "precision", "log_every": "log_every", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "dataset": "dataset", "out": "out", "preset": "preset", "ablation": "ablation",
    "aug_shift": "aug_shift", "aug_color": "aug_color", "aug_views": "aug_views", "threads": "threads", "feature_cache": "feature_cache",
    "val_episodes": "val_episodes", "val_every": "val_every", "init": "init",
}  # fmt: skip

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"model size (default {d.preset})")
    p.add_argument("--dataset", default=None,
                   help="LeRobot v3.0 dataset folder, or a Hugging Face dataset id namespace/name[@revision] "
                        "(downloaded into the Hugging Face cache; HF_HUB_OFFLINE=1: cache only)")  # fmt: skip
    p.add_argument("--out", default=None, help="run folder: checkpoints/, tb/, metrics.jsonl, loss_curves.png")
    p.add_argument("--steps", type=int, default=None, help=f"TOTAL optimiser steps of the run, also when resuming (default {d.steps})")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint folder: continue that run exactly")
    p.add_argument("--allow-dataset-change", action="store_true",
                   help="with --resume: continue the run on a dataset whose contents differ from the run's")  # fmt: skip
    p.add_argument("--ablation", choices=sorted(ABLATIONS), default=None, help="a named row of the paper's Table VI")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this damvla checkpoint's architecture and weights (e.g. `damvla convert cogact` "
                        "output) instead of --preset; each process holds only its share when --parallel fsdp")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help=f"per device and micro-step (default {d.batch_size})")
    p.add_argument("--grad-accum", type=int, default=None, help=f"micro-steps per optimiser step (default {d.grad_accum})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=int, default=None, help=f"linear warm-up steps (default {d.warmup})")
    p.add_argument("--schedule", choices=SCHEDULES, default=None, help=f"after warm-up (default {d.schedule})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW, matrices only (default {d.weight_decay})")
    p.add_argument("--grad-clip", type=float, default=None, help=f"max grad norm, 0 = off (default {d.grad_clip})")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an EMA of the weights; checkpoints then export the EMA weights")  # fmt: skip
    p.add_argument("--freeze", choices=FREEZE_STAGES, default=None, help=FREEZE_HELP + f" (default {d.freeze})")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="LoRA rank on the LLM (peft); 0 = off")
    p.add_argument("--save-every", type=int, default=None, help=f"steps between checkpoints (default {d.save_every})")
    p.add_argument("--keep-last", type=int, default=None, help=f"checkpoints kept (default {d.keep_last})")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per process (default: 0 on cached features or <= 4 cores, else 4)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads per process (default: the cores divided by the local processes)")
    p.add_argument("--feature-cache", default=None, metavar="auto|off|DIR",
                   help="frozen vision towers: cache their features once per frame (auto: $DAMVLA_FEATURE_CACHE or "
                        "~/.cache/damvla/features; a folder; off: run them online) (default auto)")
    p.add_argument("--val-episodes", type=int, default=None,
                   help="hold out this many episodes for validation loss and open-loop action error (default 0)")
    p.add_argument("--val-every", type=int, default=None, help=f"steps between validations (default {d.val_every})")
    p.add_argument("--seed", type=int, default=None, help=f"init, data order and diffusion draws (default {d.seed})")
    p.add_argument("--parallel", choices=PARALLEL, default=None, help="with several processes: ddp (default) or fsdp (FSDP2)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default=None, help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--log-every", type=int, default=None, help=f"steps between log records (default {d.log_every})")
    p.add_argument("--aug-shift", type=float, default=None, metavar="FRAC",
                   help=f"random image shift, fraction of the side; 0 = off (default {d.aug_shift})")
    p.add_argument("--aug-color", type=float, default=None, metavar="STRENGTH",
                   help=f"colour jitter (brightness, contrast, saturation); 0 = off (default {d.aug_color})")
    p.add_argument("--aug-views", type=int, default=None, metavar="K",
                   help="with cached frozen features: cache K views per frame, the frame and K-1 copies augmented by "
                        "--aug-shift/--aug-color, each sample reading one (default: no augmentation with a cache)")
    p.add_argument("--wandb", action="store_true", default=None, help="also log to Weights & Biases (if installed)")
    p.add_argument("overrides", nargs="*", help="dotted policy-config overrides, e.g. dit.depth=4 action_dim=4")


