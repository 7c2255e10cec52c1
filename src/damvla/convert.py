"""`damvla convert cogact CKPT --llama DIR --out DIR [--ablation cogact|damvla]`: a CogACT checkpoint as a
damvla policy checkpoint (``DAMVLAPolicy.from_pretrained``, ``damvla eval``, ``damvla serve``, ``damvla train
--init``).

A CogACT checkpoint (``torch.load(f)["model"]``) holds ``vision_backbone`` (timm ViTs ``dino_featurizer.*``,
``siglip_featurizer.*``), ``projector`` (``projector.{0,2,4}``), ``llm_backbone`` (``llm.*``, a
``LlamaForCausalLM``), ``action_model`` (``net.*``, CogACT's DiT) and, with EMA, ``ema_diffusion``. The
sizes are read from the tensors; what shapes cannot tell comes from ``--llama DIR/config.json`` (attention
heads, RoPE, norm eps) and a table of known ViT widths (``--set`` overrides anything).

- ``--ablation cogact``: CogACT exactly (one head, ``dit.condition = "cogact"``, no x0 clipping, exact-GELU
  SigLIP, the cognition token read where ``CogACT.predict_action`` reads it).
- ``--ablation damvla``: DAM-VLA whose arm and gripper heads both start as CogACT's action model. New, and
  randomly initialised (``--seed``): the heads' visual-token projections, their null visual tokens and
  position rows, and the router.

The output is written tensor by tensor (the input is memory-mapped), so conversion never holds two copies
of the model; the mapping is explicit and every target key must be produced exactly once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUBDICTS = ("vision_backbone", "projector", "llm_backbone", "action_model")
# Attention heads of the ViT widths CogACT's backbones use (shapes do not tell the head count).
KNOWN_VIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1536: 24}
DIT_HEADS = {384: 4, 768: 12, 1024: 16}  # CogACT's DiT-S / B / L
ABLATION_CHOICES = ("cogact", "damvla")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    c = sub.add_parser("cogact", help="a CogACT checkpoint (microsoft/CogACT, e.g. CogACT-Base)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    c.add_argument("checkpoint", help="CogACT's .pt file (e.g. CogACT-Base/checkpoints/CogACT-Base.pt)")
    c.add_argument("--llama", required=True, metavar="DIR",
                   help="the LLaMA-2 folder CogACT was built on: its config.json and tokenizer are read (not its weights)")
    c.add_argument("--out", required=True, metavar="DIR", help="the damvla checkpoint folder to write")
    c.add_argument("--ablation", choices=ABLATION_CHOICES, default="cogact",
                   help="cogact: CogACT exactly; damvla: DAM-VLA, both heads from CogACT's action model (default cogact)")
    c.add_argument("--stats", default=None, metavar="FILE|identity",
                   help="CogACT's dataset_statistics.json (default: the one beside the checkpoint or its run folder); "
                        "'identity': actions stay in normalised units (fine-tuning replaces them with your dataset's)")
    c.add_argument("--unnorm-key", default=None, help="which dataset's statistics in that file (needed when it has several)")
    c.add_argument("--ema", action="store_true", help="take the action model from ema_diffusion instead of action_model")
    c.add_argument("--seed", type=int, default=0, help="initialisation of the new DAM-VLA parts (default 0)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="policy-config override, e.g. --set vision.dinov2.num_heads=2 (repeatable)")
    c.add_argument("--force", action="store_true", help="write into --out even if it already holds a checkpoint")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    out = convert_cogact(
        args.checkpoint, args.llama, args.out, ablation=args.ablation, stats=args.stats, unnorm_key=args.unnorm_key,
        ema=args.ema, seed=args.seed, overrides=args.overrides, force=args.force, progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {out}")
    return 0


# ---- reading the checkpoint ---------------------------------------------------------------------------
def load_cogact_state(path: str | Path) -> dict[str, dict[str, Any]]:
    """``torch.load(path)["model"]``, memory-mapped (tensors are read from the file as they are used), after
    checking that it is a CogACT checkpoint."""
    import pickle
    import zipfile

    import torch

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CogACT checkpoint {p} does not exist")
    try:
        obj = torch.load(str(p), map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "zip" not in str(e).lower() and "mmap" not in str(e).lower():
            raise ValueError(f"{p}: not a torch checkpoint ({e})") from e
        try:  # a legacy (pre-zip) torch file cannot be memory-mapped
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as e2:
            raise ValueError(f"{p}: not a torch checkpoint ({e2})") from e2
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ValueError(f"{p}: not a torch checkpoint ({type(e).__name__}: {e})") from e
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict):
        have = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"{p}: not a CogACT checkpoint: expected a dict with a 'model' entry (CogACT saves "
            f"{{'model': {{{', '.join(SUBDICTS)}}}}}), found {have}"
        )
    missing = [k for k in SUBDICTS if not isinstance(model.get(k), dict)]
    if missing:
        raise ValueError(
            f"{p}: not a CogACT checkpoint: ['model'] lacks {missing} (has {sorted(model)}); CogACT checkpoints "
            f"hold {list(SUBDICTS)}. A Prismatic VLM without an action model cannot be converted."
        )
    return model


def _need(sd: dict[str, Any], key: str, where: str) -> Any:
    if key not in sd:
        raise ValueError(f"CogACT checkpoint: ['model']['{where}'] lacks {key!r}")
    return sd[key]


def _count(sd: dict[str, Any], prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"CogACT checkpoint: blocks under {prefix!r} are {sorted(ids)[:5]}..., expected 0..N-1")
    return len(ids)


# ---- the config ---------------------------------------------------------------------------------------
def _vit_config(sd: dict[str, Any], prefix: str, registers: bool) -> tuple[dict[str, Any], int]:
    """EncoderConfig fields of one timm ViT, and its image size (from the patch-only position table)."""
    where = "vision_backbone"
    pos = _need(sd, f"{prefix}pos_embed", where)
    proj = _need(sd, f"{prefix}patch_embed.proj.weight", where)
    width, n_pos = int(pos.shape[-1]), int(pos.shape[1])
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise ValueError(f"{prefix}pos_embed holds {n_pos} rows: not a square patch grid (class row folded?)")
    patch = int(proj.shape[-1])
    regs = int(sd[f"{prefix}reg_token"].shape[1]) if f"{prefix}reg_token" in sd else 0
    if registers and f"{prefix}cls_token" not in sd:
        raise ValueError(f"CogACT checkpoint: {prefix}cls_token missing (expected a DINOv2 ViT)")
    fields = dict(
        hidden_size=width, num_layers=_count(sd, f"{prefix}blocks."), num_heads=KNOWN_VIT_HEADS.get(width, 0),
        intermediate_size=int(_need(sd, f"{prefix}blocks.0.mlp.fc1.weight", where).shape[0]), patch_size=patch,
        num_register_tokens=regs, native_image_size=None, pretrained_path=None, hidden_act="gelu",
    )  # fmt: skip
    if registers:
        fields["layerscale_value"] = 1.0  # every layer scale is loaded
    return fields, side * patch


def cogact_config(model: dict[str, dict[str, Any]], llama_dir: str | Path, ablation: str, overrides: list[str],
                  ema: bool = False) -> Any:  # fmt: skip
    """The PolicyConfig of a converted CogACT checkpoint (sizes from its tensors and ``llama_dir``)."""
    from damvla.config import ABLATIONS, PolicyConfig, apply_overrides, preset

    if ablation not in ABLATION_CHOICES:
        raise ValueError(f"--ablation {ablation!r}: expected one of {list(ABLATION_CHOICES)}")
    vb, lb, pj = model["vision_backbone"], model["llm_backbone"], model["projector"]
    net = _action_net(model, ema)
    if not any(k.startswith("dino_featurizer.") for k in vb) or not any(k.startswith("siglip_featurizer.") for k in vb):
        raise ValueError(
            "CogACT checkpoint: vision_backbone is not the fused DINOv2 + SigLIP backbone (dino_featurizer.* and "
            f"siglip_featurizer.*); keys start with {sorted({k.split('.')[0] for k in vb})}"
        )
    dino, size_d = _vit_config(vb, "dino_featurizer.", registers=True)
    siglip, size_s = _vit_config(vb, "siglip_featurizer.", registers=False)
    if size_d != size_s:
        raise ValueError(f"CogACT checkpoint: DINOv2 sees {size_d} px but SigLIP {size_s} px")
    cfg_path = Path(llama_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--llama {llama_dir}: no config.json (the LLaMA-2 folder CogACT was built on)")
    lc = json.loads(cfg_path.read_text())
    emb = _need(lb, "llm.model.embed_tokens.weight", "llm_backbone")
    hidden, vocab = int(emb.shape[1]), int(emb.shape[0])
    layers = _count(lb, "llm.model.layers.")
    for key, got in (("hidden_size", hidden), ("num_hidden_layers", layers),
                     ("intermediate_size", int(lb["llm.model.layers.0.mlp.gate_proj.weight"].shape[0]))):  # fmt: skip
        if lc.get(key) != got:
            raise ValueError(f"--llama {cfg_path}: {key}={lc.get(key)} but the checkpoint's LLM has {got}")
    has_tok = any((Path(llama_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    language = dict(
        hidden_size=hidden, num_layers=layers, num_heads=int(lc["num_attention_heads"]),
        num_kv_heads=int(lc.get("num_key_value_heads") or lc["num_attention_heads"]),
        intermediate_size=int(lc["intermediate_size"]), vocab_size=vocab,
        max_position_embeddings=int(lc.get("max_position_embeddings", 4096)), rms_norm_eps=float(lc.get("rms_norm_eps", 1e-5)),
        rope_theta=float(lc.get("rope_theta", 10000.0)), pretrained_path=None,
        tokenizer=str(Path(llama_dir).resolve()) if has_tok else None,
        projector_hidden=int(_need(pj, "projector.0.weight", "projector").shape[0]),
    )  # fmt: skip
    x_emb = _need(net, "net.x_embedder.linear.weight", "action_model")
    dit_w, action_dim = int(x_emb.shape[0]), int(x_emb.shape[1])
    if int(_need(net, "net.final_layer.linear.weight", "action_model").shape[0]) != action_dim:
        raise ValueError("CogACT checkpoint: the action model learns sigma (learn_sigma=True); only ε-prediction heads convert")
    token = int(_need(net, "net.z_embedder.linear.weight", "action_model").shape[1])
    if token != hidden:
        raise ValueError(f"CogACT checkpoint: the action model reads {token}-wide cognition features, the LLM is {hidden} wide")
    dit = dict(
        depth=_count(net, "net.blocks."), hidden_size=dit_w, num_heads=DIT_HEADS.get(dit_w, 0),
        mlp_ratio=int(net["net.blocks.0.mlp.fc1.weight"].shape[0]) / dit_w, condition="cogact",
    )  # fmt: skip
    horizon = int(_need(net, "net.positional_embedding", "action_model").shape[0]) - 1

    base = preset("paper", ablation).to_dict()
    base["name"] = f"cogact-{ablation}"
    base["action_dim"], base["horizon"] = action_dim, horizon
    base["gripper_index"] = 6 if action_dim == 7 else None
    base["vision"].update(image_size=size_d, frozen=False, gripper_queries=0, patch_pool=1)
    base["vision"]["dinov2"].update(dino)
    base["vision"]["siglip"].update(siglip)
    base["language"].update(language)
    base["dit"].update(dit)
    base["ablation"] = dict(vars(ABLATIONS[ablation]))
    base["diffusion"]["clip_sample"] = ablation != "cogact"  # DAM-VLA keeps its own sampler setting
    # Unknown head counts are 0 until --set gives them.
    given = {o.split("=", 1)[0] for o in overrides}
    unknown = [k for k, v in (("vision.dinov2.num_heads", dino["num_heads"]), ("vision.siglip.num_heads", siglip["num_heads"]),
                              ("dit.num_heads", dit["num_heads"])) if not v and k not in given]  # fmt: skip
    if unknown:
        raise ValueError(
            f"cannot tell the attention heads of {unknown} from the tensor shapes (widths "
            f"{dino['hidden_size']}, {siglip['hidden_size']}, {dit_w} are not CogACT's): pass "
            + " ".join(f"--set {k}=N" for k in unknown)
        )
    if not has_tok and "language.tokenizer" not in given:
        raise ValueError(f"--llama {llama_dir}: no tokenizer files (tokenizer.json / tokenizer.model); CogACT's prompt needs LLaMA-2's tokenizer")
    return apply_overrides(PolicyConfig.from_dict(base), overrides)


def _action_net(model: dict[str, dict[str, Any]], ema: bool) -> dict[str, Any]:
    if ema:
        if not isinstance(model.get("ema_diffusion"), dict):
            raise ValueError("--ema: the checkpoint has no ema_diffusion (it was trained without EMA)")
        return model["ema_diffusion"]
    return model["action_model"]


# ---- the key mapping ----------------------------------------------------------------------------------
Producer = Callable[[], Any]


def _dinov2_map(vb: dict[str, Any], depth: int, targets: set[str]) -> dict[str, Producer]:
    import torch

    s, d = "dino_featurizer.", "vision.dinov2."
    pos = vb[f"{s}pos_embed"]
    m: dict[str, Producer] = {
        f"{d}embeddings.cls_token": lambda: vb[f"{s}cls_token"],  # timm folded pos_embed[:, 0] into it
        f"{d}embeddings.register_tokens": lambda: vb[f"{s}reg_token"],
        # timm's table covers the patches only: prepend a zero class row
        f"{d}embeddings.position_embeddings": lambda: torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1),
        f"{d}embeddings.mask_token": lambda: torch.zeros(1, pos.shape[-1]),  # never used at inference
        f"{d}embeddings.patch_embeddings.projection.weight": lambda: vb[f"{s}patch_embed.proj.weight"],
        f"{d}embeddings.patch_embeddings.projection.bias": lambda: vb[f"{s}patch_embed.proj.bias"],
    }
    # transformers 5 names the attention projections q/k/v/o_proj, 4.x attention.{query,key,value} / output.dense
    new = f"{d}encoder.layer.0.attention.q_proj.weight" in targets
    names = (["attention.q_proj", "attention.k_proj", "attention.v_proj"] if new
             else ["attention.attention.query", "attention.attention.key", "attention.attention.value"])  # fmt: skip
    out_proj = "attention.o_proj" if new else "attention.output.dense"
    for i in range(depth):
        src, dst = f"{s}blocks.{i}.", f"{d}encoder.layer.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("attn.proj", out_proj)):
            for leaf in ("weight", "bias"):
                m[f"{dst}{b}.{leaf}"] = _get(vb, f"{src}{a}.{leaf}")
        m[f"{dst}layer_scale1.lambda1"] = _get(vb, f"{src}ls1.gamma")
        m[f"{dst}layer_scale2.lambda1"] = _get(vb, f"{src}ls2.gamma")
        for j, name in enumerate(names):
            for leaf in ("weight", "bias"):
                m[f"{dst}{name}.{leaf}"] = _qkv(vb, f"{src}attn.qkv.{leaf}", j)
    return m


def _siglip_map(vb: dict[str, Any], depth: int, targets: set[str]) -> dict[str, Producer]:
    s = "siglip_featurizer."
    d = "vision.siglip.vision_model." if "vision.siglip.vision_model.embeddings.patch_embedding.weight" in targets else "vision.siglip."
    m: dict[str, Producer] = {
        f"{d}embeddings.patch_embedding.weight": _get(vb, f"{s}patch_embed.proj.weight"),
        f"{d}embeddings.patch_embedding.bias": _get(vb, f"{s}patch_embed.proj.bias"),
        f"{d}embeddings.position_embedding.weight": lambda: vb[f"{s}pos_embed"][0],
    }
    for i in range(depth):
        src, dst = f"{s}blocks.{i}.", f"{d}encoder.layers.{i}."
        pairs = (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                 ("attn.proj", "self_attn.out_proj"))  # fmt: skip
        for a, b in pairs:
            for leaf in ("weight", "bias"):
                m[f"{dst}{b}.{leaf}"] = _get(vb, f"{src}{a}.{leaf}")
        for j, name in enumerate(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
            for leaf in ("weight", "bias"):
                m[f"{dst}{name}.{leaf}"] = _qkv(vb, f"{src}attn.qkv.{leaf}", j)
    return m


def _head_map(net: dict[str, Any], prefix: str, depth: int, num_visual: int, fresh: dict[str, Any]) -> dict[str, Producer]:
    """CogACT's DiT (``net.*``) -> one of our heads (``dit.condition = "cogact"``). With visual tokens, their
    projection, null tokens and position rows come from ``fresh`` (a newly initialised head)."""
    import torch

    pos = net["net.positional_embedding"]  # (1 + H, h): [condition token, actions]

    def pos_embed() -> Any:
        if not num_visual:
            return pos[None]
        new_rows = fresh["pos_embed"][:, 1 : 1 + num_visual]
        return torch.cat([pos[None, :1], new_rows.to(pos.dtype), pos[None, 1:]], dim=1)

    m: dict[str, Producer] = {
        f"{prefix}pos_embed": pos_embed,
        f"{prefix}null_cond": _get(net, "net.z_embedder.uncondition"),
        f"{prefix}cond_proj.weight": _get(net, "net.z_embedder.linear.weight"),
        f"{prefix}cond_proj.bias": _get(net, "net.z_embedder.linear.bias"),
        f"{prefix}x_embedder.weight": _get(net, "net.x_embedder.linear.weight"),
        f"{prefix}x_embedder.bias": _get(net, "net.x_embedder.linear.bias"),
        f"{prefix}final.weight": _get(net, "net.final_layer.linear.weight"),
        f"{prefix}final.bias": _get(net, "net.final_layer.linear.bias"),
    }
    for j in (0, 2):
        for leaf in ("weight", "bias"):
            m[f"{prefix}t_embedder.mlp.{j}.{leaf}"] = _get(net, f"net.t_embedder.mlp.{j}.{leaf}")
    for i in range(depth):
        src, dst = f"net.blocks.{i}.", f"{prefix}blocks.{i}."
        for a, b in (("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"), ("mlp.fc1", "mlp.0"), ("mlp.fc2", "mlp.2")):
            for leaf in ("weight", "bias"):
                m[f"{dst}{b}.{leaf}"] = _get(net, f"{src}{a}.{leaf}")
    for k in ("visual_proj.weight", "visual_proj.bias", "null_visual"):
        if num_visual:
            m[f"{prefix}{k}"] = _const(fresh[k])
    return m


def _const(t: Any) -> Producer:
    return lambda: t


def _get(sd: dict[str, Any], key: str) -> Producer:
    if key not in sd:
        raise ValueError(f"CogACT checkpoint lacks {key!r}")
    return lambda: sd[key]


def _qkv(sd: dict[str, Any], key: str, j: int) -> Producer:
    """timm's fused qkv, split in q, k, v order (rows j*C .. (j+1)*C)."""
    if key not in sd:
        raise ValueError(f"CogACT checkpoint lacks {key!r}")
    return lambda: sd[key].chunk(3, dim=0)[j]


