"""Checks of what LeRobot's own reader relies on, beyond what ours needs (``damvla data check``).

Our reader selects an episode's rows by ``episode_index`` and matches video frames by time, so it reads
correctly from datasets that LeRobot's reader would read wrongly. LeRobot v3.0 concatenates the data files
in path order and *slices* that table: an episode is rows ``[dataset_from_index, dataset_to_index)``, a
delta-timestamp window is a range of those rows, and frame times are ``timestamp`` (in steps of 1/fps,
checked to 1e-4 s when it loads). These checks make a dataset that passes ``data check`` read the same in
both:

- ``check_index_ranges``: episode indices 0..N-1; ranges that tile ``[0, total_frames)`` without gap or
  overlap, in episode order; each episode's rows stored at exactly its range, in frame order, with the
  ``index`` column equal to the row's position.
- ``check_timestamps``: every episode's timestamps step by 1/fps (LeRobot's tolerance), and each video
  feature's ``info["video.fps"]`` equals ``fps``.
- ``decode_every_frame``: a strict decode of every frame of the given cameras, whole video files at a
  time (FFmpeg's error detection set to fail on the first damaged packet, frames FFmpeg flags as corrupt
  refused) and every PNG with its chunk CRCs verified. Compressed video carries no checksum of its own:
  a flipped byte can decode, without any error, into wrong pixels (docs/training.md).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from damvla.data.lerobot import (
    INFO_PATH,
    DatasetError,
    LeRobotDatasetReader,
    _image_bytes,
    _read_parquet,
    decode_png,
)

TIMESTAMP_TOLERANCE_S = 1e-4  # LeRobot's check_timestamps_sync default
_STRICT_DECODE = {"err_detect": "crccheck+bitstream+buffer+explode"}  # fail on the first damaged packet


def _meta(reader: LeRobotDatasetReader, episode: int) -> Path:
    ep = reader.episode(episode)
    return ep.meta_path or reader.root / "meta" / "episodes"


def check_index_ranges(reader: LeRobotDatasetReader) -> None:
    """Raise ``DatasetError`` naming the file and episode unless LeRobot's row slicing reads each episode."""
    eps = list(reader.episodes.values())  # sorted by episode_index
    indices = [e.episode_index for e in eps]
    if indices != list(range(len(eps))):
        missing = sorted(set(range(len(eps))) - set(indices))[:5]
        raise DatasetError(
            f"{reader.root / 'meta' / 'episodes'}: episode indices are not 0..{len(eps) - 1} (missing e.g. "
            f"{missing}); LeRobot's reader looks an episode up by its position"
        )
    # ranges: sorted by start they must tile [0, total_frames)
    by_start = sorted(eps, key=lambda e: (e.dataset_from_index, e.episode_index))
    end, prev = 0, None
    for e in by_start:
        span = f"[{e.dataset_from_index}, {e.dataset_to_index})"
        if e.dataset_from_index < end:
            raise DatasetError(
                f"{_meta(reader, e.episode_index)}: episode {e.episode_index}'s rows {span} "
                f"(dataset_from_index, dataset_to_index) overlap episode {prev.episode_index}'s "
                f"[{prev.dataset_from_index}, {prev.dataset_to_index}); LeRobot's reader slices each episode "
                "by its range, so they must be contiguous and must not overlap"
            )
        if e.dataset_from_index > end:
            raise DatasetError(
                f"{_meta(reader, e.episode_index)}: a gap before episode {e.episode_index}'s rows {span} "
                f"(dataset_from_index, dataset_to_index): rows [{end}, {e.dataset_from_index}) belong to no "
                "episode; LeRobot's reader slices each episode by its range, so they must be contiguous"
            )
        end, prev = e.dataset_to_index, e
    total = reader.info.get("total_frames")
    if total is not None and int(total) != end:
        raise DatasetError(
            f"{reader.root / INFO_PATH}: total_frames={total}, but the episode ranges "
            f"(dataset_from_index, dataset_to_index) cover [0, {end})"
        )

    # rows: the data files concatenated in (chunk, file) order, as LeRobot loads them
    files: dict[tuple[int, int], list[int]] = defaultdict(list)
    for e in eps:
        files[(e.data_chunk_index, e.data_file_index)].append(e.episode_index)
    offset = 0
    for key in sorted(files):
        path = reader.data_path(files[key][0])
        cols = pq.read_schema(path).names
        want = [c for c in ("episode_index", "frame_index", "index") if c in cols]
        table = _read_parquet(path, columns=want)
        epi = table["episode_index"].to_numpy()
        for i in files[key]:
            ep = reader.episode(i)
            rows = np.flatnonzero(epi == i)
            pos = offset + rows
            if len(rows) != ep.length or not np.array_equal(
                pos, np.arange(ep.dataset_from_index, ep.dataset_to_index)
            ):
                where = f"[{pos.min()}, {pos.max() + 1})" if len(pos) else "nowhere"
                raise DatasetError(
                    f"{path}: episode {i} is stored at rows {where} of the data files read in order "
                    f"({len(rows)} rows), but {_meta(reader, i)} gives it dataset_from_index, dataset_to_index "
                    f"[{ep.dataset_from_index}, {ep.dataset_to_index}); LeRobot's reader would read other frames"
                )
            if "frame_index" in table.column_names:
                fi = table["frame_index"].to_numpy()[rows]
                if not np.array_equal(fi, np.arange(ep.length)):
                    raise DatasetError(
                        f"{path}: episode {i}: rows are not stored in frame_index order 0..{ep.length - 1}; "
                        "LeRobot's reader takes row order as time order"
                    )
            if "index" in table.column_names:
                idx = table["index"].to_numpy()[rows]
                bad = np.flatnonzero(idx != pos)
                if len(bad):
                    k = int(bad[0])
                    raise DatasetError(
                        f"{path}: episode {i}, frame {k}: column 'index' is {int(idx[k])}, but the row is "
                        f"number {int(pos[k])} of the data files read in order"
                    )
        offset += len(epi)


