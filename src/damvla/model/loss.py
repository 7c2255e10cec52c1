"""The DAM-VLA training objective (METHOD.md §4), in one place.

Per element (sample at step t, chunk index j):
    w^a(j)          = gamma**j                        (action-chunk scale; 1 with ACW off)
    gripper head:     w^t(t+j) * w^a(j)               (trajectory scale; w^t = 1 with TW off)
    arm head:   (1 - w^t(t+j)) * w^a(j)
    single head:  (1 + boost * w^t(t+j)) * w^a(j)    (TW on without DAM; our choice, see config)
    padded steps:   0
L_k     = sum(weight_k * ||eps_hat_k - eps||^2 / D) / (number of unpadded elements)
L_total = sum_k L_k + lambda * BCE(router logit, routing label)
With every switch off this is exactly CogACT's masked ε-MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from damvla.config import AblationConfig, WeightingConfig


def dual_scale_weights(
    trajectory_weight: torch.Tensor | None,
    is_pad: torch.Tensor,
    num_heads: int,
    ablation: AblationConfig,
    weighting: WeightingConfig,
) -> torch.Tensor:
    """(B, H) trajectory weights w^t(t+j), (B, H) pad mask -> (B, H, K) per-head element weights."""
    b, h = is_pad.shape
    dev = is_pad.device
    j = torch.arange(h, device=dev, dtype=torch.float32)
    chunk = weighting.chunk_gamma**j if ablation.acw else torch.ones(h, device=dev)
    if ablation.tw:
        if trajectory_weight is None:
            raise ValueError("batch lacks 'trajectory_weight' (B, H), needed with ablation.tw on")
        wt = trajectory_weight.float()
        if wt.shape != (b, h):
            raise ValueError(f"trajectory_weight: expected shape {(b, h)}, got {tuple(wt.shape)}")
        if num_heads == 2:
            per_head = torch.stack([1 - wt, wt], dim=-1)  # arm, gripper
        else:
            per_head = (1 + weighting.single_head_tw_boost * wt)[..., None]
    else:
        per_head = torch.ones(b, h, num_heads, device=dev)
    valid = (~is_pad.bool()).float()
    return per_head * chunk[None, :, None] * valid[..., None]


def diffusion_losses(
    eps_pred: list[torch.Tensor],
    eps: torch.Tensor,
    weights: torch.Tensor,
    is_pad: torch.Tensor,
    n_valid: float | torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Weighted ε-MSE per head. eps_pred: K tensors (N, H, D); eps (N, H, D); weights (N, H, K); is_pad (N, H).
    n_valid: the divisor; default the unpadded elements of this batch (data-parallel training passes the
    global count divided by the number of micro-batches, so the gradient is the whole global batch's)."""
    if n_valid is None:
        n_valid = (~is_pad.bool()).sum().clamp_min(1)
    out = []
    for k, pred in enumerate(eps_pred):
        err = (pred.float() - eps.float()).pow(2).mean(-1)  # (N, H)
        out.append((weights[..., k] * err).sum() / n_valid)
    return out


def router_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE between sigmoid(logit) = w and the routing label (1 = gripper phase)."""
    return F.binary_cross_entropy_with_logits(logit.float(), label.float())
