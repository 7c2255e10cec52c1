"""Training throughput of ``damvla train``'s own step (``damvla.train.Trainer``): samples/s, whether the data
loader keeps up, and on a GPU the model FLOPs utilisation (MFU).

Writes a synthetic LeRobot v3.0 image dataset (``--frames`` frames at ``--side`` px, resized to the preset's
image size by the dataset) unless ``--dataset`` is given, then times ``--steps`` optimiser steps after
``--warmup`` untimed ones. Data wait = time blocked on the next micro-batches; compute = forward + backward
+ optimiser. FLOPs per step come from ``torch.utils.flop_counter.FlopCounterMode`` over one step (matmuls
and attention; element-wise ops are not counted, the usual MFU convention).

    python benchmarks/bench_train.py                                  # tiny, CPU, batch 32
    python benchmarks/bench_train.py --preset small --batch 32        # on a GPU: + MFU (H100 bf16 peak)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from damvla.config import apply_overrides, preset
from damvla.data.lerobot import LeRobotWriter
from damvla.training.config import RunConfig, TrainConfig

CAM = "observation.images.image"
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def write_dataset(root: Path, frames: int, side: int, episode_len: int = 50) -> Path:
    feats = {
        CAM: {"dtype": "image", "shape": [side, side, 3]},
        "observation.state": {"dtype": "float32", "shape": [7]},
        "action": {"dtype": "float32", "shape": [7]},
    }
    info = {"damvla": {"gripper_index": 6, "gripper_threshold": 0.5, "gripper_open": 1.0}}
    w = LeRobotWriter(root, fps=10, features=feats, image_mode="image", extra_info=info)
    rng = np.random.default_rng(0)
    for e in range(max(1, frames // episode_len)):
        t = episode_len
        a = np.cumsum(rng.normal(0, 0.05, (t, 7)), 0).astype(np.float32)
        a[:, 6] = (np.arange(t) < t // 2).astype(np.float32)
        yy, xx = np.mgrid[0:side, 0:side]
        base = np.stack([xx * 255 // side, yy * 255 // side, np.full_like(xx, 96)], -1).astype(np.uint8)
        img = np.repeat(base[None], t, 0)
        for i in range(t):  # a moving square, so the PNGs compress like rendered frames
            y = x = 8 + (i * 2) % (side - 16)
            img[i, y : y + 8, x : x + 8] = (220, 40, 40)
        w.add_episode({CAM: img, "observation.state": np.zeros((t, 7), np.float32), "action": a},
                      task=f"move the block to spot {e % 5}")  # fmt: skip
    return w.finalize()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="default: tiny on CPU, small on GPU")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--side", type=int, default=128, help="stored image side (resized by the dataset)")
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from damvla.train import Trainer
    from damvla.training.distributed import init_distributed

    ctx = init_distributed()
    name = args.preset or ("small" if ctx.device.type == "cuda" else "tiny")
    cfg = apply_overrides(preset(name), args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = args.dataset or str(write_dataset(Path(tmp) / "ds", args.frames, args.side))
        t_write = time.perf_counter() - t0
        tc = TrainConfig(dataset=ds, out=str(Path(tmp) / "run"), preset=name, steps=10**6, batch_size=args.batch,
                         num_workers=args.workers, warmup=0, log_every=10**6, save_every=10**6).validate()  # fmt: skip
        trainer = Trainer(RunConfig(cfg, tc), None, ctx)
        dev = ctx.device

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        for _ in range(args.warmup):
            trainer.train_step(trainer.stream.next_step(1))
        flops = None
        if dev.type == "cuda":
            from torch.utils.flop_counter import FlopCounterMode

            micro = trainer.stream.next_step(1)
            with FlopCounterMode(display=False) as fc:
                trainer.train_step(micro)
            flops = fc.get_total_flops()
        sync()
        wait = comp = 0.0
        for _ in range(args.steps):
            a = time.perf_counter()
            micro = trainer.stream.next_step(1)
            b = time.perf_counter()
            trainer.train_step(micro)
            sync()
            c = time.perf_counter()
            wait, comp = wait + (b - a), comp + (c - b)
        total = wait + comp
        sps = args.steps * args.batch / total
        # the loader alone: can it feed more than the model consumes?
        a = time.perf_counter()
        n = 0
        for _ in range(args.steps):
            n += len(trainer.stream.next_step(1)[0]["task"])
        loader_sps = n / (time.perf_counter() - a)

    threads = torch.get_num_threads()
    print(f"preset {name} on {dev.type}{f' ({torch.cuda.get_device_name(dev)})' if dev.type == 'cuda' else f' ({threads} threads)'}, "
          f"batch {args.batch}, {args.workers} workers, {trainer.counts['total']['total']:,} parameters")  # fmt: skip
    if not args.dataset:
        print(f"  synthetic dataset: {args.frames} frames at {args.side} px written in {t_write:.1f} s")
    print(f"  training:      {sps:8.1f} samples/s  ({total / args.steps * 1000:.0f} ms/step)")
    print(f"  data wait:     {wait / total:8.1%} of step time ({wait / args.steps * 1000:.1f} ms/step)")
    print(f"  loader alone:  {loader_sps:8.1f} samples/s -> {'keeps up' if loader_sps > sps else 'IS THE BOTTLENECK'}")
    if flops is not None:
        achieved = flops * args.steps / total
        peak = peak_flops(dev)
        mfu = f", MFU {achieved / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 peak" if peak else ""
        print(f"  FLOPs/step:    {flops / 1e12:.3f} TFLOP -> {achieved / 1e12:.1f} TFLOP/s{mfu}")


if __name__ == "__main__":
    main()
