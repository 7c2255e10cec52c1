"""Training-time image augmentation: random shift (pad with edge pixels, crop back at a random offset, as in
DrQ and Diffusion Policy) and optional colour jitter (brightness, contrast, saturation).

Each sample's augmentation is drawn from its own per-sample seed (the same seed its diffusion draws come
from, on a separate stream), so augmented runs keep the trainer's guarantees: identical whatever the number
of processes, accumulation steps or loader workers, and exact on resume. Evaluation and serving never
augment; a shift keeps the image size, so the policy sees the same geometry at test time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_STREAM = 0x5EED_A06  # separates the augmentation stream from the diffusion draws of the same seed


def shift_pixels(image_size: int, shift: float) -> int:
    """The maximum shift in pixels for a ``shift`` given as a fraction of the image side."""
    return int(round(shift * image_size))


def augment_images(images: torch.Tensor, seeds: torch.Tensor, shift: float, color: float) -> torch.Tensor:
    """Augment a batch of uint8 ``(B, 3, S, S)`` images, sample ``i`` by ``seeds[i]`` alone.

    Args:
        images: uint8 images at the model's resolution (any device).
        seeds: int64 ``(B,)`` per-sample seeds.
        shift: maximum translation as a fraction of the side (0 disables); offsets are uniform integers in
            ``[-p, p]`` per axis, ``p = round(shift * S)``, and uncovered pixels repeat the edge.
        color: colour-jitter strength (0 disables): brightness and contrast factors uniform in
            ``[1 - color, 1 + color]``, saturation in ``[1 - 2 color, 1 + 2 color]``.
    Returns:
        uint8 images of the same shape (the input itself when both are 0).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"augment_images: expected uint8 (B, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if shift < 0 or color < 0 or color >= 1:
        raise ValueError(f"augment_images: need shift >= 0 and 0 <= color < 1, got shift={shift}, color={color}")
    b, _, h, w = images.shape
    pad = shift_pixels(min(h, w), shift)
    if pad == 0 and color == 0:
        return images
    offsets, factors = [], []
    for s in seeds.tolist():
        g = torch.Generator().manual_seed((int(s) ^ _STREAM) & (2**63 - 1))
        offsets.append(torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist())
        factors.append(1.0 + (2.0 * torch.rand(3, generator=g) - 1.0) * torch.tensor([color, color, 2 * color]))
    out = images
    if pad:
        padded = F.pad(images.float(), (pad, pad, pad, pad), mode="replicate")
        out = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
    if color:
        x = out.float() if out.dtype == torch.uint8 else out
        f = torch.stack(factors).to(device=x.device, dtype=x.dtype)  # (B, 3): brightness, contrast, saturation
        x = x * f[:, 0, None, None, None]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * f[:, 1, None, None, None] + mean
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        out = (x - grey) * f[:, 2, None, None, None] + grey
    return out.round().clamp(0, 255).to(torch.uint8)