def check_timestamps(reader: LeRobotDatasetReader, tolerance_s: float = TIMESTAMP_TOLERANCE_S) -> None:
    """Raise ``DatasetError`` unless ``fps`` agrees with every episode's timestamps and every video's fps."""
    fps = reader.fps
    info = reader.root / INFO_PATH
    if fps <= 0:
        raise DatasetError(f"{info}: fps={reader.info['fps']} must be positive")
    period = 1.0 / fps
    for e in reader.episodes:
        ts = reader.episode_arrays(e, ["timestamp"])["timestamp"].astype(np.float64)
        d = np.diff(ts)
        bad = np.flatnonzero(np.abs(d - period) > tolerance_s)
        if len(bad):
            k = int(bad[0])
            step = float(d[k])
            rate = f"{1 / step:.4g} fps" if step > 0 else "not increasing"
            raise DatasetError(
                f"{info}: fps={fps}, but episode {e}'s timestamps ({reader.data_path(e)}) step by {step:.4g} s "
                f"({rate}) between frames {k} and {k + 1}; LeRobot expects steps of 1/fps = {period:.4g} s "
                f"(within {tolerance_s:g} s)"
            )
    for key in reader.video_keys:
        vfps = (reader.features[key].get("info") or {}).get("video.fps")
        if vfps is not None and abs(float(vfps) - fps) > 1e-6:
            raise DatasetError(
                f"{info}: features.{key}.info.video.fps={vfps:g}, but fps={fps}; a frame's time in its video is "
                "from_timestamp + timestamp, so they must agree"
            )


# ---- full decode ---------------------------------------------------------------------------------
def _episode_at(reader: LeRobotDatasetReader, key: str, episodes: list[int], t: float) -> str:
    """'episode E, frame F' of the frame shown at time ``t`` (s) of a video file holding ``episodes``."""
    for e in episodes:
        loc = reader.episode(e).videos[key]
        end = (
            loc.to_timestamp
            if np.isfinite(loc.to_timestamp)
            else loc.from_timestamp + reader.episode(e).length / reader.fps
        )
        if loc.from_timestamp - 0.5 / reader.fps <= t < end:
            return f"episode {e}, frame {max(0, round((t - loc.from_timestamp) * reader.fps))}"
    return f"t={t:.3f} s, in no episode"


