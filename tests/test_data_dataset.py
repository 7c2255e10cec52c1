"""PolicyDataset: the CONTRACTS.md sample against hand-computed values, bad inputs, workers, `damvla data check`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from damvla.cli import main
from damvla.data.dataset import EpisodeBlockSampler, PolicyDataset, resize_images
from damvla.data.lerobot import LeRobotWriter
from damvla.normalize import ActionNormalizer

CAM = "observation.images.image"
S = 16  # stored image side
LENGTHS = [10, 6]


def _actions(t: int, e: int) -> np.ndarray:
    """(T, 3): x ramps, y constant (near-constant dim), gripper open (1) then closed (0) from step 3."""
    a = np.zeros((t, 3), np.float32)
    a[:, 0] = np.arange(t) * (1 + e) - 2
    a[:, 1] = 0.25
    a[:, 2] = np.where(np.arange(t) < 3, 1.0, 0.0)
    return a


def _frames(t: int, e: int) -> np.ndarray:
    rng = np.random.default_rng(e)
    return rng.integers(0, 256, size=(t, S, S, 3), dtype=np.uint8)


def write_dataset(root: Path, mode: str = "image", lengths: list[int] = LENGTHS, damvla: dict | None = None,
                  actions=_actions, cam: str = CAM) -> Path:  # fmt: skip
    feats = {
        cam: {"dtype": "image", "shape": [S, S, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [3]},
        "observation.phase": {"dtype": "int64", "shape": [1]},
    }
    extra = {
        "damvla": damvla
        if damvla is not None
        else {"gripper_index": 2, "gripper_threshold": 0.5, "gripper_open": 1.0}
    }
    w = LeRobotWriter(root, fps=10, features=feats, image_mode=mode, extra_info=extra)
    for e, t in enumerate(lengths):
        phase = np.zeros(t, np.int64)
        phase[t // 2 :] = 1
        w.add_episode({cam: _frames(t, e), "observation.state": np.full((t, 2), e, np.float32),
                       "action": actions(t, e), "observation.phase": phase}, task=f"do thing {e}")  # fmt: skip
    return w.finalize()


@pytest.fixture(scope="module")
def image_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("img") / "ds", "image")


def _w(s: float, event: float, lead: float = 6.0, trail: float = 2.0) -> float:
    sigma = lead if s < event else trail
    return math.exp(-((s - event) ** 2) / (2 * sigma**2))


def test_sample_matches_hand_computed_chunk_pad_normalisation_and_weights(image_ds: Path) -> None:
    ds = PolicyDataset(image_ds, horizon=4, image_size=S)
    assert len(ds) == sum(LENGTHS)
    all_x = np.concatenate([_actions(t, e)[:, 0] for e, t in enumerate(LENGTHS)]).astype(np.float64)
    q01, q99 = np.quantile(all_x, 0.01), np.quantile(all_x, 0.99)

    x = ds[7]  # episode 0, frame 7, T = 10: steps 7, 8, 9, then one padded step
    assert set(x) == {CAM, "observation.state", "task", "action", "action_is_pad", "trajectory_weight",
                      "router_label", "episode_index", "frame_index", "index"}  # fmt: skip
    assert x[CAM].dtype == torch.uint8 and x[CAM].shape == (3, S, S)
    np.testing.assert_array_equal(x[CAM].numpy(), _frames(10, 0)[7].transpose(2, 0, 1))  # PNG: lossless
    assert x["task"] == "do thing 0" and x["observation.state"].dtype == torch.float32
    assert x["action_is_pad"].tolist() == [False, False, False, True]
    raw_x = np.array([7, 8, 9, 9]) - 2.0  # last action repeated on the padded step
    expect_x = np.clip(2 * (raw_x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(x["action"][:, 0].numpy(), expect_x, rtol=1e-5, atol=1e-6)
    assert x["action"][:, 1].tolist() == [0.0] * 4  # near-constant dimension -> 0
    assert x["action"][:, 2].tolist() == [0.0] * 4  # closed gripper, binary, not normalised
    # one flip at t = 3 (open -> closed): w(s) = exp(-(s-3)^2 / (2 sigma^2)), sigma 6 before, 2 from 3 on
    np.testing.assert_allclose(x["trajectory_weight"].numpy(), [_w(s, 3) for s in (7, 8, 9, 9)], rtol=1e-5)
    assert x["router_label"].item() == 0  # w(7) = exp(-2) < 0.5
    assert (x["episode_index"].item(), x["frame_index"].item(), x["index"].item()) == (0, 7, 7)

    y = ds[10 + 1]  # episode 1, frame 1 (before the flip): gripper open for steps 1, 2
    assert y["action"][:, 2].tolist() == [1.0, 1.0, 0.0, 0.0]
    np.testing.assert_allclose(y["trajectory_weight"].numpy(), [_w(s, 3) for s in (1, 2, 3, 4)], rtol=1e-5)
    assert y["router_label"].item() == 1  # w(1) = exp(-4/72) >= 0.5
    assert (y["episode_index"].item(), y["frame_index"].item(), y["index"].item()) == (1, 1, 11)
    assert y["task"] == "do thing 1"

    assert ds.normalizer.normalize.tolist() == [True, True, False]
    np.testing.assert_allclose(ds.normalizer.q01[0], q01)
    meta = ds.metadata
    assert meta["camera_key"] == CAM and meta["fps"] == 10 and meta["damvla"]["gripper_index"] == 2
    assert meta["features"]["action"] == [3]
    json.dumps(meta)


def test_resize_and_video_mode_and_episode_subset(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "v", "video")
    ds = PolicyDataset(root, horizon=3, image_size=8, episodes=[1])
    assert len(ds) == LENGTHS[1] and ds[0]["episode_index"].item() == 1
    img = ds[2][CAM]
    assert img.shape == (3, 8, 8) and img.dtype == torch.uint8
    ref = resize_images(torch.from_numpy(_frames(6, 1)[2:3]).permute(0, 3, 1, 2), 8)[0]
    assert (img.int() - ref.int()).abs().float().mean() < 12  # lossy video, then the same resize
    up = PolicyDataset(root, horizon=3, image_size=24)[0][CAM]  # upsampling: cached small, resized per item
    assert up.shape == (3, 24, 24)


def test_phase_key_drives_weights_and_labels_instead_of_the_gripper(image_ds: Path) -> None:
    ds = PolicyDataset(image_ds, horizon=2, image_size=S, phase_key="observation.phase")
    x = ds[0]  # episode 0: phase switches 0 -> 1 at t = 5 (T = 10)
    np.testing.assert_allclose(x["trajectory_weight"].numpy(), [_w(0, 5), _w(1, 5)], rtol=1e-5)
    assert ds[5]["router_label"].item() == 1 and ds[8]["router_label"].item() == 0  # w(8) = exp(-9/8)


def test_normalizer_argument_and_block_sampler_and_workers(image_ds: Path) -> None:
    norm = ActionNormalizer(np.array([-5.0, 0, 0]), np.array([5.0, 1, 1]), np.array([True, True, False]))
    ds = PolicyDataset(image_ds, horizon=4, image_size=S, normalizer=norm)
    assert ds.normalizer is norm
    assert ds[2]["action"][0, 0].item() == pytest.approx(2 * (0 + 5) / 10 - 1, abs=1e-6)
    sampler = EpisodeBlockSampler(ds, block_episodes=1, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(ds)))
    first = range(0, 10) if order[0] < 10 else range(10, 16)  # block of one episode: its samples come first
    assert set(order[: len(first)]) == set(first)
    loader = DataLoader(ds, batch_size=5, num_workers=2, sampler=ds.make_sampler(seed=1))
    batches = list(loader)
    assert sum(len(b["task"]) for b in batches) == len(ds)
    b = batches[0]
    assert (
        b[CAM].shape == (5, 3, S, S)
        and b["action"].shape == (5, 4, 3)
        and b["router_label"].dtype == torch.int64
    )


# ---- bad inputs: each names the file, episode or field --------------------------------------------
def _rewrite(path: Path, fn) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def test_missing_gripper_index_and_missing_feature(tmp_path: Path, image_ds: Path) -> None:
    root = write_dataset(tmp_path / "nog", damvla={})
    with pytest.raises(ValueError, match="gripper_index"):
        PolicyDataset(root)
    assert len(PolicyDataset(root, gripper_index=2, image_size=S)) == 16
    with pytest.raises(ValueError, match="observation.images.wrist"):
        PolicyDataset(image_ds, camera="wrist")
    with pytest.raises(ValueError, match="observation.velocity"):
        PolicyDataset(image_ds, state_key="observation.velocity")


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    (root / "data/chunk-000/file-000.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(ValueError, match=r"data/chunk-000/file-000\.parquet"):
        PolicyDataset(root)


def test_corrupt_mp4_names_the_file(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "v", "video")
    mp4 = root / f"videos/{CAM}/chunk-000/file-000.mp4"
    mp4.write_bytes(mp4.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"file-000\.mp4"):
        ds = PolicyDataset(root)
        ds[0]


def test_nan_in_action_names_episode_and_field(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    path = root / "data/chunk-000/file-000.parquet"

    def poison(t: pa.Table) -> pa.Table:
        a = np.stack(t["action"].to_numpy(zero_copy_only=False)).astype(np.float32)
        a[12, 0] = np.nan  # episode 1, frame 2
        col = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), 3)
        return t.set_column(t.schema.get_field_index("action"), "action", col)

    _rewrite(path, poison)
    with pytest.raises(
        ValueError, match=r"file-000\.parquet: episode 1: field 'action' holds NaN/inf \(frame 2"
    ):
        PolicyDataset(root)


def test_episode_shorter_than_two_frames(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", lengths=[5, 3])
    _rewrite(root / "data/chunk-000/file-000.parquet", lambda t: t.slice(0, 6))  # episode 1 keeps 1 frame
    ep_path = root / "meta/episodes/chunk-000/file-000.parquet"
    rows = pq.read_table(ep_path).to_pylist()
    rows[1]["length"], rows[1]["dataset_to_index"] = 1, rows[1]["dataset_from_index"] + 1
    pq.write_table(pa.Table.from_pylist(rows), ep_path)
    with pytest.raises(ValueError, match="episode 1 has 1 frame"):
        PolicyDataset(root)


def test_stats_shape_mismatch_names_stats_file_and_feature(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d")
    p = root / "meta/stats.json"
    st = json.loads(p.read_text())
    st["action"]["q01"] = [0.0, 0.0]
    p.write_text(json.dumps(st))
    with pytest.raises(ValueError, match=r"stats\.json.*'action'.*q01"):
        PolicyDataset(root)


def test_gripper_not_binarisable(tmp_path: Path) -> None:
    def half_open(t: int, e: int) -> np.ndarray:
        a = _actions(t, e)
        if e == 1:
            a[4, 2] = 0.5
        return a

    root = write_dataset(tmp_path / "d", actions=half_open)
    with pytest.raises(ValueError, match=r"episode 1: gripper dimension 2.*frame 4"):
        PolicyDataset(root)


def test_unfinished_write_is_not_loadable(tmp_path: Path) -> None:
    root = tmp_path / "d"
    w = LeRobotWriter(root, fps=10, features={CAM: {"dtype": "image", "shape": [S, S, 3]},
                                              "observation.state": {"dtype": "float32", "shape": [2]},
                                              "action": {"dtype": "float32", "shape": [3]}}, image_mode="image")  # fmt: skip
    w.add_episode(
        {CAM: _frames(4, 0), "observation.state": np.zeros((4, 2), np.float32), "action": _actions(4, 0)},
        task="t",
    )
    w.close()
    with pytest.raises(ValueError, match="info.json.*partial|resume"):
        PolicyDataset(root)


# ---- damvla data check ------------------------------------------------------------------------------
def test_data_check_prints_the_report(image_ds: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", str(image_ds)]) == 0
    out = capsys.readouterr().out
    for needle in ("episodes  2", "frames 16", "tasks 2", "near-constant dims: [1]", "flips per episode",
                   "router labels", "gripper (binarised", "dataset OK"):  # fmt: skip
        assert needle in out, needle


def test_data_check_reports_errors_with_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "nog", damvla={})
    assert main(["data", "check", str(root), "--camera", "wrist"]) == 1
    assert "observation.images.wrist" in capsys.readouterr().err
    assert main(["data", "check", str(root), "--gripper-index", "2"]) == 0


def test_data_check_without_a_gripper_passes_with_a_no_routing_labels_finding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "nog", damvla={})
    assert main(["data", "check", str(root), "--no-decode"]) == 0
    out = capsys.readouterr().out
    assert "findings:\n  - no routing labels: no gripper index" in out and "dataset OK" in out
    assert "router labels:" not in out and "gripper (binarised" not in out
    # training still refuses it: DAM-VLA's labels need a gripper or a phase column
    with pytest.raises(ValueError, match="no gripper index"):
        PolicyDataset(root)


def test_data_check_picks_the_only_camera_whatever_its_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "front", cam="observation.images.front")
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "training camera: observation.images.front" in out
    assert "camera 'observation.images.front' picked: it is the dataset's only camera" in out
    assert "vision.camera=front" in out and "decoded every frame of observation.images.front: ok" in out


def test_data_check_given_a_file_asks_for_the_dataset_folder(
    image_ds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    info = image_ds / "meta" / "info.json"
    assert main(["data", "check", str(info)]) == 1
    err = capsys.readouterr().err
    assert f"{info}: expected the dataset folder, got a file (the dataset folder is probably {image_ds})" in err
    assert "info.json/meta" not in err


def test_action_names_travel_from_info_json_into_the_checkpoint_metadata_and_the_server(tmp_path: Path) -> None:
    from damvla.config import preset
    from damvla.serving.server import action_names

    cfg = preset("tiny")
    cfg.action_dim, cfg.gripper_index = 3, 2
    root = write_dataset(tmp_path / "named")
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["action"]["names"] = ["x", "y", "gripper"]
    info_path.write_text(json.dumps(info))
    meta = PolicyDataset(root, image_size=S).metadata
    assert meta["action_names"] == ["x", "y", "gripper"]
    assert action_names(cfg, json.loads(json.dumps(meta))) == ["x", "y", "gripper"]  # through metadata.json
    # LeRobot's older nested form, and checkpoints from before names were recorded
    info["features"]["action"]["names"] = {"motors": ["a", "b", "c"]}
    info_path.write_text(json.dumps(info))
    assert PolicyDataset(root, image_size=S).metadata["action_names"] == ["a", "b", "c"]
    old = {k: v for k, v in meta.items() if k != "action_names"}
    assert action_names(cfg, old) == ["action_0", "action_1", "gripper"]
