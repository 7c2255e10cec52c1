"""Thin layer over diffusers' schedulers (METHOD.md §2): training noise, DDIM sampling, guidance.

Training: DDPM with ``train_steps`` steps and a cosine (``squaredcos_cap_v2``) schedule, ε-prediction.
Sampling: DDIM with ``inference_steps`` steps, eta 0, x0 clipped to [-1, 1] unless ``clip_sample`` is off. A fresh DDIM scheduler is made for every call,
so changing the step count between calls cannot reuse a stale timestep table (a CogACT bug).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from damvla.config import DiffusionConfig

# eps_fn(x_t (N, H, D), t (N,), uncond (N,) bool) -> predicted noise (N, H, D)
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainingDraws:
    """Pre-drawn training randomness for B samples x R repeated diffusion steps (sample-major).

    Lets a trainer derive each sample's draws from its own seed (e.g. from its position in the data
    order), so results do not depend on how a global batch is split over devices or micro-batches.
    """

    noise: torch.Tensor  # (B, R, H, D) float: ε
    timesteps: torch.Tensor  # (B, R) int64 in [0, train_steps)
    drop_cond: torch.Tensor  # (B, R) bool: replace the condition by the null condition


class Diffusion:
    def __init__(self, cfg: DiffusionConfig) -> None:
        if cfg.prediction_type != "epsilon":
            raise ValueError(f"diffusion.prediction_type={cfg.prediction_type!r}: only 'epsilon' is implemented")
        self.cfg = cfg
        self._kw = dict(
            num_train_timesteps=cfg.train_steps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction_type,
            # Actions live in [-1, 1]: clip the x0 estimate there (ours), or not (CogACT).
            clip_sample=cfg.clip_sample,
        )
        self.train_scheduler = DDPMScheduler(variance_type="fixed_small", **self._kw)

    def ddim_scheduler(self) -> DDIMScheduler:
        """A fresh DDIM scheduler whose ᾱ table is computed in float64 (diffusers multiplies float32 betas):
        CogACT's guided-diffusion sampler uses float64 tables, and at the first steps of the cosine
        schedule x0 = (x - sqrt(1 - ᾱ) ε) / sqrt(ᾱ) amplifies a float32 cumulative-product error ~1e-6."""
        sched = DDIMScheduler(**self._kw)
        sched.alphas_cumprod = alphas_cumprod_f64(self.cfg, sched.betas)
        return sched

    def add_noise(
        self,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw t ~ U{0..T-1} and ε ~ N(0, I) per sample (unless given); return (x_t, ε, t)."""
        n = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.cfg.train_steps, (n,), device=x0.device, generator=generator)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return self.train_scheduler.add_noise(x0, noise, t), noise, t

    def sample(
        self,
        eps_fn: EpsFn,
        noise: torch.Tensor,
        cfg_scale: float | None = None,
        steps: int | None = None,
    ) -> torch.Tensor:
        """DDIM from ``noise`` (B, H, D) to x0, with classifier-free guidance when cfg_scale != 1:
        ε = ε_uncond + s (ε_cond - ε_uncond), both halves in one batched call."""
        scale = self.cfg.cfg_scale if cfg_scale is None else cfg_scale
        sched = self.ddim_scheduler()
        sched.set_timesteps(steps or self.cfg.inference_steps, device=noise.device)
        x = noise
        b = x.shape[0]
        guided = scale != 1.0
        uncond = torch.zeros(2 * b if guided else b, dtype=torch.bool, device=x.device)
        if guided:
            uncond[b:] = True
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if guided else x
            tt = t.expand(xin.shape[0]).to(x.device)
            eps = eps_fn(xin, tt, uncond).to(x.dtype)
            if guided:
                e_c, e_u = eps.chunk(2)
                eps = e_u + scale * (e_c - e_u)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x


def alphas_cumprod_f64(cfg: DiffusionConfig, betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t in float64: the cosine schedule from its closed form (as guided diffusion computes it), any other
    schedule from diffusers' betas."""
    if cfg.beta_schedule == "squaredcos_cap_v2":
        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = cfg.train_steps
        b = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    else:
        b = betas.double()
    return torch.cumprod(1.0 - b, dim=0)
