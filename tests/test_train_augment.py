"""Training-time image augmentation: per-sample determinism, what a shift and a colour jitter do, and that
runs saved before augmentation existed resume without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from damvla.training.augment import augment_images, shift_pixels
from damvla.training.config import TrainConfig


def images(b: int = 6, side: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, side, side), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_each_sample_depends_only_on_its_own_seed() -> None:
    x, seeds = images(), torch.arange(100, 106)
    a = augment_images(x, seeds, 0.15, 0.3)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, augment_images(x, seeds, 0.15, 0.3))  # repeatable
    # the same sample with the same seed in another batch, at another position, comes out the same
    b = augment_images(torch.stack([x[4], x[0]]), torch.tensor([104, 100]), 0.15, 0.3)
    assert torch.equal(b[0], a[4]) and torch.equal(b[1], a[0])
    # other seeds give other augmentations
    assert not torch.equal(augment_images(x, seeds + 1000, 0.15, 0.3), a)


def test_shift_is_an_integer_translation_with_edge_padding() -> None:
    side = 20
    x = images(16, side)
    pad = shift_pixels(side, 0.1)
    assert pad == 2
    out = augment_images(x, torch.arange(16), 0.1, 0.0)
    padded = torch.nn.functional.pad(x.float(), (pad,) * 4, mode="replicate").to(torch.uint8)
    offsets = []
    for i in range(16):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if torch.equal(padded[i, :, dy : dy + side, dx : dx + side], out[i])]  # fmt: skip
        assert hits, f"sample {i} is not a shift of at most {pad} px"
        offsets.append(hits[0])
    assert len(set(offsets)) > 3  # offsets vary across samples


def test_colour_jitter_keeps_geometry_and_zero_strength_is_the_identity() -> None:
    x = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    x[:, 0] = 180  # a reddish flat image
    out = augment_images(x, torch.arange(4), 0.0, 0.4)
    assert not torch.equal(out, x)
    # a flat image stays flat per channel (no spatial change), intensities within the jitter's reach
    assert (out.amax(dim=(2, 3)) == out.amin(dim=(2, 3))).all()
    assert augment_images(x, torch.arange(4), 0.0, 0.0) is x


@pytest.mark.parametrize(("shift", "color"), [(-0.1, 0.0), (0.0, 1.0)])
def test_bad_strengths_are_refused(shift: float, color: float) -> None:
    with pytest.raises(ValueError, match="shift"):
        augment_images(images(), torch.arange(6), shift, color)
    with pytest.raises(ValueError, match="aug_shift"):
        TrainConfig(aug_shift=abs(shift) + 0.3 if shift else 0.0, aug_color=color).validate()


def test_runs_saved_before_augmentation_resume_without_it() -> None:
    old = dataclasses.asdict(TrainConfig())
    del old["aug_shift"], old["aug_color"]
    t = TrainConfig.from_dict(old)
    assert t.aug_shift == 0.0 and t.aug_color == 0.0
    assert TrainConfig.from_dict(dataclasses.asdict(TrainConfig(aug_shift=0.05))).aug_shift == 0.05
