"""Several cameras (``vision.extra_cameras``): the dataset, the per-camera feature caches, the policy's
tokens, training, the Meta-World envs and collection, evaluation's checks and the server's observation map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from damvla.config import apply_overrides, preset
from damvla.data.lerobot import LeRobotWriter
from damvla.model.policy import DAMVLAPolicy
from damvla.model.vision import FEATURE_KEYS, feature_keys
from damvla.serving.observation import ObservationMap, observation_to_batch
from damvla.training.data import build_dataset, draw_training
from damvla.training.feature_cache import CachedFeatureDataset, FeatureCache

CAM, WRIST = "observation.images.image", "observation.images.wrist"
FROZEN = ["vision.siglip=null", "vision.frozen=true", "vision.gripper_queries=2", "vision.dinov2.num_register_tokens=0",
          "vision.dinov2.num_layers=2", "language.num_layers=2", "dit.depth=1", "state_dim=2"]  # fmt: skip
TWO = ['vision.extra_cameras=["wrist"]', "vision.patch_position=true"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(root: Path, lengths: tuple[int, ...] = (6, 5), side: int = 20, seed: int = 0) -> Path:
    feats = {
        CAM: {"dtype": "image", "shape": [side, side, 3]},
        WRIST: {"dtype": "image", "shape": [side, side, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [7]},
    }
    info = {"damvla": {"gripper_index": 6, "gripper_threshold": 0.5, "gripper_open": 1.0}}
    w = LeRobotWriter(root, fps=10, features=feats, image_mode="image", extra_info=info)
    for e, t in enumerate(lengths):
        rng = np.random.default_rng((seed, e))
        a = rng.normal(size=(t, 7)).astype(np.float32)
        a[:, -1] = (np.arange(t) < t // 2).astype(np.float32)
        frames = {k: rng.integers(0, 256, (t, side, side, 3), dtype=np.uint8) for k in (CAM, WRIST)}
        state = rng.normal(size=(t, 2)).astype(np.float32)
        w.add_episode(frames | {"observation.state": state, "action": a}, task=f"pick block {e}")
    return w.finalize()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("mc") / "ds")


def make(root: Path, *extra: str) -> tuple[DAMVLAPolicy, object]:
    cfg = apply_overrides(preset("tiny"), FROZEN + list(extra))
    ds = build_dataset(str(root), cfg)
    torch.manual_seed(0)
    return DAMVLAPolicy(cfg, ds.normalizer, ds.metadata), ds


def test_config_names_the_cameras_and_refuses_bad_lists() -> None:
    cfg = apply_overrides(preset("tiny"), TWO)
    assert cfg.vision.cameras == ["image", "wrist"]
    with pytest.raises(ValueError, match="must be a list of camera names"):
        apply_overrides(preset("tiny"), ["vision.extra_cameras=wrist"])  # not JSON: a bare string
    with pytest.raises(ValueError, match="distinct non-empty camera names"):
        apply_overrides(preset("tiny"), ['vision.extra_cameras=["image"]'])


def test_dataset_samples_and_metadata_hold_every_camera(dataset: Path) -> None:
    policy, ds = make(dataset, *TWO)
    x = ds[3]
    s = policy.config.vision.image_size
    assert x[CAM].shape == x[WRIST].shape == (3, s, s) and not torch.equal(x[CAM], x[WRIST])
    assert ds.metadata["camera_keys"] == [CAM, WRIST] == policy.image_keys
    with pytest.raises(ValueError, match=r"no camera 'observation.images.top' \(config vision.extra_cameras=\['top'\]\)"):
        make(dataset, 'vision.extra_cameras=["top"]')


def test_data_check_names_the_main_camera_and_how_to_read_the_other(
    dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from damvla.cli import main

    assert main(["data", "check", str(dataset), "--camera", "image"]) == 0
    out = capsys.readouterr().out
    assert f"main camera: {CAM} (a policy reads the others with vision.extra_cameras='[\"wrist\"]')" in out
    assert f"decoded every frame of {WRIST}: ok" in out


def test_policy_reads_every_camera(dataset: Path) -> None:
    policy, ds = make(dataset, *TWO)
    one, _ = make(dataset, "vision.patch_position=true")
    n = policy.config.vision.num_patches
    batch = default_collate([ds[i] for i in (0, 7)])
    feats, f_cog, _ = policy.encode(batch)
    assert feats.patches.shape[1] == 2 * n and feats.cls.shape[1] == 2  # both grids, both class tokens
    assert policy.heads["arm"].num_visual == 2 and one.heads["arm"].num_visual == 1
    assert policy.camera_code is not None and one.camera_code is None
    other = dict(batch)
    other[WRIST] = torch.flip(batch[WRIST], dims=[-1])  # only the second camera changes
    assert not torch.allclose(policy.encode(other)[1], f_cog)
    del other[WRIST]
    with pytest.raises(ValueError, match="batch lacks 'observation.images.wrist'"):
        policy.encode(other)


def test_loss_on_per_camera_caches_equals_the_loss_computed_online(dataset: Path, tmp_path: Path) -> None:
    policy, ds = make(dataset, *TWO)
    policy.set_state_stats([0.1, -0.2], [1.5, 0.5])
    caches = FeatureCache.for_cameras(policy, ds, tmp_path)
    assert len(caches) == 2 and caches[0].key != caches[1].key  # each camera's frames have their own cache
    for key, c in zip(ds.camera_keys, caches):
        c.build(policy.vision, ds, batch_size=4, progress=False, camera_key=key)
    assert caches[0].key == FeatureCache.for_policy(policy, ds, tmp_path).key  # the first: as with one camera
    cached = CachedFeatureDataset(ds, caches)
    rows = [0, 4, 9]
    online = default_collate([ds[i] for i in rows])
    offline = default_collate([cached[i] for i in rows])
    assert CAM not in offline and WRIST not in offline
    assert all(k in offline for k in list(FEATURE_KEYS.values()) + list(feature_keys(1).values()))
    cfg = policy.config
    draws = draw_training(torch.arange(len(rows)), cfg.diffusion.repeated_steps, cfg.horizon, cfg.action_dim,
                          cfg.diffusion.train_steps, 0.5)  # fmt: skip
    policy.train()
    loss_online, _ = policy(online, draws=draws)
    loss_cached, _ = policy(offline, draws=draws)
    torch.testing.assert_close(loss_cached, loss_online, rtol=1e-5, atol=1e-6)
    loss_cached.backward()
    assert policy.camera_code.grad is not None and policy.camera_code.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="2 feature caches for a dataset of 1 cameras"):
        _, ds1 = make(dataset)
        CachedFeatureDataset(ds1, caches)


def test_train_cli_builds_one_cache_per_camera_and_saves_the_cameras(dataset: Path, tmp_path: Path) -> None:
    from damvla.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--dataset", str(dataset), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--num-workers", "0", "--threads", "1", "--feature-cache", str(tmp_path / "cache"),
            *FROZEN, *TWO]  # fmt: skip
    assert main(args) == 0
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 2
    from damvla.training.checkpoint import find_checkpoint

    policy = DAMVLAPolicy.from_pretrained(find_checkpoint(out))
    assert policy.config.vision.cameras == ["image", "wrist"] and policy.metadata["camera_keys"] == [CAM, WRIST]


def test_server_map_requires_every_camera_the_policy_reads() -> None:
    m = ObservationMap.default(["image", "wrist"])
    assert m.images["observation/wrist_image"] == "wrist" and sorted(m.required) == ["observation/image", "observation/wrist_image"]
    img = np.zeros((20, 20, 3), np.uint8)
    obs = {"observation/image": img, "observation/wrist_image": img + 1, "observation/state": np.zeros(2, np.float32),
           "prompt": "pick"}  # fmt: skip
    batch = observation_to_batch(obs, m, 28)
    assert batch[CAM].shape == batch[WRIST].shape == (1, 3, 28, 28)
    with pytest.raises(ValueError, match="missing keys"):
        observation_to_batch({k: v for k, v in obs.items() if k != "observation/wrist_image"}, m, 28)
    with pytest.raises(ValueError, match="no request key maps to camera 'top'"):
        ObservationMap.from_dict({"images": {"observation/image": "image"}}, ["image", "top"])
    three = ObservationMap.default(["image", "wrist", "top"])
    assert three.images["observation/top"] == "top" and "observation/top" in three.required


@pytest.mark.sim
def test_metaworld_collect_records_extra_cameras_and_a_two_camera_policy_drives_eval(tmp_path: Path) -> None:
    """`collect --extra-cameras front` stores the second view; a policy that reads it passes eval's checks, gets
    both views at every chunk and runs closed loop; one whose data lacked the camera is refused."""
    pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")
    from damvla.cli import main
    from damvla.data.lerobot import LeRobotDatasetReader
    from damvla.envs.metaworld import MetaWorldEnv
    from damvla.evaluate import check_checkpoint
    from damvla.normalize import ActionNormalizer

    env = MetaWorldEnv("reach-v3", "corner4", 32, extra_cameras=("front",))
    obs = env.reset(env.sample_initial_state(0))
    assert obs["images"]["front"].shape == obs["image"].shape == (32, 32, 3)
    assert not np.array_equal(obs["images"]["front"], obs["image"])
    np.testing.assert_array_equal(obs["images"]["front"], MetaWorldEnv("reach-v3", "front", 32).reset(
        env.sample_initial_state(0))["image"])  # fmt: skip  (the same view as a single-camera env's)
    env.close()

    data = tmp_path / "ds"
    assert main(["collect", "metaworld", "--suite", "reach", "--episodes", "1", "--workers", "1", "--resolution", "32",
                 "--max-steps", "80", "--extra-cameras", "front", "--out", str(data), "--no-progress"]) == 0  # fmt: skip
    reader = LeRobotDatasetReader(data)
    front = "observation.images.front"
    assert set(reader.camera_keys) == {CAM, front} and reader.info["damvla"]["recipe"]["extra_cameras"] == ["front"]
    a, b = reader.episode_frames(0, CAM), reader.episode_frames(0, front)
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() > 5

    cfg = apply_overrides(preset("tiny"), ['vision.extra_cameras=["front"]', "dit.depth=1"])
    ds = build_dataset(str(data), cfg)
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), ds.metadata, load_pretrained=False)
    setup = check_checkpoint(policy, ["reach-v3"], None, None)
    assert setup.extra_cameras == ["front"] and setup.camera == "corner4"
    ckpt = policy.save_pretrained(tmp_path / "ckpt")
    seen: list[list[str]] = []
    real = DAMVLAPolicy.predict_action_chunk

    def spy(self, batch, *a, **kw):
        seen.append(sorted(k for k in batch if k.startswith("observation.images.")))
        return real(self, batch, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DAMVLAPolicy, "predict_action_chunk", spy)
        assert main(["eval", str(ckpt), "--suite", "reach", "--episodes", "1", "--max-steps", "6", "--execute-steps", "3",
                     "--out", str(tmp_path / "eval"), "--no-progress", "--threads", "1", "--videos", "1"]) == 0  # fmt: skip
    assert seen and all(keys == sorted([CAM, front]) for keys in seen)
    # the episode's video films both cameras side by side: twice as wide as one square view is high
    import av

    from damvla.evaluation.video import BAR_HEIGHT

    video = next((tmp_path / "eval" / "videos").rglob("*.mp4"))
    with av.open(str(video)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape[1] == 2 * (frame.shape[0] - BAR_HEIGHT)

    other = DAMVLAPolicy(apply_overrides(preset("tiny"), ['vision.extra_cameras=["corner2"]', "dit.depth=1"]),
                         ActionNormalizer.identity(7), ds.metadata | {"camera_keys": [CAM, "observation.images.corner2"]},
                         load_pretrained=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"vision.extra_cameras=\['corner2'\], but the training data rendered extra cameras \['front'\]"):
        check_checkpoint(other, ["reach-v3"], None, None)
