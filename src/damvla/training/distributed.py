"""torchrun environment, process group and model wrapping (PyTorch's own DDP and FSDP2, nothing else)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a new tensor on ``x``'s device)."""
        if not self.distributed:
            return x.clone()
        y = x.to(self.device).clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and start the process group (nccl on GPU, gloo on
    CPU). Without torchrun this is a single process and no group is created."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world, device_id=dev if use_cuda else None)
    return DistContext(rank, world, local, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_units(policy: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the LLM decoder layers and both ViTs' blocks. Everything else
    (embeddings, projector, heads, router) belongs to the root unit, i.e. is gathered for the whole
    forward: small, and the policy calls ``llm.embed_tokens`` outside ``llm.forward``."""
    units: list[nn.Module] = list(policy.language.llm.layers)
    units += list(policy.vision.dinov2.encoder.layer)
    if policy.vision.siglip is not None:
        units += list(policy.vision._siglip_vt.encoder.layers)
    return units


def wrap_model(policy: nn.Module, ctx: DistContext, parallel: str, bf16: bool) -> nn.Module:
    """DDP (replicated) or FSDP2 (``fully_shard`` per block + root) when several processes run; the
    plain module otherwise."""
    if not ctx.distributed:
        return policy
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        # bf16 compute with fp32 master weights and fp32 gradient reduction. The root does not cast its
        # inputs: the batch's float actions and noise must stay fp32 (the policy casts what it needs).
        kw = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}
        for unit in shard_units(policy):
            fully_shard(unit, mesh=mesh, mp_policy=MixedPrecisionPolicy(**kw))
        fully_shard(policy, mesh=mesh, mp_policy=MixedPrecisionPolicy(**kw, cast_forward_inputs=False))
        return policy
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(policy, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The policy inside a DDP wrapper (FSDP2 modifies the module in place, so it is its own policy)."""
    return getattr(model, "module", model)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on non-final accumulation micro-steps (DDP ``no_sync``; FSDP2
    ``set_requires_gradient_sync``)."""
    if sync:
        yield
        return
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif hasattr(model, "no_sync"):
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield
