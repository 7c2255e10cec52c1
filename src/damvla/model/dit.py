"""The DiT action head (CogACT's design, METHOD.md §2).

Plain pre-LN transformer blocks with full bidirectional attention and no adaLN: the condition enters
as prefix tokens in front of the H noisy action tokens. The prefix outputs are dropped; a
zero-initialised linear layer reads out the predicted noise. Two ways to build the prefix
(``DiTConfig.condition``):

- ``"tokens"`` (ours): ``[timestep, Linear(f_cog), visual...]``; classifier-free guidance replaces the
  condition tokens by learned null tokens in head width.
- ``"cogact"`` (CogACT's DiT): ``[timestep + Linear(f_cog), visual...]``; guidance replaces f_cog by a
  learned null vector in LLM width *before* the Linear, and the visual tokens by learned null tokens.
  With no visual tokens this is CogACT's ``DiT.forward`` exactly (its weights load by
  ``damvla.convert``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from damvla.config import DiTConfig


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of the diffusion step, then a 2-layer MLP (as DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, hidden)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, h)
        b, n, h = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # full bidirectional attention
        return self.proj(y.transpose(1, 2).reshape(b, n, h))


class DiTBlock(nn.Module):
    """Pre-LN block: LN (no affine) -> attention, LN (no affine) -> GELU-tanh MLP."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DiTActionHead(nn.Module):
    """Predicts the noise of an action chunk from its noisy version and the condition.

    Args:
        cfg: sizes.
        action_dim: D. horizon: H.
        cond_dim: width of the cognition latent f_cog (the LLM hidden size).
        visual_dim: width of the visual condition tokens (DINOv2 hidden size); 0 for none.
        num_visual: how many visual condition tokens (1 class token, or the register tokens).
    """

    def __init__(
        self, cfg: DiTConfig, action_dim: int, horizon: int, cond_dim: int, visual_dim: int = 0, num_visual: int = 0
    ) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.horizon, self.action_dim, self.num_visual = horizon, action_dim, num_visual
        if cfg.condition not in ("tokens", "cogact"):
            raise ValueError(f"dit.condition={cfg.condition!r}: expected 'tokens' or 'cogact'")
        self.condition = cfg.condition
        self.fused = cfg.condition == "cogact"  # timestep and f_cog share one prefix token
        self.num_prefix = (1 if self.fused else 2) + num_visual
        self.t_embedder = TimestepEmbedder(h)
        self.cond_proj = nn.Linear(cond_dim, h)
        self.visual_proj = nn.Linear(visual_dim, h) if num_visual else None
        self.x_embedder = nn.Linear(action_dim, h)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + horizon, h))
        # Classifier-free guidance: the condition is replaced by these learned "unconditional" values.
        if self.fused:
            self.null_cond = nn.Parameter(torch.zeros(1, cond_dim))  # replaces f_cog (LLM width)
            self.null_visual = nn.Parameter(torch.zeros(1, num_visual, h)) if num_visual else None
        else:
            self.null_cond = nn.Parameter(torch.zeros(1, 1 + num_visual, h))  # replaces the condition tokens
            self.null_visual = None
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(h, action_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        if self.null_visual is not None:
            nn.init.normal_(self.null_visual, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # Zero read-out: the head starts by predicting zero noise, as DiT does.
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)

    def condition_tokens(self, cond: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """(B, cond_dim), (B, num_visual, visual_dim) -> (B, 1 + num_visual, h) condition tokens."""
        tokens = [self.cond_proj(cond)[:, None]]
        if self.visual_proj is not None:
            if visual is None or visual.shape[1] != self.num_visual:
                got = None if visual is None else tuple(visual.shape)
                raise ValueError(f"action head expects {self.num_visual} visual condition tokens, got {got}")
            tokens.append(self.visual_proj(visual))
        return torch.cat(tokens, dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        visual: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, H, D) noisy actions, t (B,) steps, cond (B, cond_dim) f_cog, visual (B, V, visual_dim),
        drop_cond (B,) bool: use the null condition for these samples. Returns predicted noise (B, H, D)."""
        if self.fused:
            prefix = self._fused_prefix(t, cond, visual, drop_cond)
        else:
            c = self.condition_tokens(cond, visual)
            if drop_cond is not None:
                c = torch.where(drop_cond[:, None, None], self.null_cond.to(c.dtype).expand_as(c), c)
            prefix = torch.cat([self.t_embedder(t)[:, None].to(c.dtype), c], dim=1)
        tokens = torch.cat([prefix, self.x_embedder(x.to(prefix.dtype))], dim=1)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.final(self.final_norm(tokens[:, self.num_prefix :]))

    def _fused_prefix(
        self, t: torch.Tensor, cond: torch.Tensor, visual: torch.Tensor | None, drop_cond: torch.Tensor | None
    ) -> torch.Tensor:
        """CogACT's prefix: (B, 1 + num_visual, h) = [t_emb + Linear(f_cog or null), visual or null visual]."""
        dtype = self.cond_proj.weight.dtype
        cond = cond.to(dtype)
        if drop_cond is not None:
            cond = torch.where(drop_cond[:, None], self.null_cond.to(dtype).expand_as(cond), cond)
        tokens = [(self.t_embedder(t).to(dtype) + self.cond_proj(cond))[:, None]]
        if self.visual_proj is not None:
            if visual is None or visual.shape[1] != self.num_visual:
                got = None if visual is None else tuple(visual.shape)
                raise ValueError(f"action head expects {self.num_visual} visual condition tokens, got {got}")
            v = self.visual_proj(visual.to(dtype))
            if drop_cond is not None:
                assert self.null_visual is not None
                v = torch.where(drop_cond[:, None, None], self.null_visual.to(dtype).expand_as(v), v)
            tokens.append(v)
        return torch.cat(tokens, dim=1)
