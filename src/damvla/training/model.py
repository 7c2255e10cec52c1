"""What trains: freezing stages, LoRA on the LLM (peft), the parameter report, and the state dict a
checkpoint exports (gathered from FSDP shards, EMA weights when EMA is on, LoRA merged into the LLM)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from damvla.model.policy import VISION_REFERENCE, DAMVLAPolicy, check_vision_reference

# Parameters the policy's forward never reads (DINOv2's masked-image-modelling token): they would get no
# gradient, which DDP treats as an error and AdamW as missing state, so they never train.
UNUSED_PARAMS = ("vision.dinov2.embeddings.mask_token",)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def component_of(name: str) -> str:
    """The report group of a parameter name."""
    for prefix, comp in (
        ("vision.dinov2.", "vision.dinov2"), ("vision.siglip.", "vision.siglip"), ("language.projector.", "projector"),
        ("router.", "router"),
    ):  # fmt: skip
        if name.startswith(prefix):
            return comp
    if name.startswith("language.llm."):
        return "llm.lora" if ".lora_" in name else "llm"
    if name.startswith("heads."):
        return "head." + name.split(".")[1]
    return name.split(".")[0]


def apply_freeze(policy: DAMVLAPolicy, stage: str) -> None:
    """Set requires_grad per freezing stage (see damvla.training.arguments.FREEZE_HELP). LoRA adapters are handled by add_lora."""
    frozen: list[nn.Module] = []
    if stage in ("vision", "llm", "heads_only") or policy.config.vision.frozen:
        frozen.append(policy.vision)
    if stage in ("llm", "heads_only"):
        frozen.append(policy.language.llm)
    if stage == "heads_only":
        frozen.append(policy.language.projector)
    for p in policy.parameters():
        p.requires_grad_(True)
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    for name, p in policy.named_parameters():
        if name in UNUSED_PARAMS:
            p.requires_grad_(False)


def add_lora(policy: DAMVLAPolicy, rank: int, alpha: float | None) -> float:
    """Inject LoRA adapters (peft) into the LLM's attention and MLP projections, in place, and freeze the
    LLM's base weights. Dropout is 0 so training keeps no hidden RNG draws. Returns the LoRA scaling."""
    from peft import LoraConfig, inject_adapter_in_model

    alpha = float(alpha if alpha is not None else 2 * rank)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(cfg, policy.language.llm)
    for name, p in policy.language.llm.named_parameters():
        p.requires_grad_(".lora_" in name)
    return alpha / rank


def parameter_report(policy: nn.Module) -> tuple[str, dict[str, dict[str, int]]]:
    """A table of trainable / total parameters per component and the trainable module groups."""
    counts: dict[str, dict[str, int]] = {}
    groups: dict[str, set[str]] = {}
    for name, p in policy.named_parameters():
        comp = component_of(name)
        c = counts.setdefault(comp, {"trainable": 0, "total": 0})
        c["total"] += p.numel()
        if p.requires_grad:
            c["trainable"] += p.numel()
            # module group: the name with layer numbers collapsed, e.g. language.llm.layers.*.self_attn
            groups.setdefault(comp, set()).add(re.sub(r"\.\d+\.", ".*.", name.rsplit(".", 1)[0]))
    tot = {"trainable": sum(c["trainable"] for c in counts.values()), "total": sum(c["total"] for c in counts.values())}
    lines = [f"  {'component':<16} {'trainable':>14} {'total':>14}"]
    for comp, c in counts.items():
        lines.append(f"  {comp:<16} {c['trainable']:>14,} {c['total']:>14,}")
    lines.append(f"  {'total':<16} {tot['trainable']:>14,} {tot['total']:>14,}")
    lines.append("  trainable module groups:")
    for comp, gs in groups.items():
        shown = sorted(gs)
        more = f" ... (+{len(shown) - 6})" if len(shown) > 6 else ""
        lines.append(f"    {comp}: {', '.join(shown[:6])}{more}")
    counts["total"] = tot
    return "\n".join(lines), counts