def scan_video(path: Path, shape: tuple[int, ...], where: Any = None) -> np.ndarray:
    """Decode every frame of ``path`` strictly; returns the frame times (s, sorted).

    ``where(t) -> str`` names the episode/frame at time t in error messages. Raises ``DatasetError`` at the
    first damaged packet, frame flagged corrupt, or frame whose size differs from ``shape`` (H, W, 3)."""
    import av

    if not path.is_file():
        raise DatasetError(f"{path}: video file not found")
    times: list[float] = []
    t_last = 0.0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.codec_context.options = dict(_STRICT_DECODE)
            stream.thread_count = 1  # errors surface at the packet that caused them
            tb = stream.time_base
            for packet in container.demux(stream):
                if packet.pts is not None:
                    t_last = float(packet.pts * tb)
                for frame in packet.decode():
                    t = float(frame.pts * tb) if frame.pts is not None else t_last
                    if frame.is_corrupt:
                        raise DatasetError(
                            f"{path}: corrupt frame at t={t:.3f} s ({where(t) if where else ''}): the decoder "
                            "flagged it"
                        )
                    if (frame.height, frame.width) != tuple(shape[:2]):
                        raise DatasetError(
                            f"{path}: frame at t={t:.3f} s is {frame.height}x{frame.width}, info.json says {list(shape)}"
                        )
                    times.append(t)
    except DatasetError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends
        raise DatasetError(
            f"{path}: corrupt video data near t={t_last:.3f} s ({where(t_last) if where else ''}): "
            f"{type(e).__name__}: {e}"
        ) from e
    return np.sort(np.asarray(times, dtype=np.float64))


def decode_every_frame(reader: LeRobotDatasetReader, key: str, progress: bool = True) -> int:
    """Decode every frame of camera ``key`` strictly (see the module docstring); returns the frames
    checked. Raises ``DatasetError`` naming the file, episode and frame of the first damage."""
    from tqdm import tqdm

    ft = reader.features[key]
    shape = tuple(ft["shape"])
    n = 0
    if ft["dtype"] == "video":
        by_file: dict[Path, list[int]] = defaultdict(list)
        for e in reader.episodes:
            by_file[reader.video_path(e, key)].append(e)
        for path, eps in tqdm(by_file.items(), desc=f"decoding {key}", disable=not progress, unit="file"):
            times = scan_video(path, shape, lambda t, eps=eps: _episode_at(reader, key, eps, t))
            tol = 0.4 / reader.fps
            for e in eps:
                want = reader.episode(e).videos[key].from_timestamp + reader.episode_arrays(e, ["timestamp"])[
                    "timestamp"
                ].astype(np.float64)
                j = (
                    np.clip(np.searchsorted(times, want), 1, max(len(times) - 1, 1))
                    if len(times) > 1
                    else None
                )
                if j is None:
                    err = np.abs(times[0] - want) if len(times) else np.full(len(want), np.inf)
                else:
                    err = np.minimum(np.abs(times[j - 1] - want), np.abs(times[j] - want))
                if np.any(err > tol):
                    k = int(np.argmax(err > tol))
                    raise DatasetError(
                        f"{path}: episode {e}, frame {k}: no decoded frame at t={want[k]:.4f} s (from_timestamp "
                        "+ timestamp); the video is shorter than the episode or frames are missing"
                    )
                n += len(want)
    elif ft["dtype"] == "image":
        for e in tqdm(list(reader.episodes), desc=f"decoding {key}", disable=not progress, unit="ep"):
            path = reader.data_path(e)
            table = _read_parquet(path, columns=[key, "episode_index", "frame_index"],
                                  filters=[("episode_index", "=", e)])  # fmt: skip
            rows = reader._episode_rows(e, table, path)
            for j, cell in enumerate(table[key].take(rows).to_pylist()):
                where = f"{path}: episode {e}: {key}: frame {j}"
                try:
                    img = decode_png(_image_bytes(cell, where), where, strict=True)
                except DatasetError as err:
                    raise DatasetError(
                        f"{where}: corrupt image ({str(err).removeprefix(where + ': ')})"
                    ) from err
                if img.shape != shape:
                    raise DatasetError(f"{where}: decoded {list(img.shape)}, info.json says {list(shape)}")
                n += 1
    else:
        raise DatasetError(f"{key!r} is not a camera feature (dtype {ft['dtype']})")
    return n
