"""`damvla info --preset P`: the resolved config and parameter counts (the paper preset is built on the
meta device, so this costs no memory)."""

from __future__ import annotations

import argparse

import torch

from damvla.config import ABLATIONS, PRESETS, apply_overrides, preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--ablation", choices=sorted(ABLATIONS), default=None, help="a named row of the paper's Table VI")
    p.add_argument("--config", action="store_true", help="also print the resolved config as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dit.depth=4")


def run(args: argparse.Namespace) -> int:
    from damvla.model.policy import DAMVLAPolicy

    cfg = apply_overrides(preset(args.preset, args.ablation), args.overrides)
    if args.config:
        print(cfg.to_json())
    with torch.device("meta"):
        policy = DAMVLAPolicy(cfg, load_pretrained=False)
    print(f"preset {cfg.name}: parameters")
    for name, n in policy.parameter_counts().items():
        print(f"  {name:<16} {n:>15,}")
    return 0
