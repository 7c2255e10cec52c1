"""DINOv2-with-registers + SigLIP (Prismatic/CogACT's fused vision tower), built with transformers.

One forward returns everything DAM-VLA reads from the images (METHOD.md §1):
the channel-concatenated patch features of both encoders' second-to-last block (no final norm), and
DINOv2's class token and register tokens from the same block. The last block of each encoder is never
run, so it is not even built: a real checkpoint's last-block weights are skipped explicitly on load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from damvla.config import EncoderConfig, VisionConfig
from damvla.model.weights import build_hf_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


@dataclass
class VisionFeatures:
    patches: torch.Tensor  # (B, N, C_dino + C_siglip)
    cls: torch.Tensor  # (B, 1, C_dino)
    registers: torch.Tensor  # (B, R, C_dino)


def dinov2_config(e: EncoderConfig, image_size: int) -> Dinov2WithRegistersConfig:
    if e.intermediate_size % e.hidden_size:
        raise ValueError(
            f"vision.dinov2.intermediate_size={e.intermediate_size} must be a multiple of hidden_size={e.hidden_size}"
        )
    return Dinov2WithRegistersConfig(
        hidden_size=e.hidden_size,
        num_hidden_layers=e.num_layers - 1,  # we read the 2nd-to-last block
        num_attention_heads=e.num_heads,
        mlp_ratio=e.intermediate_size // e.hidden_size,
        patch_size=e.patch_size,
        image_size=e.native_image_size or image_size,
        num_register_tokens=e.num_register_tokens,
        layerscale_value=e.layerscale_value,
    )


def siglip_config(e: EncoderConfig, image_size: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=e.hidden_size,
        intermediate_size=e.intermediate_size,
        num_hidden_layers=e.num_layers - 1,
        num_attention_heads=e.num_heads,
        patch_size=e.patch_size,
        image_size=e.native_image_size or image_size,
        vision_use_head=False,
    )


class DualVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        d, s, size = cfg.dinov2, cfg.siglip, cfg.image_size
        # Built by transformers from the weights on disk where a path is given (no random init, one copy).
        self.dinov2 = build_hf_model(
            Dinov2WithRegistersModel, dinov2_config(d, size), d.pretrained_path if load_pretrained else None,
            "vision.dinov2.pretrained_path", allowed_unexpected=(rf"layer\.{d.num_layers - 1}\.", r"^layernorm\."),
        )  # fmt: skip
        self.siglip = build_hf_model(
            SiglipVisionModel, siglip_config(s, size), s.pretrained_path if load_pretrained else None,
            "vision.siglip.pretrained_path",
            allowed_unexpected=(rf"layers\.{s.num_layers - 1}\.", r"post_layernorm\.", r"head\."),
        )
        # The final norms are never applied (2nd-to-last block features), so they are not parameters here.
        self.dinov2.layernorm = nn.Identity()
        self._siglip_vt.post_layernorm = nn.Identity()
        self._siglip_interp = (cfg.siglip.native_image_size or cfg.image_size) != cfg.image_size
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
        x_s = ((pixels - self.siglip_mean) / self.siglip_std).to(dtype)
        h = self.dinov2.encoder(self.dinov2.embeddings(x_d)).last_hidden_state  # (B, 1 + R + N, Cd)
        r = self.cfg.dinov2.num_register_tokens
        emb = self._siglip_vt.embeddings(x_s, interpolate_pos_encoding=self._siglip_interp)
        g = self._siglip_vt.encoder(inputs_embeds=emb).last_hidden_state  # (B, N, Cs)
        patches = torch.cat([h[:, 1 + r :], g], dim=-1)
        return VisionFeatures(patches=patches, cls=h[:, :1], registers=h[:, 1 : 1 + r])
