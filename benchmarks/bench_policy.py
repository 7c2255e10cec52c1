"""Policy throughput on the CPU: training samples/s and inference ms per action chunk.

Training: forward + backward + AdamW step on synthetic batches with the docs/CONTRACTS.md keys (batch 32
by default). Inference: ``predict_action_chunk`` at batch 1 (the reference path, not FastPolicy). Both
are medians over timed repetitions after untimed warm-up (the first steps pay for oneDNN primitive
creation and allocator growth and are several times slower). DAM-VLA and the CogACT ablation side by side.

    python benchmarks/bench_policy.py
    python benchmarks/bench_policy.py --preset small --train-batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from damvla.config import PRESETS, PolicyConfig, preset
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer


def synthetic_batch(cfg: PolicyConfig, b: int, seed: int = 0) -> dict[str, Any]:
    """A training batch with every key of docs/CONTRACTS.md (as tests/conftest.py make_batch)."""
    g = torch.Generator().manual_seed(seed)
    s, h, d = cfg.vision.image_size, cfg.horizon, cfg.action_dim
    action = torch.rand(b, h, d, generator=g) * 2 - 1
    if cfg.gripper_index is not None:
        action[..., cfg.gripper_index] = (action[..., cfg.gripper_index] > 0).float()
    pad = torch.zeros(b, h, dtype=torch.bool)
    pad[:, 3 * h // 4 :] = True  # the end-of-episode windows a real loader produces
    images = {f"observation.images.{c}": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
              for c in cfg.vision.cameras}  # fmt: skip
    return images | {
        "task": [f"pick up the block number {i % 10}" for i in range(b)],
        "action": action,
        "action_is_pad": pad,
        "trajectory_weight": torch.rand(b, h, generator=g),
        "router_label": torch.randint(0, 2, (b,), generator=g),
    }


def train_samples_per_s(policy: DAMVLAPolicy, batch_size: int, steps: int, warmup: int) -> float:
    """Median samples/s of one optimiser step (forward + backward + AdamW)."""
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=0.0)
    batch = synthetic_batch(policy.config, batch_size)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = policy(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def inference_ms(policy: DAMVLAPolicy, runs: int, warmup: int) -> float:
    """Median ms of ``predict_action_chunk`` at batch 1."""
    policy.eval()
    batch = synthetic_batch(policy.config, 1)
    batch.pop("action")
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        policy.predict_action_chunk(batch)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--ablations", nargs="+", default=["damvla", "cogact"])
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed training steps")
    ap.add_argument("--runs", type=int, default=30, help="timed inference runs")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"preset {args.preset}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'ablation':<10} {'params':>12} {'train samples/s (batch ' + str(args.train_batch) + ')':>30} {'inference ms/chunk (batch 1)':>30}")
    for ablation in args.ablations:
        torch.manual_seed(0)
        cfg = preset(args.preset, ablation)
        policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)
        n = sum(p.numel() for p in policy.parameters())
        ms = inference_ms(policy, args.runs, args.warmup)
        sps = train_samples_per_s(policy, args.train_batch, args.steps, args.warmup)
        print(f"{ablation:<10} {n:>12,} {sps:>30.1f} {ms:>30.1f}")


if __name__ == "__main__":
    main()
