"""`damvla data check` checks what LeRobot's own reader relies on (issue #13 findings 7-9): fps consistent
with the timestamps, contiguous non-overlapping episode index ranges, and a strict full decode that finds
corrupt video and image bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from damvla.cli import main
from damvla.data.lerobot import LeRobotWriter, decode_png, encode_png
from test_data_dataset import CAM, write_dataset

EPISODES = "meta/episodes/chunk-000/file-000.parquet"


def _edit_info(root: Path, **kw) -> None:
    p = root / "meta" / "info.json"
    info = json.loads(p.read_text())
    info.update(kw)
    p.write_text(json.dumps(info))


def _edit_episodes(root: Path, ranges: dict[int, tuple[int, int]]) -> None:
    p = root / EPISODES
    rows = pq.read_table(p).to_pylist()
    for r in rows:
        if r["episode_index"] in ranges:
            r["dataset_from_index"], r["dataset_to_index"] = ranges[r["episode_index"]]
    pq.write_table(pa.Table.from_pylist(rows), p)


# ---- finding 7: fps ------------------------------------------------------------------------------
def test_data_check_refuses_an_fps_that_disagrees_with_the_timestamps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "d")  # fps 10: timestamps 0, 0.1, 0.2, ...
    assert main(["data", "check", str(root), "--no-decode"]) == 0
    capsys.readouterr()
    _edit_info(root, fps=20)
    assert main(["data", "check", str(root), "--no-decode"]) == 1
    cap = capsys.readouterr()
    assert "dataset OK" not in cap.out
    assert "info.json" in cap.err and "fps=20" in cap.err
    assert "episode 0" in cap.err and "0.1 s" in cap.err and "10 fps" in cap.err


def test_data_check_refuses_a_video_fps_that_differs_from_the_dataset_fps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "v", "video")
    info = json.loads((root / "meta/info.json").read_text())
    info["features"][CAM]["info"]["video.fps"] = 30
    (root / "meta/info.json").write_text(json.dumps(info))
    assert main(["data", "check", str(root), "--no-decode"]) == 1
    err = capsys.readouterr().err
    assert f"features.{CAM}.info.video.fps=30" in err and "fps=10" in err


# ---- finding 8: index ranges ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranges,needle",
    [
        ({1: (5, 11)}, "overlap"),  # episode 1 (length 6) claims rows 5..10, inside episode 0's 0..9
        ({1: (12, 18)}, "gap"),  # rows 10, 11 belong to no episode
        ({0: (6, 16), 1: (0, 6)}, "is stored at rows"),  # ranges tile 0..15, but not where the rows are
    ],
)
def test_data_check_refuses_episode_ranges_that_lerobot_would_slice_wrongly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ranges: dict, needle: str
) -> None:
    root = write_dataset(tmp_path / "d")  # lengths 10, 6: ranges [0, 10), [10, 16)
    _edit_episodes(root, ranges)  # each range still spans its episode's length: internally consistent
    assert main(["data", "check", str(root), "--no-decode"]) == 1
    cap = capsys.readouterr()
    assert "dataset OK" not in cap.out
    assert needle in cap.err and "dataset_from_index" in cap.err and EPISODES in cap.err


def test_data_check_refuses_an_index_column_that_disagrees_with_the_row_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "d")
    path = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    index = t["index"].to_numpy().copy()
    index[12] = 3
    pq.write_table(t.set_column(t.schema.get_field_index("index"), "index", pa.array(index)), path)
    assert main(["data", "check", str(root), "--no-decode"]) == 1
    err = capsys.readouterr().err
    assert "file-000.parquet" in err and "episode 1" in err and "'index'" in err


# ---- finding 9: full decode ----------------------------------------------------------------------
def _flip_inside_largest_packet(mp4: Path) -> None:
    """Flip three bytes in the middle of the mp4's largest compressed frame (as the issue's attack did); not
    one that starts an encoded episode, which carries x264's settings text (an SEI message no pixel reads)."""
    import av

    with av.open(str(mp4)) as c:
        pkts = [(p.size, p.pos) for p in c.demux(video=0) if p.size and b"x264" not in bytes(p)]
    size, pos = max(pkts)
    data = bytearray(mp4.read_bytes())
    for off in (size // 2, size // 2 + 7, size // 2 + 13):
        data[pos + off] ^= 0xFF
    mp4.write_bytes(bytes(data))


def write_video_dataset(root: Path, lengths: list[int]) -> Path:
    """64 px of smooth, moving content (what a camera films; the codec predicts it from frame to frame)."""
    x = np.linspace(0, 255, 64)
    base = np.add.outer(x, x) / 2
    rng = np.random.default_rng(0)
    w = LeRobotWriter(root, fps=10, image_mode="video", features={
        CAM: {"dtype": "video", "shape": [64, 64, 3]}, "action": {"dtype": "float32", "shape": [3]},
        "observation.state": {"dtype": "float32", "shape": [2]}},
        extra_info={"damvla": {"gripper_index": 2}})  # fmt: skip
    for e, t in enumerate(lengths):
        frames = [base + 40 * np.sin((k + 7 * e) / 5) + rng.normal(0, 8, base.shape) for k in range(t)]
        video = np.clip(np.stack(frames), 0, 255).astype(np.uint8)[..., None].repeat(3, -1)
        actions = np.zeros((t, 3), np.float32)
        actions[:, 0], actions[t // 2 :, 2] = np.arange(t), 1.0
        w.add_episode(
            {CAM: video, "action": actions, "observation.state": np.zeros((t, 2), np.float32)},
            task=f"task {e}",
        )
    return w.finalize()


def test_data_check_decode_finds_flipped_bytes_in_an_mp4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from damvla.data.lerobot import LeRobotDatasetReader

    root = write_video_dataset(tmp_path / "v", lengths=[60, 49])  # 109 frames, as in the issue
    before = LeRobotDatasetReader(root)
    clean = np.concatenate([before.episode_frames(e, CAM) for e in (0, 1)])
    mp4 = root / f"videos/{CAM}/chunk-000/file-000.mp4"
    _flip_inside_largest_packet(mp4)
    # Precondition: the lenient decoder (what training uses) still returns every frame, some of them wrong.
    r = LeRobotDatasetReader(root)
    damaged = np.concatenate([r.episode_frames(e, CAM) for e in (0, 1)])
    assert damaged.shape == clean.shape and not np.array_equal(damaged, clean)
    # Wrong frames, decoded without any error
    assert (np.abs(damaged.astype(int) - clean).reshape(len(clean), -1).max(1) > 0).sum() >= 1

    assert main(["data", "check", str(root), "--no-decode"]) == 0  # metadata alone cannot see it
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 1
    cap = capsys.readouterr()
    assert "dataset OK" not in cap.out
    assert "file-000.mp4" in cap.err and "corrupt" in cap.err and "episode" in cap.err


def test_data_check_decode_finds_a_corrupt_png_that_still_decodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_dataset(tmp_path / "d", "image")
    path = root / "data/chunk-000/file-000.parquet"
    t = pq.read_table(path)
    cells = t[CAM].to_pylist()
    x = np.arange(16, dtype=np.uint8) * 16
    good = np.stack([np.add.outer(x, x) // 2] * 3, axis=-1).astype(np.uint8)  # smooth: zlib compresses it
    png = encode_png(good)
    # A flipped byte inside the compressed pixels that the lenient decoder does not notice.
    for i in range(33, len(png) - 12):
        bad = bytearray(png)
        bad[i] ^= 0x01
        try:
            if not np.array_equal(decode_png(bytes(bad)), good):
                break
        except ValueError:
            continue
    else:
        pytest.fail("no silently-decoding flip found (precondition)")
    cells[3] = {"bytes": bytes(bad), "path": None}
    col = pa.array(cells, type=t.schema.field(CAM).type)
    pq.write_table(
        t.set_column(t.schema.get_field_index(CAM), CAM, col).replace_schema_metadata(t.schema.metadata), path
    )

    assert main(["data", "check", str(root), "--no-decode"]) == 0
    capsys.readouterr()
    assert main(["data", "check", str(root)]) == 1
    err = capsys.readouterr().err
    assert "file-000.parquet" in err and "episode 0" in err and "frame 3" in err and "corrupt" in err


def test_data_check_decode_passes_a_clean_video_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_video_dataset(tmp_path / "v", lengths=[24, 20])
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"decoded every frame of {CAM}: ok" in out and "dataset OK" in out