# ---- statistics -------------------------------------------------------------------------------------------
def cogact_normalizer(ckpt: Path, stats: str | None, unnorm_key: str | None, action_dim: int) -> tuple[Any, str]:
    """The action normaliser from CogACT's dataset_statistics.json (q01 / q99 / mask), or identity."""
    import numpy as np

    from damvla.normalize import ActionNormalizer

    if stats == "identity":
        return ActionNormalizer.identity(action_dim), "identity"
    if stats is None:
        candidates = [ckpt.parent / "dataset_statistics.json", ckpt.parent.parent / "dataset_statistics.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(
                f"no dataset_statistics.json beside {ckpt} or in {ckpt.parent.parent}: pass --stats FILE (CogACT's "
                "dataset_statistics.json), or --stats identity to keep actions in normalised units (fine-tuning with "
                "`damvla train --init` replaces them with your dataset's)"
            )
        path = found[0]
    else:
        path = Path(stats)
        if not path.is_file():
            raise FileNotFoundError(f"--stats {path} does not exist")
    data = json.loads(path.read_text())
    keys = sorted(data)
    if unnorm_key is None:
        if len(keys) != 1:
            raise ValueError(f"{path} holds statistics of {len(keys)} datasets: pick one with --unnorm-key ({keys[:10]})")
        unnorm_key = keys[0]
    if unnorm_key not in data or "action" not in data[unnorm_key]:
        raise ValueError(f"{path}: no action statistics for --unnorm-key {unnorm_key!r} (have {keys[:10]})")
    a = data[unnorm_key]["action"]
    for k in ("q01", "q99"):
        if k not in a:
            raise ValueError(f"{path}: {unnorm_key}.action lacks {k!r}")
    q01 = np.asarray(a["q01"], dtype=np.float64)
    mask = np.asarray(a.get("mask", [True] * len(q01)), dtype=bool)
    if len(q01) != action_dim:
        raise ValueError(f"{path}: {unnorm_key} has {len(q01)} action dimensions, the action model {action_dim}")
    return ActionNormalizer(q01, a["q99"], mask), f"{path}:{unnorm_key}"


