"""Computed training-memory table of a preset (docs/cogact.md): parameters per component from the model
built on the meta device (no memory, no weights), times bytes per parameter of each training setup.

    python benchmarks/memory_table.py [--preset paper] [--ablation damvla] [--gpus 8] [--lora-rank 32]

Bytes per parameter, as damvla trains (fp32 master weights, bf16 autocast, AdamW with two fp32 moments):
a trainable parameter costs 4 (weight) + 4 (gradient) + 8 (Adam) = 16 bytes, a frozen one 4 bytes.
FSDP2 shards all of it over the GPUs; DDP keeps a full copy on each. Activations, the bf16 copies FSDP
gathers one block at a time, and the CUDA context come on top and are not counted here.
"""

from __future__ import annotations

import argparse

TRAINABLE_BYTES, FROZEN_BYTES = 16, 4
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--ablation", default="damvla")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--lora-rank", type=int, default=32)
    args = ap.parse_args()
    import torch

    from damvla.config import preset
    from damvla.model.policy import DAMVLAPolicy
    from damvla.training.model import component_of

    cfg = preset(args.preset, args.ablation)
    with torch.device("meta"):
        policy = DAMVLAPolicy(cfg, None, load_pretrained=False)
    counts: dict[str, int] = {}
    lora = 0
    for name, p in policy.named_parameters():
        comp = component_of(name)
        counts[comp] = counts.get(comp, 0) + p.numel()
        module = name.rsplit(".", 2)[-2]
        if comp == "llm" and module in LORA_TARGETS and p.ndim == 2:
            lora += args.lora_rank * (p.shape[0] + p.shape[1])
    total = sum(counts.values())
    vision = counts.get("vision.dinov2", 0) + counts.get("vision.siglip", 0)
    llm = counts.get("llm", 0)
    print(f"{args.preset} / {args.ablation}: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in counts.items())
          + f"; total {total / 1e9:.3f}B")  # fmt: skip
    setups = {
        "full fine-tune": (total, 0),
        "frozen vision (--freeze vision)": (total - vision, vision),
        f"LoRA r={args.lora_rank} (--freeze llm --lora {args.lora_rank})": (total - vision - llm + lora, vision + llm),
    }
    gib = 2**30
    print(f"\n| setup | trainable | frozen | weights+grads+Adam | per GPU, FSDP x{args.gpus} | per GPU, DDP |")
    print("|---|---|---|---|---|---|")
    for name, (train, frozen) in setups.items():
        b = train * TRAINABLE_BYTES + frozen * FROZEN_BYTES
        print(f"| {name} | {train / 1e9:.3f}B | {frozen / 1e9:.3f}B | {b / gib:.1f} GiB | {b / args.gpus / gib:.1f} GiB "
              f"| {b / gib:.1f} GiB |")  # fmt: skip
    print(f"\nHost memory to start a run from a checkpoint, fp32 model {4 * total / gib:.1f} GiB: "
          f"--init with FSDP {4 * total / args.gpus / gib:.1f} GiB per rank + one tensor; "
          f"the --resume path {2 * 4 * total / gib:.1f} GiB per rank (model + loaded state dict)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
