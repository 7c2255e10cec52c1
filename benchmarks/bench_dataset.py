"""Dataset throughput: samples/s of ``PolicyDataset`` through a DataLoader (CPU).

By default writes a synthetic LeRobot v3.0 video dataset (~128x128 H.264, scripted-looking frames) to a
temporary folder and reads it with ``--workers`` workers and batch ``--batch``; ``--dataset DIR`` measures
an existing dataset instead. Reports writer speed, load (validation + precompute) time, and samples/s for a
cold epoch (every episode decoded) and a warm one (frames cached), for the episode-block sampler and for a
plain uniform shuffle.

    python benchmarks/bench_dataset.py
    python benchmarks/bench_dataset.py --dataset data/metaworld --gripper-index 3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from damvla.data.dataset import PolicyDataset
from damvla.data.lerobot import LeRobotWriter


def synthetic_episode(rng: np.random.Generator, t: int, size: int) -> dict[str, np.ndarray]:
    """A smooth scene with a moving square (compresses like rendered sim frames, unlike noise)."""
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 // size, yy * 255 // size, np.full_like(xx, 128)], -1).astype(np.int16)
    frames = np.empty((t, size, size, 3), np.uint8)
    pos = rng.uniform(0.2, 0.8, 2) * size
    vel = rng.normal(0, 1.0, 2)
    for i in range(t):
        pos = np.clip(pos + vel, 8, size - 8)
        img = base + rng.integers(-4, 5, size=(size, size, 3), dtype=np.int16)
        y, x = int(pos[0]), int(pos[1])
        img[y - 6 : y + 6, x - 6 : x + 6] = (220, 40, 40)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    action = rng.normal(0, 0.3, (t, 4)).astype(np.float32)
    action[:, 3] = 1.0
    action[t // 3 : 2 * t // 3, 3] = 0.0  # close then open: two gripper flips
    return {
        "observation.images.image": frames,
        "observation.state": rng.normal(size=(t, 4)).astype(np.float32),
        "action": action,
    }


def write_synthetic(root: Path, episodes: int, length: int, size: int) -> float:
    """Write the synthetic dataset; returns the writer's frames/s."""
    feats = {
        "observation.images.image": {"dtype": "video", "shape": [size, size, 3]},
        "observation.state": {"dtype": "float32", "shape": [4]},
        "action": {"dtype": "float32", "shape": [4]},
    }
    rng = np.random.default_rng(0)
    eps = [synthetic_episode(rng, length, size) for _ in range(episodes)]
    t0 = time.perf_counter()
    w = LeRobotWriter(root, fps=20, features=feats, robot_type="synthetic",
                      extra_info={"damvla": {"gripper_index": 3, "gripper_threshold": 0.5, "gripper_open": 1.0}})  # fmt: skip
    for i, ep in enumerate(eps):
        w.add_episode(ep, task=f"task {i % 5}", key=f"synthetic/{i}")
    w.finalize()
    return episodes * length / (time.perf_counter() - t0)


def measure(ds: PolicyDataset, sampler: torch.utils.data.Sampler, batch: int, workers: int) -> float:
    """Samples/s of one pass over the dataset (fresh workers, so caches start empty)."""
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=False)
    n, t0 = 0, time.perf_counter()
    for b in loader:
        n += len(b["task"])
    return n / (time.perf_counter() - t0)


def measure_epochs(
    ds: PolicyDataset, sampler: torch.utils.data.Sampler, batch: int, workers: int
) -> tuple[float, float]:
    """(cold, warm) samples/s: two passes with the same persistent workers, so the 2nd hits the cache."""
    loader = DataLoader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0
    )
    rates = []
    for epoch in range(2):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        n, t0 = 0, time.perf_counter()
        for b in loader:
            n += len(b["task"])
        rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset", type=Path, default=None, help="existing LeRobot v3.0 dataset (default: synthetic)"
    )
    p.add_argument("--episodes", type=int, default=40)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--size", type=int, default=128, help="synthetic stored image side")
    p.add_argument("--image-size", type=int, default=224, help="model input side S")
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--camera", default="image")
    p.add_argument("--gripper-index", type=int, default=None)
    p.add_argument("--cache-mb", type=int, default=1024, help="per-worker decoded-frame cache")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, workers={args.workers}, batch={args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dataset
        if root is None:
            root = Path(tmp) / "synthetic"
            fps = write_synthetic(root, args.episodes, args.length, args.size)
            mb = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20
            print(
                f"wrote {args.episodes} x {args.length} frames at {args.size}px: {fps:.0f} frames/s, {mb:.1f} MB"
            )
        t0 = time.perf_counter()
        ds = PolicyDataset(root, horizon=args.horizon, image_size=args.image_size, camera=args.camera,
                           gripper_index=args.gripper_index, cache_bytes=args.cache_mb * 2**20)  # fmt: skip
        print(f"load {len(ds)} samples / {ds.num_episodes} episodes: {time.perf_counter() - t0:.2f} s")
        cold, warm = measure_epochs(ds, ds.make_sampler(seed=0), args.batch, args.workers)
        print(f"episode-block sampler: cold epoch {cold:.0f} samples/s, warm epoch {warm:.0f} samples/s")
        cold, warm = measure_epochs(ds, RandomSampler(ds), args.batch, args.workers)
        print(f"uniform shuffle:       cold epoch {cold:.0f} samples/s, warm epoch {warm:.0f} samples/s")


if __name__ == "__main__":
    main()
