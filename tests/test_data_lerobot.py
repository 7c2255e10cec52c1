"""LeRobot v3.0 writer/reader: round trips, a hand-built LeRobot-layout folder, crash safety and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from damvla.data import lerobot
from damvla.data.lerobot import DatasetError, LeRobotDatasetReader, LeRobotWriter, encode_png
from damvla.data.stats import STAT_KEYS, aggregate_stats, feature_stats, image_stats

CAM = "observation.images.image"
H, W = 32, 48


def _features(cam_dtype: str = "video") -> dict:
    return {
        CAM: {"dtype": cam_dtype, "shape": [H, W, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [2], "names": ["s0", "s1"]},
        "action": {"dtype": "float32", "shape": [3], "names": ["x", "y", "gripper"]},
    }


def _frames(episode: int, t: int) -> np.ndarray:
    """Uniform frames whose colour encodes (episode, frame), so off-by-one decoding is visible."""
    f = np.zeros((t, H, W, 3), np.uint8)
    for i in range(t):
        f[i] = ((40 * episode + 6 * i) % 240 + 8, (20 * i) % 200 + 30, 100)
    return f


def _episode(episode: int, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(episode)
    return {
        CAM: _frames(episode, t),
        "observation.state": rng.normal(size=(t, 2)).astype(np.float32),
        "action": rng.normal(size=(t, 3)).astype(np.float32),
    }


def _writer(root: Path, mode: str = "video", **kw) -> LeRobotWriter:
    return LeRobotWriter(root, fps=10, features=_features(), robot_type="test", image_mode=mode,
                         extra_info={"damvla": {"gripper_index": 2}}, **kw)  # fmt: skip


@pytest.mark.parametrize("mode", ["video", "image"])
def test_writer_round_trip_reads_back_arrays_frames_tasks_and_layout(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "ds"
    lengths = [12, 7, 9]
    eps = [_episode(e, t) for e, t in enumerate(lengths)]
    w = _writer(root, mode)
    for e, ep in enumerate(eps):
        assert w.add_episode(ep, task=f"task {e % 2}", key=f"k{e}") == e
    assert w.finalize() == root
    assert not w.staging.exists()

    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["total_frames"] == 28
    assert info["total_tasks"] == 2 and info["damvla"] == {"gripper_index": 2}
    assert info["features"][CAM]["dtype"] == mode
    assert set(lerobot.RESERVED_FEATURES) <= set(info["features"])
    if mode == "video":
        assert info["features"][CAM]["info"]["video.codec"] == "h264"
        assert sorted(p.name for p in (root / "videos" / CAM / "chunk-000").iterdir()) == ["file-000.mp4"]
    else:
        assert info["video_path"] is None
    assert sorted(p.name for p in (root / "data/chunk-000").iterdir()) == ["file-000.parquet"]

    r = LeRobotDatasetReader(root)
    assert r.tasks == ["task 0", "task 1"] and r.num_episodes == 3 and r.num_frames == 28
    assert [r.episode(e).dataset_from_index for e in range(3)] == [0, 12, 19]
    for e, ep in enumerate(eps):
        np.testing.assert_array_equal(r.episode_actions(e), ep["action"])
        np.testing.assert_array_equal(r.episode_states(e), ep["observation.state"])
        assert r.episode_task(e) == f"task {e % 2}"
        frames = r.episode_frames(e, CAM)
        assert frames.shape == (lengths[e], H, W, 3) and frames.dtype == np.uint8
        err = np.abs(frames.astype(int) - ep[CAM].astype(int)).max()
        assert err == 0 if mode == "image" else err <= 3
        if mode == "video":  # frames of episode e start at its from_timestamp in the shared file
            assert r.episode(e).videos[CAM].from_timestamp == pytest.approx(sum(lengths[:e]) / 10)
        arrays = r.episode_arrays(e)
        np.testing.assert_array_equal(arrays["frame_index"], np.arange(lengths[e]))
        np.testing.assert_allclose(arrays["timestamp"], np.arange(lengths[e]) / 10, atol=1e-6)

    # stats: exact for low-dim features over all frames, per channel (3, 1, 1) for the camera
    all_actions = np.concatenate([ep["action"] for ep in eps])
    assert set(STAT_KEYS) <= set(r.stats["action"])
    np.testing.assert_allclose(
        r.stats["action"]["q01"], np.quantile(all_actions.astype(np.float64), 0.01, axis=0)
    )
    np.testing.assert_allclose(r.stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)
    assert r.stats[CAM]["mean"].shape == (3, 1, 1)
    assert 0 <= r.stats[CAM]["min"].min() and r.stats[CAM]["max"].max() <= 1
    assert r.stats["action"]["count"].tolist() == [28]
    # per-episode stats columns in meta/episodes
    np.testing.assert_allclose(r.episode(1).stats["action"]["max"], eps[1]["action"].max(0), rtol=1e-6)
    assert r.episode(1).stats[CAM]["mean"].shape == (3, 1, 1)


def test_tasks_parquet_mirrors_lerobot_pandas_index(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    w = _writer(root, "image")
    w.add_episode(_episode(0, 3), task="open the drawer")
    w.add_episode(_episode(1, 3), task="close the drawer")
    w.finalize()
    t = pq.read_table(root / "meta/tasks.parquet")
    assert t.column("task_index").to_pylist() == [0, 1]
    pandas_meta = json.loads(t.schema.metadata[b"pandas"])
    index_col = pandas_meta["index_columns"][0]
    assert t.column(index_col).to_pylist() == ["open the drawer", "close the drawer"]


def test_writer_rolls_data_and_video_files_over_the_size_limit(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    w = _writer(root, "video", data_files_size_in_mb=1e-4, video_files_size_in_mb=1e-4)
    lengths = [5, 6, 4]
    for e, t in enumerate(lengths):
        w.add_episode(_episode(e, t), task="t")
    w.finalize()
    r = LeRobotDatasetReader(root)
    assert [r.episode(e).data_file_index for e in range(3)] == [0, 1, 2]
    assert [r.episode(e).videos[CAM].file_index for e in range(3)] == [0, 1, 2]
    for e, t in enumerate(lengths):
        assert r.episode(e).videos[CAM].from_timestamp == 0
        assert np.abs(r.episode_frames(e, CAM).astype(int) - _frames(e, t).astype(int)).max() <= 3


def test_writer_rejects_bad_episodes(tmp_path: Path) -> None:
    w = _writer(tmp_path / "ds")
    ep = _episode(0, 4)
    with pytest.raises(ValueError, match="observation.state"):
        w.add_episode({k: v for k, v in ep.items() if k != "observation.state"}, task="t")
    bad = dict(ep, action=ep["action"].copy())
    bad["action"][2, 1] = np.nan
    with pytest.raises(ValueError, match="action.*frame 2"):
        w.add_episode(bad, task="t")
    with pytest.raises(ValueError, match="at least 2 frames"):
        w.add_episode(_episode(0, 1), task="t")
    with pytest.raises(ValueError, match=CAM):
        w.add_episode(dict(ep, **{CAM: ep[CAM][:, :, :10]}), task="t")
    assert w.num_episodes == 0
    w.discard()


# ---- a folder written by hand in LeRobot's v3.0 layout ------------------------------------------
def _encode_concat(path: Path, frames: np.ndarray, fps: int) -> None:
    """One encoder pass over frames of several episodes, like LeRobot's concatenated video files (AV1, g=2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        codec = "libsvtav1" if "libsvtav1" in lerobot.available_video_codecs() else "libx264"
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"g": "2", "crf": "20"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def build_lerobot_layout(root: Path, data_path: str = lerobot.DEFAULT_DATA_PATH) -> dict:
    """Write a LeRobot v3.0 dataset directly with pyarrow/PyAV.

    4 episodes (lengths 6, 4, 5, 3), fps 10. Data: episodes 0-2 in data file 0, episode 3 in file 1.
    Video 'observation.images.top': episodes 0-2 in one mp4 that starts with 3 frames belonging to no
    episode (so episode 0 has from_timestamp 0.3), episode 3 in a second mp4. Image
    'observation.images.wrist': PNG bytes in the parquet.
    """
    fps, lengths = 10, [6, 4, 5, 3]
    top = "observation.images.top"
    wrist = "observation.images.wrist"
    features = {
        top: {"dtype": "video", "shape": [H, W, 3], "names": ["height", "width", "channels"],
              "info": {"video.fps": fps, "video.codec": "av1", "video.pix_fmt": "yuv420p"}},
        wrist: {"dtype": "image", "shape": [16, 16, 3], "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": [2], "names": None},
        "action": {"dtype": "float32", "shape": [3], "names": None},
        **{k: dict(v) for k, v in lerobot.RESERVED_FEATURES.items()},
    }  # fmt: skip
    tasks = ["stack the blocks", "wipe the table"]
    ep_task = [0, 1, 0, 1]
    rng = np.random.default_rng(7)
    truth = {"actions": [], "top": [], "wrist": [], "tasks": [tasks[i] for i in ep_task]}
    data_files = {0: [0, 1, 2], 1: [3]}
    video_files = {0: [0, 1, 2], 1: [3]}
    lead = 3  # frames at the start of video file 0 that belong to no episode
    starts = np.cumsum([0, *lengths])
    for e, t in enumerate(lengths):
        truth["actions"].append(rng.normal(size=(t, 3)).astype(np.float32))
        truth["top"].append(_frames(e + 1, t))
        wr = np.zeros((t, 16, 16, 3), np.uint8)
        wr[..., 0] = np.arange(t)[:, None, None] * 10 + e
        wr[..., 1] = rng.integers(0, 255, size=(t, 16, 16))
        truth["wrist"].append(wr)
    for fi, eps in data_files.items():
        cols: dict[str, list] = {
            k: []
            for k in [
                "action",
                "observation.state",
                wrist,
                "timestamp",
                "frame_index",
                "episode_index",
                "index",
                "task_index",
            ]
        }
        for e in eps:
            t = lengths[e]
            cols["action"] += list(truth["actions"][e])
            cols["observation.state"] += list(rng.normal(size=(t, 2)).astype(np.float32))
            cols[wrist] += [
                {"bytes": encode_png(f), "path": f"frame_{i:06d}.png"}
                for i, f in enumerate(truth["wrist"][e])
            ]
            cols["timestamp"] += list((np.arange(t) / fps).astype(np.float32))
            cols["frame_index"] += list(range(t))
            cols["episode_index"] += [e] * t
            cols["index"] += list(range(starts[e], starts[e] + t))
            cols["task_index"] += [ep_task[e]] * t
        table = pa.table({
            "action": pa.array([list(map(float, a)) for a in cols["action"]], pa.list_(pa.float32(), 3)),
            "observation.state": pa.array([list(map(float, a)) for a in cols["observation.state"]], pa.list_(pa.float32(), 2)),
            wrist: pa.array(cols[wrist], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "timestamp": pa.array(cols["timestamp"], pa.float32()),
            "frame_index": pa.array(cols["frame_index"], pa.int64()),
            "episode_index": pa.array(cols["episode_index"], pa.int64()),
            "index": pa.array(cols["index"], pa.int64()),
            "task_index": pa.array(cols["task_index"], pa.int64()),
        })  # fmt: skip
        path = root / data_path.format(chunk_index=0, file_index=fi)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    from_ts = {}
    for fi, eps in video_files.items():
        junk = [np.full((lead, H, W, 3), 255, np.uint8)] if fi == 0 else []
        _encode_concat(root / lerobot.DEFAULT_VIDEO_PATH.format(video_key=top, chunk_index=0, file_index=fi),
                       np.concatenate(junk + [truth["top"][e] for e in eps]), fps)  # fmt: skip
        offset = lead if fi == 0 else 0
        for e in eps:
            from_ts[e] = (fi, offset / fps, (offset + lengths[e]) / fps)
            offset += lengths[e]
    rows = []
    for e, t in enumerate(lengths):
        fi = 0 if e in data_files[0] else 1
        vf, a, b = from_ts[e]
        rows.append({
            "episode_index": e, "tasks": [tasks[ep_task[e]]], "length": t,
            "data/chunk_index": 0, "data/file_index": fi,
            "dataset_from_index": int(starts[e]), "dataset_to_index": int(starts[e + 1]),
            f"videos/{top}/chunk_index": 0, f"videos/{top}/file_index": vf,
            f"videos/{top}/from_timestamp": a, f"videos/{top}/to_timestamp": b,
            "stats/action/min": truth["actions"][e].min(0).tolist(), "stats/action/max": truth["actions"][e].max(0).tolist(),
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
        })  # fmt: skip
    (root / "meta/episodes/chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    pandas_meta = {
        "index_columns": ["task"],
        "columns": [
            {"name": "task", "field_name": "task"},
            {"name": "task_index", "field_name": "task_index"},
        ],
    }
    t = pa.table({"task_index": pa.array([0, 1], pa.int64()), "task": tasks}).replace_schema_metadata(
        {"pandas": json.dumps(pandas_meta)}
    )
    pq.write_table(t, root / "meta/tasks.parquet")
    acts = np.concatenate(truth["actions"])
    stats = {k: {s: v.tolist() for s, v in feature_stats(acts).items()} for k in ["action"]}
    stats["observation.state"] = {s: v.tolist() for s, v in feature_stats(np.zeros((3, 2))).items()}
    stats[top] = {s: v.tolist() for s, v in image_stats(truth["top"][0]).items()}
    (root / "meta/stats.json").write_text(json.dumps(stats))
    info = {
        "codebase_version": "v3.0", "robot_type": "handmade", "total_episodes": 4, "total_frames": int(sum(lengths)),
        "total_tasks": 2, "chunks_size": 1000, "data_files_size_in_mb": 100, "video_files_size_in_mb": 200,
        "fps": fps, "splits": {"train": "0:4"}, "data_path": data_path, "video_path": lerobot.DEFAULT_VIDEO_PATH,
        "features": features,
    }  # fmt: skip
    (root / "meta/info.json").write_text(json.dumps(info, indent=4))
    return truth


@pytest.mark.parametrize(
    "template", [lerobot.DEFAULT_DATA_PATH, "data/c{chunk_index:02d}/episodes_{file_index}.parquet"]
)
def test_reader_reads_a_hand_built_lerobot_v3_folder(tmp_path: Path, template: str) -> None:
    root = tmp_path / "lerobot_ds"
    truth = build_lerobot_layout(root, template)
    r = LeRobotDatasetReader(root)
    assert r.video_keys == ["observation.images.top"] and r.image_keys == ["observation.images.wrist"]
    assert r.tasks == ["stack the blocks", "wipe the table"]
    assert r.episode(0).videos["observation.images.top"].from_timestamp == pytest.approx(0.3)
    assert r.data_path(3) == root / template.format(chunk_index=0, file_index=1)
    for e in range(4):
        np.testing.assert_array_equal(r.episode_actions(e), truth["actions"][e])
        assert r.episode_task(e) == truth["tasks"][e]
        top = r.episode_frames(e, "observation.images.top")
        assert top.shape == truth["top"][e].shape
        assert np.abs(top.astype(int) - truth["top"][e].astype(int)).max() <= 4, f"episode {e}"
        np.testing.assert_array_equal(r.episode_frames(e, "observation.images.wrist"), truth["wrist"][e])
    np.testing.assert_allclose(r.episode(2).stats["action"]["min"], truth["actions"][2].min(0), rtol=1e-6)


def test_video_decoding_names_the_file_when_the_video_is_too_short(tmp_path: Path) -> None:
    root = tmp_path / "lerobot_ds"
    build_lerobot_layout(root)
    rows = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    rows[2]["videos/observation.images.top/from_timestamp"] += 1.0  # points past the end of the file
    pq.write_table(pa.Table.from_pylist(rows), root / "meta/episodes/chunk-000/file-000.parquet")
    r = LeRobotDatasetReader(root)
    with pytest.raises(ValueError, match=r"file-000\.mp4.*episode 2"):
        r.episode_frames(2, "observation.images.top")


# ---- crash safety and resume ----------------------------------------------------------------------
def test_unfinalized_write_does_not_load_and_resume_continues_without_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    keys = [f"task-a/seed-{i}" for i in range(5)]
    w = _writer(root)
    for i in range(3):
        w.add_episode(_episode(i, 4 + i), task="t", key=keys[i])
    w.close()  # "crash": no finalize
    assert not root.exists()
    with pytest.raises(ValueError, match="info.json"):
        LeRobotDatasetReader(root)

    # a crash in the middle of an episode leaves a temporary folder; reopening removes it
    (w.staging / "episodes" / ".tmp-deadbeef").mkdir()
    (w.staging / "episodes" / ".tmp-deadbeef" / "frames.parquet").write_bytes(b"half")

    w2 = _writer(root)
    assert w2.completed_episodes() == {keys[0]: 0, keys[1]: 1, keys[2]: 2}
    assert not (w2.staging / "episodes" / ".tmp-deadbeef").exists()
    with pytest.raises(ValueError, match="already stored"):
        w2.add_episode(_episode(1, 5), task="t", key=keys[1])
    for i, k in enumerate(keys):
        if k not in w2.completed_episodes():
            assert w2.add_episode(_episode(i, 4 + i), task="t", key=k) == i
    w2.finalize()
    r = LeRobotDatasetReader(root)
    assert r.num_episodes == 5
    for i in range(5):
        np.testing.assert_array_equal(r.episode_actions(i), _episode(i, 4 + i)["action"])


def test_exception_inside_add_episode_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    w = _writer(root)
    w.add_episode(_episode(0, 4), task="t", key="a")

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupt while the video is being encoded

    monkeypatch.setattr(lerobot, "encode_video", boom)
    with pytest.raises(KeyboardInterrupt):
        w.add_episode(_episode(1, 4), task="t", key="b")
    monkeypatch.undo()
    assert w.completed_episodes() == {"a": 0}
    assert [p.name for p in (w.staging / "episodes").iterdir()] == ["000000"]
    w.add_episode(_episode(1, 4), task="t", key="b")
    w.finalize()
    assert LeRobotDatasetReader(root).num_episodes == 2


def test_crash_during_finalize_leaves_no_dataset_and_finalize_can_be_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    w = _writer(root)
    for i in range(2):
        w.add_episode(_episode(i, 4), task="t", key=str(i))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lerobot, "_write_tasks", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        w.finalize()
    monkeypatch.undo()
    assert not root.exists()
    w.close()
    w2 = _writer(root)
    assert w2.completed_episodes() == {"0": 0, "1": 1}
    w2.finalize()
    assert LeRobotDatasetReader(root).num_episodes == 2


def test_resume_with_different_settings_or_a_second_writer_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    w = _writer(root)
    w.add_episode(_episode(0, 3), task="t")
    with pytest.raises(RuntimeError, match="locked"):
        _writer(root)
    w.close()
    with pytest.raises(ValueError, match="different settings"):
        _writer(root, "image")
    _writer(root).finalize()
    with pytest.raises(FileExistsError):
        _writer(root)  # root is a finished dataset now
    assert LeRobotDatasetReader(root).num_episodes == 1


def test_context_manager_finalizes_on_success_and_keeps_staging_on_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError), _writer(root) as w:
        w.add_episode(_episode(0, 3), task="t", key="x")
        raise RuntimeError("collector crashed")
    assert not root.exists() and w.staging.exists()
    with _writer(root) as w:
        assert w.completed_episodes() == {"x": 0}
    assert LeRobotDatasetReader(root).num_episodes == 1
    shutil.rmtree(root)


# ---- stats ------------------------------------------------------------------------------------------
def test_stats_aggregate_matches_concatenated_min_max_mean_std() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(2, 3, size=(20, 3))
    agg = aggregate_stats([{"x": feature_stats(a)}, {"x": feature_stats(b)}])["x"]
    full = np.concatenate([a, b])
    np.testing.assert_allclose(agg["mean"], full.mean(0))
    np.testing.assert_allclose(agg["std"], full.std(0))
    np.testing.assert_allclose(agg["min"], full.min(0))
    assert agg["count"].tolist() == [70]
    img = image_stats(np.full((4, 8, 8, 3), 51, np.uint8))
    assert img["mean"].shape == (3, 1, 1) and np.allclose(img["q50"], 0.2)


def test_corrupt_metadata_raises_naming_the_file(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    w = _writer(root, "image")
    w.add_episode(_episode(0, 3), task="t")
    w.finalize()
    (root / "meta/tasks.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(DatasetError, match=r"tasks\.parquet"):
        LeRobotDatasetReader(root)
