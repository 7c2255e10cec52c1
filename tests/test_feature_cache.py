"""The frozen-encoder feature cache: cached features give the online loss, and any change of encoder,
resolution or dataset gives another cache (never a stale read); builds resume from their parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from damvla.config import apply_overrides, preset
from damvla.data.dataset import PolicyDataset
from damvla.data.lerobot import LeRobotWriter
from damvla.model.policy import DAMVLAPolicy
from damvla.model.vision import FEATURE_KEYS
from damvla.training import feature_cache as fc
from damvla.training.data import build_dataset, draw_training
from damvla.training.feature_cache import CachedFeatureDataset, FeatureCache

CAM = "observation.images.image"
# A frozen DINOv2-only tower without registers (the cpu preset's shape), tiny sizes.
FROZEN = ["vision.siglip=null", "vision.frozen=true", "vision.gripper_queries=2", "vision.dinov2.num_register_tokens=0",
          "vision.dinov2.num_layers=2", "language.num_layers=2", "dit.depth=1", "state_dim=2"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(root: Path, lengths: tuple[int, ...] = (7, 5, 6), side: int = 20, seed: int = 0) -> Path:
    feats = {
        CAM: {"dtype": "image", "shape": [side, side, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [7]},
    }
    info = {"damvla": {"gripper_index": 6, "gripper_threshold": 0.5, "gripper_open": 1.0}}
    w = LeRobotWriter(root, fps=10, features=feats, image_mode="image", extra_info=info)
    for e, t in enumerate(lengths):
        rng = np.random.default_rng((seed, e))
        a = rng.normal(size=(t, 7)).astype(np.float32)
        a[:, -1] = (np.arange(t) < t // 2).astype(np.float32)
        frames = rng.integers(0, 256, (t, side, side, 3), dtype=np.uint8)
        state = rng.normal(size=(t, 2)).astype(np.float32)
        w.add_episode({CAM: frames, "observation.state": state, "action": a}, task=f"pick block {e}")
    return w.finalize()


def frozen_config(*extra: str):
    return apply_overrides(preset("tiny"), FROZEN + list(extra))


def make(root: Path, *extra: str) -> tuple[DAMVLAPolicy, PolicyDataset]:
    cfg = frozen_config(*extra)
    ds = build_dataset(str(root), cfg)
    torch.manual_seed(0)
    return DAMVLAPolicy(cfg, ds.normalizer, ds.metadata), ds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("fc") / "ds")


@pytest.mark.parametrize("extra", [("vision.patch_position=false",), ("vision.patch_position=true",),
                                   ("vision.patch_position=true", "vision.arm_queries=3")])  # fmt: skip
def test_loss_on_cached_features_equals_the_loss_computed_online(dataset: Path, tmp_path: Path, extra: tuple) -> None:
    policy, ds = make(dataset, *extra)
    policy.set_state_stats([0.1, -0.2], [1.5, 0.5])
    cache = FeatureCache.for_policy(policy, ds, tmp_path)
    cache.build(policy.vision, ds, batch_size=4, progress=False)  # batches that split episodes
    cached = CachedFeatureDataset(ds, cache)
    rows = [0, 3, 8, 17]
    online = default_collate([ds[i] for i in rows])
    offline = default_collate([cached[i] for i in rows])
    assert CAM not in offline and all(k in offline for k in FEATURE_KEYS.values())
    seeds = torch.arange(len(rows))
    r, cfg = policy.config.diffusion.repeated_steps, policy.config
    draws = draw_training(seeds, r, cfg.horizon, cfg.action_dim, cfg.diffusion.train_steps, 0.5)
    policy.train()  # condition dropout on: the draws decide it identically in both passes
    loss_online, logs_online = policy(online, draws=draws)
    loss_cached, logs_cached = policy(offline, draws=draws)
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-5, atol=1e-6)
    for k in logs_online:
        assert logs_cached[k] == pytest.approx(logs_online[k], rel=1e-5, abs=1e-6), k
    # and the gradient reaches the trainable parts after the cache (queries, projector, heads) alike
    loss_cached.backward()
    assert policy.gripper_queries is not None and policy.gripper_queries.queries.grad is not None
    if policy.config.vision.arm_queries:
        assert policy.arm_queries.queries.grad is not None and policy.heads["arm"].num_visual == 1 + 3
    assert all(p.grad is None for p in policy.vision.parameters())


def test_frozen_tower_stays_in_eval_mode_and_has_no_trainable_weights(dataset: Path) -> None:
    policy, _ = make(dataset)
    policy.train()
    assert not policy.vision.training
    assert not any(p.requires_grad for p in policy.vision.parameters())


def test_changed_encoder_resolution_or_dataset_gives_another_cache(dataset: Path, tmp_path: Path) -> None:
    policy, ds = make(dataset)
    base = FeatureCache.for_policy(policy, ds, tmp_path)
    base.build(policy.vision, ds, progress=False)
    assert base.complete and FeatureCache.for_policy(policy, ds, tmp_path).complete  # same inputs: reused

    with torch.no_grad():  # one weight of the encoder changed
        next(policy.vision.dinov2.encoder.parameters()).view(-1)[0] += 1e-3
    changed_weights = FeatureCache.for_policy(policy, ds, tmp_path)
    assert changed_weights.key != base.key and not changed_weights.complete

    policy2, ds2 = make(dataset, "vision.image_size=28")  # another resolution
    assert FeatureCache.for_policy(policy2, ds2, tmp_path).key != base.key

    policy3, ds3 = make(dataset, "vision.patch_pool=2")  # same weights, pooled output
    assert fc.encoder_fingerprint(policy3.vision, {}) == fc.encoder_fingerprint(make(dataset)[0].vision, {})
    assert FeatureCache.for_policy(policy3, ds3, tmp_path).key != base.key

    other = write_dataset(tmp_path / "other", seed=1)  # same shape, other frames
    p4, ds4 = make(other)
    assert FeatureCache.for_policy(p4, ds4, tmp_path).key != base.key

    p_pos, ds_pos = make(dataset, "vision.patch_position=true")  # applied after the cache: the same cache
    assert FeatureCache.for_policy(p_pos, ds_pos, tmp_path).key == base.key
    p_arm, ds_arm = make(dataset, "vision.arm_queries=2")  # trained after the cache too
    assert FeatureCache.for_policy(p_arm, ds_arm, tmp_path).key == base.key

    copy = write_dataset(tmp_path / "copy", seed=0)  # identical bytes elsewhere: same content, same cache
    p5, ds5 = make(copy)
    assert FeatureCache.for_policy(p5, ds5, tmp_path).key == base.key


def test_flipped_frame_bytes_change_the_dataset_fingerprint(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds")
    _, ds = make(root)
    before = fc.dataset_fingerprint(ds)
    f = ds.reader.data_path(ds.episode_indices[0])
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert fc.dataset_fingerprint(ds) != before


def test_interrupted_build_resumes_from_its_parts(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    policy, ds = make(dataset)
    monkeypatch.setattr(fc, "EPISODES_PER_PART", 1)
    cache = FeatureCache.for_policy(policy, ds, tmp_path)
    calls = {"n": 0}
    forward = type(policy.vision).forward

    def dying(self, pixels):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while computing episode 1
        return forward(self, pixels)

    monkeypatch.setattr(type(policy.vision), "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.build(policy.vision, ds, batch_size=64, progress=False)
    assert not cache.complete and len(list((cache.dir / "parts").glob("part-*.npz"))) == 1
    calls["n"] = 10
    cache.build(policy.vision, ds, batch_size=64, progress=False)
    assert calls["n"] == 10 + 2  # only the two missing episodes were computed
    assert cache.complete and not (cache.dir / "parts").exists()
    monkeypatch.setattr(type(policy.vision), "forward", forward)
    full = np.load(cache.dir / "patches.npy")
    fresh = FeatureCache(tmp_path / "fresh", cache.encoder_fp, cache.dataset_fp)
    fresh.build(policy.vision, ds, progress=False)
    np.testing.assert_allclose(full, np.load(fresh.dir / "patches.npy"), rtol=1e-5, atol=1e-6)
    meta = json.loads((cache.dir / "meta.json").read_text())
    assert meta["frames"] == len(ds) == full.shape[0]


def test_cached_dataset_pickles_without_its_arrays(dataset: Path, tmp_path: Path) -> None:
    import pickle

    policy, ds = make(dataset)
    cache = FeatureCache.for_policy(policy, ds, tmp_path)
    cache.build(policy.vision, ds, progress=False)
    cached = CachedFeatureDataset(ds, cache)
    first = cached[3]
    blob = pickle.dumps(cached)  # what a DataLoader worker receives
    assert len(blob) < np.load(cache.dir / "patches.npy", mmap_mode="r").nbytes
    again = pickle.loads(blob)[3]
    assert torch.equal(again["features.patches"], first["features.patches"])


def test_augmented_views_hold_the_frame_and_its_augmented_copies(dataset: Path, tmp_path: Path) -> None:
    from damvla.data.dataset import resize_images
    from damvla.training.augment import augment_images
    from damvla.training.feature_cache import AugmentedViews

    policy, ds = make(dataset)
    plain = FeatureCache.for_policy(policy, ds, tmp_path)
    plain.build(policy.vision, ds, progress=False)
    views = AugmentedViews(3, 0.15, 0.2)
    cache = FeatureCache.for_policy(policy, ds, tmp_path, views=views)
    assert cache.key != plain.key and cache.key != FeatureCache.for_policy(policy, ds, tmp_path, views=AugmentedViews(3, 0.1, 0.2)).key
    cache.build(policy.vision, ds, batch_size=4, progress=False)  # batches that split episodes
    patches = np.load(cache.dir / "patches.npy")
    assert patches.shape[:2] == (len(ds), 3)
    np.testing.assert_allclose(patches[:, 0], np.load(plain.dir / "patches.npy"), rtol=1e-5, atol=1e-6)  # view 0: the frame
    # view v of a frame: the tower's output on that frame augmented with its (episode, frame, view) seed
    ep, f = ds.episode_indices[1], 2
    row = int(ds._ep_start[1]) + f
    frame = resize_images(ds._episode_frames(1, CAM)[f : f + 1], ds.image_size)  # as the build sees it
    for v in (1, 2):
        x = augment_images(frame, views.seeds(int(ep), range(f, f + 1), v), views.shift, views.color)
        assert not torch.equal(x, frame)
        with torch.no_grad():
            want = policy.vision(x.float() / 255.0).patches[0].numpy()
        np.testing.assert_allclose(patches[row, v], want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(patches[:, 1], patches[:, 2])

    cached = CachedFeatureDataset(ds, cache)
    # the validation read is the frame itself; a training draw reads the view its seed picks, repeatably
    assert torch.equal(cached[row]["features.patches"], torch.from_numpy(patches[row, 0]))
    picks = [views.pick(s) for s in range(60)]
    assert set(picks) == {0, 1, 2} and picks == [views.pick(s) for s in range(60)]
    for s in range(6):
        got = cached.get_seeded(row, s)["features.patches"]
        assert torch.equal(got, torch.from_numpy(patches[row, views.pick(s)]))
    with pytest.raises(ValueError, match="views >= 2"):
        AugmentedViews(1, 0.1, 0.0)
