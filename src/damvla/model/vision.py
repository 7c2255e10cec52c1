"""DINOv2-with-registers + SigLIP (Prismatic/CogACT's fused vision tower), built with transformers.

One forward returns everything DAM-VLA reads from the images (METHOD.md §1):
the channel-concatenated patch features of both encoders' second-to-last block (no final norm), and
DINOv2's class token and register tokens from the same block. The last block of each encoder is never
run, so it is not even built: a real checkpoint's last-block weights are skipped explicitly on load.

``vision.siglip = None`` gives a DINOv2-only tower; a DINOv2 without registers (DINOv2-S, the ``cpu``
preset) is transformers' plain ``Dinov2Model``. Its gripper-head tokens then come from
:class:`PatchQueries`, learned queries over the patch tokens (our stand-in; docs/method.md). Position
embeddings are interpolated from the native table at run time by transformers, identically in the
feature cache and online.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from damvla.config import EncoderConfig, VisionConfig
from damvla.model.weights import build_hf_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# Batch keys under which a feature cache hands the policy what the vision tower would return.
FEATURE_KEYS = {"patches": "features.patches", "cls": "features.cls", "registers": "features.registers"}


def feature_keys(camera_index: int) -> dict[str, str]:
    """``FEATURE_KEYS`` of the policy's ``camera_index``-th camera (``vision.cameras``): the first camera's are
    ``FEATURE_KEYS`` themselves, camera k's end in ``.k``."""
    return FEATURE_KEYS if camera_index == 0 else {f: f"{k}.{camera_index}" for f, k in FEATURE_KEYS.items()}


@dataclass
class VisionFeatures:
    patches: torch.Tensor  # (B, N, C_dino + C_siglip)
    cls: torch.Tensor  # (B, 1, C_dino)
    registers: torch.Tensor  # (B, R, C_dino)


def dinov2_config(e: EncoderConfig, image_size: int) -> Dinov2Config | Dinov2WithRegistersConfig:
    """transformers config of our truncated DINOv2: ``Dinov2WithRegisters`` with registers, else plain
    ``Dinov2`` (whose checkpoints, e.g. facebook/dinov2-small, then load unchanged)."""
    if e.intermediate_size % e.hidden_size:
        raise ValueError(
            f"vision.dinov2.intermediate_size={e.intermediate_size} must be a multiple of hidden_size={e.hidden_size}"
        )
    kw = dict(
        hidden_size=e.hidden_size,
        num_hidden_layers=e.num_layers - 1,  # we read the 2nd-to-last block
        num_attention_heads=e.num_heads,
        mlp_ratio=e.intermediate_size // e.hidden_size,
        patch_size=e.patch_size,
        image_size=e.native_image_size or image_size,
        layerscale_value=e.layerscale_value,
        hidden_act=e.hidden_act,
    )
    if e.num_register_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=e.num_register_tokens, **kw)
    return Dinov2Config(**kw)


def siglip_config(e: EncoderConfig, image_size: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=e.hidden_size,
        intermediate_size=e.intermediate_size,
        num_hidden_layers=e.num_layers - 1,
        num_attention_heads=e.num_heads,
        patch_size=e.patch_size,
        image_size=e.native_image_size or image_size,
        vision_use_head=False,
        hidden_act=e.hidden_act,  # "gelu": exact, as timm's SigLIP (transformers defaults to the tanh form)
    )


class DualVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        from damvla.model.weights import resolve_pretrained_path

        self.cfg = cfg
        d, s, size = cfg.dinov2, cfg.siglip, cfg.image_size
        dino_cls = Dinov2WithRegistersModel if d.num_register_tokens else Dinov2Model
        # Built by transformers from the weights on disk where a path is given (no random init, one copy).
        self.dinov2 = build_hf_model(
            dino_cls, dinov2_config(d, size),
            resolve_pretrained_path(d.pretrained_path, "vision.dinov2.pretrained_path") if load_pretrained else None,
            "vision.dinov2.pretrained_path", allowed_unexpected=(rf"layer\.{d.num_layers - 1}\.", r"^layernorm\."),
        )  # fmt: skip
        # The final norms are never applied (2nd-to-last block features), so they are not parameters here.
        self.dinov2.layernorm = nn.Identity()
        self.siglip: nn.Module | None = None
        if s is not None:
            self.siglip = build_hf_model(
                SiglipVisionModel, siglip_config(s, size),
                resolve_pretrained_path(s.pretrained_path, "vision.siglip.pretrained_path") if load_pretrained else None,
                "vision.siglip.pretrained_path",
                allowed_unexpected=(rf"layers\.{s.num_layers - 1}\.", r"post_layernorm\.", r"head\."),
            )  # fmt: skip
            self._siglip_vt.post_layernorm = nn.Identity()
        self._siglip_interp = s is not None and (s.native_image_size or cfg.image_size) != cfg.image_size
        for name, mean, std in (("dino", IMAGENET_MEAN, IMAGENET_STD), ("siglip", SIGLIP_MEAN, SIGLIP_STD)):
            self.register_buffer(f"{name}_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"{name}_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def _siglip_vt(self) -> nn.Module:
        # transformers 5 flattened SiglipVisionModel; 4.x nests it under .vision_model.
        return getattr(self.siglip, "vision_model", self.siglip)

    def forward(self, pixels: torch.Tensor) -> VisionFeatures:
        """pixels: (B, 3, S, S) float in [0, 1]."""
        dtype = self.dinov2.embeddings.patch_embeddings.projection.weight.dtype
        x_d = ((pixels - self.dino_mean) / self.dino_std).to(dtype)
        h = self.dinov2.encoder(self.dinov2.embeddings(x_d)).last_hidden_state  # (B, 1 + R + N, Cd)
        r = self.cfg.dinov2.num_register_tokens
        patches = h[:, 1 + r :]
        if self.siglip is not None:
            x_s = ((pixels - self.siglip_mean) / self.siglip_std).to(dtype)
            emb = self._siglip_vt.embeddings(x_s, interpolate_pos_encoding=self._siglip_interp)
            g = self._siglip_vt.encoder(inputs_embeds=emb).last_hidden_state  # (B, N, Cs)
            patches = torch.cat([patches, g], dim=-1)
        k = self.cfg.patch_pool
        if k > 1:  # average k x k neighbouring patches (row-major grid)
            b, n, c = patches.shape
            side = int(round(n**0.5))
            grid = patches.transpose(1, 2).reshape(b, c, side, side)
            patches = torch.nn.functional.avg_pool2d(grid, k).flatten(2).transpose(1, 2)
        return VisionFeatures(patches=patches, cls=h[:, :1], registers=h[:, 1 : 1 + r])

    def train(self, mode: bool = True) -> DualVisionEncoder:
        # A frozen tower stays in eval mode, so its features are the cached ones whatever the policy's mode.
        return super().train(mode and not self.cfg.frozen)


def grid_position_code(num_patches: int, dim: int) -> torch.Tensor:
    """(num_patches, dim) fixed 2-D sine-cosine code of a row-major square patch grid: half the channels
    encode the row, half the column, each as sin/cos pairs at frequencies spaced geometrically from
    one period over the grid to one radian per cell (so every cell of a small grid gets a distinct code)."""
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"grid_position_code: {num_patches} patches are not a square grid")
    n_freq = dim // 4
    freqs = torch.logspace(math.log10(2 * math.pi / (2 * side)), 0.0, max(n_freq, 1))[:n_freq]
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        ang = coord[:, None] * freqs[None]
        parts += [torch.sin(ang), torch.cos(ang)]
    code = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(code, (0, dim - code.shape[1]))  # dim not divisible by 4: zero tail


class PatchQueries(nn.Module):
    """Learned queries that pick local tokens for the gripper head out of the DINOv2 patch tokens, standing
    in for register tokens when the encoder has none (our choice; docs/method.md); ``vision.arm_queries``
    gives the arm head a set of its own. Each query is a learned
    spatial soft-attention: softmax over the patches of (query . key(LN(patch))), and its token is that
    weighted mean of the raw patch features, so it lives in the DINOv2 width like a register would.
    Keys are projected to a small width: on a CPU the projection of every patch is the whole cost."""

    def __init__(self, num_queries: int, dim: int, key_dim: int = 64) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, key_dim) * key_dim**-0.5)
        self.norm = nn.LayerNorm(dim)
        self.key = nn.Linear(dim, key_dim, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches (B, N, C) -> (B, Q, C)."""
        k = self.key(self.norm(patches))  # (B, N, key_dim)
        attn = torch.softmax(self.queries.to(k.dtype) @ k.transpose(1, 2) * k.shape[-1] ** -0.5, dim=-1)
        return attn @ patches