def merge_lora(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft-injected state dict -> the plain one: W = W_base + scaling * B @ A, adapter keys dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if ".base_layer." in k:
            prefix, leaf = k.split(".base_layer.")
            a_key, b_key = f"{prefix}.lora_A.default.weight", f"{prefix}.lora_B.default.weight"
            if leaf == "weight" and a_key in state:
                v = v + scaling * (state[b_key].float() @ state[a_key].float()).to(v.dtype)
            k = f"{prefix}.{leaf}"
        out[k] = v
    return out


def export_state(full_state: dict[str, torch.Tensor], ema: dict[str, torch.Tensor] | None,
                 lora_scaling: float | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The policy's exported weights: EMA values for the trainable parameters when EMA is on, LoRA merged."""
    state = dict(full_state)
    if ema is not None:
        for k, v in ema.items():
            state[k] = v.to(state[k].dtype)
    if lora_scaling is not None:
        state = merge_lora(state, lora_scaling)
    return state


def export_policy(policy: DAMVLAPolicy, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> DAMVLAPolicy:
    """A plain policy (no LoRA modules) holding ``state``, built on the meta device (no extra memory) and
    filled by assignment; use its ``save_pretrained``."""
    with torch.device("meta"):
        out = DAMVLAPolicy(policy.config, policy.normalizer, metadata, load_pretrained=False)
    out.load_state_dict(state, strict=True, assign=True)
    out.language.set_tokenizer(policy.language.tokenizer)
    return out


# ---- starting from a checkpoint without building the model twice -----------------------------------
@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (no memory) while their buffers are real:
    buffers computed in ``__init__`` (RoPE frequencies, normalisation constants) are not in checkpoints, so
    they must survive. Each parameter is created, then replaced by its meta twin at once (with ``skip_init``
    active nothing is initialised), so peak memory is one tensor."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate (uninitialised) storage for meta parameters on ``device``, keeping every buffer's value."""
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    module.to_empty(device=device)
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n])


def load_checkpoint_weights(module: nn.Module, path: str | Path, missing_ok: tuple[str, ...] = ()) -> None:
    """Copy a ``model.safetensors`` into ``module`` one tensor at a time. Parameters sharded by FSDP2
    (DTensors) receive only this rank's shard: a dim-0 shard is one contiguous byte range of the file, and
    each rank reads just that (the OS page cache shares the file between ranks), so no rank ever holds a
    whole tensor it does not keep. The file is read, not memory-mapped, so its pages do not count in the
    ranks' RSS either. ``missing_ok``: key prefixes the file may lack (weights the module already holds,
    e.g. a referenced frozen encoder)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from damvla.model.weights import SafetensorsReader, _check_keys

    own = module.state_dict()
    with SafetensorsReader(path) as reader, torch.no_grad():
        shapes = reader.shapes()
        own = {k: v for k, v in own.items() if k in shapes or not k.startswith(missing_ok)}
        _check_keys(own, shapes, str(path))
        for k, dst in own.items():
            if isinstance(dst, DTensor):
                local = dst.to_local()
                if all(p == Shard(0) or p.is_replicate() for p in dst.placements):
                    # FSDP2's dim-0 shard is a contiguous block of rows: read only those bytes.
                    shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
                    src = reader.read(k, rows=(offset[0], shape[0])) if dst.ndim else reader.read(k)
                    local.copy_(src.reshape(local.shape))
                else:
                    full = reader.read(k).to(device=dst.device, dtype=dst.dtype)
                    local.copy_(distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
            else:
                dst.copy_(reader.read(k))


def policy_from_checkpoint(
    path: str | Path,
    config: Any,
    normalizer: Any,
    metadata: dict[str, Any],
    shard: Callable[[nn.Module], nn.Module] | None,
    device: torch.device,
) -> tuple[DAMVLAPolicy, nn.Module | None]:
    """A policy of ``config`` holding the weights of the checkpoint folder ``path`` (e.g. a converted
    CogACT), built without a full host copy per rank: parameters on the meta device first, then

    - ``shard`` given (FSDP2): sharded while still on meta, then only this rank's shards are allocated
      and filled; returns (policy, wrapped model);
    - otherwise: allocated once on ``device`` and filled tensor by tensor; returns (policy, None).

    Either way the checkpoint file is read one tensor at a time. Freezing is the caller's (before
    ``shard``: FSDP2 needs requires_grad settled)."""
    from damvla.model.weights import skip_init

    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--init {path}: no model.safetensors (expected a damvla checkpoint folder)")
    meta_file = Path(path) / "metadata.json"
    ref = json.loads(meta_file.read_text()).get(VISION_REFERENCE) if meta_file.is_file() else None
    with skip_init(), parameters_on_meta():
        policy = DAMVLAPolicy(config, normalizer, metadata, load_pretrained=False)
    model = None
    if shard is not None:
        model = shard(policy)
    materialize(policy, device)
    if ref is not None:
        # The checkpoint references its frozen encoder instead of copying it (DAMVLAPolicy.save_pretrained):
        # read it from vision.*.pretrained_path, as DAMVLAPolicy.from_pretrained does, and check it is the one.
        from damvla.model.vision import DualVisionEncoder

        with torch.no_grad():
            policy.vision.load_state_dict(DualVisionEncoder(config.vision, load_pretrained=True).state_dict())
        check_vision_reference(policy, ref, f"--init {path}")
    load_checkpoint_weights(policy, weights, missing_ok=("vision.",) if ref is not None else ())
    return policy, model
