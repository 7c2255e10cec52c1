"""Why the ``cpu`` preset has the sizes it has: training samples/s of the trainable part (everything after the
frozen, cached DINOv2-S) for the preset and the variants it was chosen from, and the frozen encoder's
frames/s when the feature cache is built.

The encoder's weights do not change its cost, so random ones are used (no weights needed). Features are
random tensors of the cached shapes; one optimiser step = forward + backward + AdamW at the given batch.

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu_preset.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from damvla.config import apply_overrides, preset
from damvla.model.policy import DAMVLAPolicy
from damvla.model.vision import FEATURE_KEYS
from damvla.normalize import ActionNormalizer
from damvla.training.data import draw_training

# The preset, then variants that each undo one of its choices (what they would cost).
VARIANTS = {
    "cpu preset": [],
    "projector 4C wide (Prismatic)": ["language.projector_hidden=null"],
    "CogACT prompt template": ["language.prompt_template=In: What action should the robot take to {instruction}?\nOut: "],
    "R = 4 repeated diffusion steps": ["diffusion.repeated_steps=4"],
    "DiT depth 3": ["dit.depth=3"],
    "LLM 4 layers": ["language.num_layers=4"],
    "cpu preset, CogACT ablation": ["ablation=cogact"],
}
TASK = "pick up the puck and place it at the goal"


def config(overrides: list[str]):
    ab = [o.split("=", 1)[1] for o in overrides if o.startswith("ablation=")]
    rest = [o for o in overrides if not o.startswith("ablation=")]
    return apply_overrides(preset("cpu", ab[0] if ab else None), ["vision.dinov2.pretrained_path=null", "state_dim=4", *rest])


def train_rate(overrides: list[str], batch: int, steps: int) -> float:
    torch.manual_seed(0)
    cfg = config(overrides)
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))
    g = torch.Generator().manual_seed(0)
    n, c = cfg.vision.num_patches, cfg.vision.dinov2.hidden_size
    b = {
        FEATURE_KEYS["patches"]: torch.randn(batch, n, c, generator=g),
        FEATURE_KEYS["cls"]: torch.randn(batch, 1, c, generator=g),
        FEATURE_KEYS["registers"]: torch.randn(batch, 0, c),
        "observation.state": torch.randn(batch, 4, generator=g),
        "task": [TASK] * batch,
        "action": torch.rand(batch, cfg.horizon, cfg.action_dim, generator=g) * 2 - 1,
        "action_is_pad": torch.zeros(batch, cfg.horizon, dtype=torch.bool),
        "trajectory_weight": torch.rand(batch, cfg.horizon, generator=g),
        "router_label": torch.randint(0, 2, (batch,), generator=g),
    }
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], 1e-4)
    draws = draw_training(torch.arange(batch), cfg.diffusion.repeated_steps, cfg.horizon, cfg.action_dim, 100, 0.1)

    def step() -> None:
        loss, _ = policy(b, draws=draws)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


@torch.no_grad()
def encoder_rate(image_size: int, frames: int = 64, batch: int = 64) -> float:
    torch.manual_seed(0)
    cfg = config([f"vision.image_size={image_size}"])
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim)).eval()
    x = torch.rand(batch, 3, image_size, image_size)
    policy.vision(x[:4])
    t = time.perf_counter()
    done = 0
    while done < frames:
        policy.vision(x)
        done += batch
    return done / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}")
    print("| variant | training samples/s |\n|---|---|")
    for name, ov in VARIANTS.items():
        print(f"| {name} | {train_rate(ov, args.batch, args.steps):.0f} |", flush=True)
    print("\n| frozen DINOv2-S (11 blocks) at | frames/s |\n|---|---|")
    for size in (112, 224):
        print(f"| {size} px | {encoder_rate(size):.1f} |", flush=True)


if __name__ == "__main__":
    main()