# ---- the conversion -----------------------------------------------------------------------------------
def convert_cogact(
    checkpoint: str | Path,
    llama: str | Path,
    out: str | Path,
    ablation: str = "cogact",
    stats: str | None = None,
    unnorm_key: str | None = None,
    ema: bool = False,
    seed: int = 0,
    overrides: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write a damvla checkpoint folder converted from a CogACT checkpoint; returns the folder."""
    import torch

    from damvla import __version__
    from damvla.model.dit import DiTActionHead
    from damvla.model.policy import DAMVLAPolicy, write_policy_files
    from damvla.model.router import Router
    from damvla.model.weights import write_safetensors_streaming

    ckpt, dst = Path(checkpoint), Path(out)
    if (dst / "model.safetensors").exists() and not force:
        raise ValueError(f"--out {dst} already holds a checkpoint: pick another folder or pass --force")
    model = load_cogact_state(ckpt)
    cfg = cogact_config(model, llama, ablation, list(overrides or []), ema)
    normalizer, stats_src = cogact_normalizer(ckpt, stats, unnorm_key, cfg.action_dim)
    with torch.device("meta"):  # the target keys and shapes, without allocating the model
        skeleton = DAMVLAPolicy(cfg, normalizer, load_pretrained=False)
    specs = [(k, tuple(v.shape), v.dtype) for k, v in skeleton.state_dict().items()]
    targets = {k for k, _, _ in specs}
    v = cfg.vision
    vb, net = model["vision_backbone"], _action_net(model, ema)
    mapping: dict[str, Producer] = {}
    mapping.update(_dinov2_map(vb, v.dinov2.num_layers - 1, targets))
    mapping.update(_siglip_map(vb, v.siglip.num_layers - 1, targets))  # type: ignore[union-attr]
    for j in (0, 2, 4):
        for leaf in ("weight", "bias"):
            mapping[f"language.projector.net.{j}.{leaf}"] = _get(model["projector"], f"projector.{j}.{leaf}")
    lb = model["llm_backbone"]
    for k in lb:
        if k.startswith("llm.model."):
            mapping["language.llm." + k[len("llm.model.") :]] = _get(lb, k)
    # The new parts of DAM-VLA, freshly initialised (small: heads and router).
    torch.manual_seed(seed)
    new_prefixes: list[str] = []
    for name, head in skeleton.heads.items():
        fresh: dict[str, Any] = {}
        if head.num_visual:
            fresh = DiTActionHead(cfg.dit, cfg.action_dim, cfg.horizon, cfg.language.hidden_size + cfg.state_dim,
                                  v.dinov2.hidden_size, head.num_visual).state_dict()  # fmt: skip
            new_prefixes += [f"heads.{name}.{k}" for k in ("visual_proj", "null_visual", "pos_embed[1:1+V]")]
        mapping.update(_head_map(net, f"heads.{name}.", cfg.dit.depth, head.num_visual, fresh))
    if skeleton.router is not None:
        router = Router(cfg.language.hidden_size, cfg.router_hidden).state_dict()
        mapping.update({f"router.{k}": _const(v) for k, v in router.items()})
        new_prefixes.append("router")
    unused = set(mapping) - targets
    missing = sorted(targets - set(mapping))
    if missing or unused:
        raise ValueError(
            f"conversion mapping does not cover the policy: missing {missing[:6]}, unexpected {sorted(unused)[:6]} "
            "(a transformers version with other module names?)"
        )
    skipped = _unused_source_keys(model, cfg, ema)
    dst.mkdir(parents=True, exist_ok=True)
    metadata = {
        "converted_from": {
            "format": "cogact", "checkpoint": str(ckpt.resolve()), "ablation": ablation,
            "action_model": "ema_diffusion" if ema else "action_model", "statistics": stats_src,
            "new_parameters": new_prefixes, "seed": seed, "skipped_source_keys": skipped, "damvla_version": __version__,
        }
    }  # fmt: skip
    total = sum(int(torch.Size(s).numel()) * torch.empty((), dtype=d).element_size() for _, s, d in specs)
    bar = _progress_bar(total, progress, f"writing {dst / 'model.safetensors'}")
    try:
        with torch.no_grad():
            write_safetensors_streaming(dst / "model.safetensors", specs, lambda k: mapping[k](), progress=bar)
    finally:
        bar.close()
    tokenizer = None
    if cfg.language.tokenizer not in (None, "byte"):
        from damvla.model.tokenizer import HFTokenizer

        tokenizer = HFTokenizer(cfg.language.tokenizer)
    write_policy_files(dst, cfg, normalizer, metadata, tokenizer)
    return dst


def _unused_source_keys(model: dict[str, dict[str, Any]], cfg: Any, ema: bool) -> list[str]:
    """Groups of source keys the conversion leaves out on purpose (recorded in metadata.json)."""
    out = [f"vision_backbone.dino_featurizer.blocks.{cfg.vision.dinov2.num_layers - 1}.* (last block: never run)",
           "vision_backbone.dino_featurizer.norm.* (features come before the final norm)",
           f"vision_backbone.siglip_featurizer.blocks.{cfg.vision.siglip.num_layers - 1}.*",
           "vision_backbone.siglip_featurizer.{norm,attn_pool}.*", "llm_backbone.llm.lm_head.weight (actions only)",
           "action_model.net.history_embedder.* (unused by CogACT)"]  # fmt: skip
    out.append("action_model.*" if ema else "ema_diffusion.*" if "ema_diffusion" in model else "")
    return [s for s in out if s]


class _NoBar:
    def __call__(self, n: int) -> None:
        return None

    def close(self) -> None:
        return None


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr)

    class _Bar:
        def __call__(self, n: int) -> None:
            bar.update(n)

        def close(self) -> None:
            bar.close()

    return _Bar()
