"""AdamW with decay on matrices only, linear warm-up then cosine / constant LR, and an EMA of the weights."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from damvla.training.config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay only on >= 2-D weights (not norms, biases,
    class/register/null tokens), the usual transformer recipe."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters (check --freeze / --lora)")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach (not fused): identical numerics on CPU and with DTensor parameters under FSDP2.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimiser step ``step`` (0-based)."""
    if cfg.warmup and step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


class EMA:
    """Exponential moving average of the trainable parameters (fp32, same sharding as the parameters).

    ``decay`` is warmed up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated by the
    random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadow = list(self.shadow.values())
        torch._foreach_lerp_(shadow, [p.detach().float() for p in self.params.values()], 1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the EMA weights; the live ones come back after."""
        live = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.shadow[n].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(live[n])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.updates = int(state["updates"])  # type: ignore[arg-type]
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = set(self.shadow) - set(shadow)
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]} ... (was the run started with other --freeze/--lora?)")
        with torch.no_grad():
            for n, v in self.shadow.items():
                src = shadow[n]
                if hasattr(v, "device_mesh") and not hasattr(src, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src.to(v.device), v.device_mesh, v.placements)
                v.copy_(src.to(v.device) if not hasattr(src, "device_mesh") else src)
