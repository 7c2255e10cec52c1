"""Native reader and writer of LeRobotDataset v3.0 folders (pyarrow + PyAV; no ``lerobot`` import).

Layout (LeRobot v3.0, many episodes per file)::

    meta/info.json                                  written LAST: its presence marks a complete dataset
    meta/stats.json                                 per feature min/max/mean/std/count/q01/q10/q50/q90/q99
    meta/tasks.parquet                              task string (pandas index) + task_index
    meta/episodes/chunk-000/file-000.parquet        one row per episode (locations + per-episode stats)
    data/chunk-XXX/file-XXX.parquet                 one row per frame, one row group per episode
    videos/<key>/chunk-XXX/file-XXX.mp4             episodes concatenated; frame time = from_timestamp + timestamp

Camera features are stored either as ``video`` (H.264 mp4, see ``DEFAULT_VIDEO_CODEC``) or as ``image``
(PNG bytes in the parquet, a ``struct<bytes: binary, path: string>`` column, as LeRobot/HF datasets store
``datasets.Image``).

Writing is crash-safe and resumable (see ``LeRobotWriter``); reading honours the ``data_path`` /
``video_path`` templates of ``info.json`` (``LeRobotDatasetReader``).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from damvla.atomic import fsync_dir, fsync_file, write_json_atomic
from damvla.data.stats import (
    STAT_KEYS,
    aggregate_stats,
    feature_stats,
    image_stats,
    stats_from_json,
    stats_to_json,
)
from damvla.keys import STATE_KEY

__all__ = [
    "CODEBASE_VERSION",
    "DEFAULT_VIDEO_CODEC",
    "DatasetError",
    "EpisodeMeta",
    "LeRobotDatasetReader",
    "LeRobotWriter",
    "decode_video_frames",
    "encode_video",
    "encode_png",
    "decode_png",
    "available_video_codecs",
]

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk folder
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
DEFAULT_EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"

# H.264 (libx264): encodes and decodes several times faster than AV1 on CPU, plays everywhere, and its
# packets can be remuxed (concatenated without re-encoding) from per-episode staging files into the
# many-episodes-per-file layout. CRF 18 is visually lossless for 8-bit sources; a 1 s GOP keeps seeking to
# an episode's start cheap (every staged episode also starts with a key frame).
DEFAULT_VIDEO_CODEC = "libx264"
DEFAULT_VIDEO_CRF = 18
PIX_FMT = "yuv420p"

RESERVED_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
CAMERA_DTYPES = ("image", "video")
_NUMERIC_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


class DatasetError(ValueError):
    """A dataset file, episode or field is missing, corrupt or inconsistent (the message names it)."""


# ---------------------------------------------------------------------------------------------------
# small I/O helpers
# ---------------------------------------------------------------------------------------------------
def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: {what} not found") from e
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read {what} ({e})") from e


def _read_parquet(path: Path, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    """pq.read_table that names the file in every failure (missing, corrupt, missing column)."""
    if not path.is_file():
        raise DatasetError(f"{path}: parquet file not found")
    try:
        return pq.read_table(path, columns=columns, filters=filters)
    except (pa.ArrowException, OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from e


def _arrow_type(ft: Mapping[str, Any]) -> pa.DataType:
    """Arrow type of a LeRobot feature as HF datasets stores it (Value / Sequence(length) / Image)."""
    if ft["dtype"] == "image":
        return _IMAGE_STRUCT
    base = pa.from_numpy_dtype(np.dtype(ft["dtype"]))
    shape = list(ft["shape"])
    if shape == [1]:
        return base
    if len(shape) == 1:
        return pa.list_(base, shape[0])
    raise DatasetError(f"feature shape {shape} unsupported for a per-frame column (only (1,) and (n,))")


def _hf_feature(ft: Mapping[str, Any]) -> dict[str, Any]:
    """The ``huggingface`` schema metadata entry HF datasets writes, so ``datasets`` reads columns back typed."""
    if ft["dtype"] == "image":
        return {"_type": "Image"}
    value = {"dtype": ft["dtype"], "_type": "Value"}
    if list(ft["shape"]) == [1]:
        return value
    return {"feature": value, "length": int(ft["shape"][0]), "_type": "Sequence"}


def column_to_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...], where: str) -> np.ndarray:
    """An Arrow column of scalars or (fixed-size) lists -> numpy ``(N, *shape)`` (``(N,)`` when shape is (1,))."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if col.null_count:
        raise DatasetError(f"{where}: {col.null_count} null values")
    t = col.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        n = len(col)
        flat = col.flatten()
        if isinstance(flat.type, (pa.ListType, pa.LargeListType, pa.FixedSizeListType)):
            flat = flat.flatten()  # 2-D features stored as nested lists
        values = flat.to_numpy(zero_copy_only=False)
        size = int(np.prod(shape))
        if values.size != n * size:
            raise DatasetError(
                f"{where}: expected {size} values per frame (shape {list(shape)}), got {values.size / max(n, 1):g}"
            )
        return values.reshape((n, *shape))
    arr = col.to_numpy(zero_copy_only=False)
    if tuple(shape) not in ((1,), ()):
        raise DatasetError(f"{where}: scalar column but feature shape is {list(shape)}")
    return arr


# ---------------------------------------------------------------------------------------------------
# images and video
# ---------------------------------------------------------------------------------------------------
def encode_png(frame: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)  # level 1: 5x faster, ~10% larger
    return buf.getvalue()


def decode_png(data: bytes, where: str = "image", strict: bool = False) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> (H, W, 3) uint8.

    ``strict``: first verify the file's checksums (PNG: the CRC of every chunk), which finds flipped bytes
    that decode to wrong pixels without an error (``damvla data check``; ~no cost next to decoding)."""
    from PIL import Image

    try:
        if strict:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL raises many types for corrupt data
        raise DatasetError(f"{where}: cannot decode image bytes ({type(e).__name__}: {e})") from e


def available_video_codecs() -> list[str]:
    """Encoders of interest that the installed PyAV/FFmpeg can use."""
    import av

    out = []
    for name in ("libx264", "libsvtav1", "libaom-av1", "libx265", "libvpx-vp9", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            out.append(name)
        except Exception:  # UnknownCodecError; not exported under a stable name across PyAV versions
            pass
    return out


def encode_video(
    path: Path, frames: np.ndarray, fps: int, codec: str = DEFAULT_VIDEO_CODEC, crf: int = DEFAULT_VIDEO_CRF
) -> None:
    """Encode (T, H, W, 3) uint8 frames into an mp4 whose frame i has pts i/fps (starts with a key frame)."""
    import av

    t, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8:
        raise DatasetError(
            f"{path}: video frames must be (T, H, W, 3) uint8, got {frames.dtype} {frames.shape}"
        )
    if h % 2 or w % 2:
        raise DatasetError(
            f"{path}: {PIX_FMT} video needs even height and width, got {h}x{w}; use image_mode='image'"
        )
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, PIX_FMT
        opts = {"g": str(fps)}
        if codec in ("libx264", "libx265", "libsvtav1", "libaom-av1", "libvpx-vp9"):
            opts["crf"] = str(crf)
        stream.options = opts
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def _concat_videos(
    out_path: Path, in_paths: list[Path], lengths: list[int], fps: int
) -> list[tuple[float, float]]:
    """Remux per-episode mp4s (same codec parameters) into one file, back to back, without re-encoding.

    Returns each input's (from_timestamp, to_timestamp) in seconds within the output file.
    """
    import av

    out_path.parent.mkdir(parents=True, exist_ok=True)
    spans: list[tuple[float, float]] = []
    frames_before = 0
    with av.open(str(out_path), "w") as out:
        ost = None
        for path, n in zip(in_paths, lengths):
            with av.open(str(path)) as inp:
                ist = inp.streams.video[0]
                if ost is None:
                    ost = out.add_stream_from_template(ist)
                shift = int(round(Fraction(frames_before, fps) / ist.time_base))
                for pkt in inp.demux(ist):
                    if pkt.dts is None:  # the demuxer's empty flush packet
                        continue
                    pkt.pts += shift
                    pkt.dts += shift
                    pkt.stream = ost
                    out.mux(pkt)
            spans.append((frames_before / fps, (frames_before + n) / fps))
            frames_before += n
    return spans


def _video_extradata(path: Path) -> bytes:
    import av

    with av.open(str(path)) as c:
        return bytes(c.streams.video[0].codec_context.extradata or b"")


def decode_video_frames(path: Path, timestamps: np.ndarray, fps: float, where: str = "") -> np.ndarray:
    """Decode the frames of ``path`` shown at ``timestamps`` (seconds in the file), in one pass.

    Seeks once to the key frame before the first timestamp and decodes forward. Each requested time is
    matched to the decoded frame nearest to it, which must lie within 0.4 frame periods, so a missing or
    duplicated frame is an error rather than a silent off-by-one.

    Returns:
        (N, H, W, 3) uint8.
    """
    import av

    ts = np.asarray(timestamps, dtype=np.float64)
    tol = 0.4 / fps
    label = f"{path}{' (' + where + ')' if where else ''}"
    if not path.is_file():
        raise DatasetError(f"{label}: video file not found")
    times: list[float] = []
    images: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DatasetError(f"{label}: no video stream")
            stream = container.streams.video[0]
            tb = stream.time_base
            start = float(ts.min()) - tol
            if start > 0:
                container.seek(max(0, int(start / tb)), stream=stream, backward=True, any_frame=False)
            stop = float(ts.max()) + tol
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * tb)
                if t > stop:
                    break
                if t < start:
                    continue
                times.append(t)
                images.append(frame.to_ndarray(format="rgb24"))
    except DatasetError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...) and OSError
        raise DatasetError(f"{label}: cannot decode video ({type(e).__name__}: {e})") from e
    if not times:
        raise DatasetError(f"{label}: no frame decoded in [{ts.min():.4f}, {ts.max():.4f}] s")
    tarr = np.asarray(times)
    order = np.argsort(tarr, kind="stable")
    tarr = tarr[order]
    nearest = (
        np.clip(np.searchsorted(tarr, ts), 1, len(tarr) - 1) if len(tarr) > 1 else np.zeros(len(ts), int)
    )
    if len(tarr) > 1:
        left = nearest - 1
        nearest = np.where(np.abs(tarr[left] - ts) <= np.abs(tarr[nearest] - ts), left, nearest)
    err = np.abs(tarr[nearest] - ts)
    if np.any(err > tol):
        bad = int(np.argmax(err > tol))
        raise DatasetError(
            f"{label}: no frame at t={ts[bad]:.4f} s (nearest decoded {tarr[nearest[bad]]:.4f} s); "
            f"the video is shorter than the episode or frames are missing"
        )
    return np.stack([images[order[i]] for i in nearest])


# ---------------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------------
def normalize_features(
    features: Mapping[str, Mapping[str, Any]], image_mode: str, fps: int, codec: str
) -> dict[str, dict[str, Any]]:
    """User feature dicts -> the ``info.json`` features (cameras stored as ``image_mode``, reserved added)."""
    if image_mode not in CAMERA_DTYPES:
        raise ValueError(f"image_mode must be 'video' or 'image', got {image_mode!r}")
    out: dict[str, dict[str, Any]] = {}
    for key, ft in features.items():
        if "/" in key:
            raise ValueError(
                f"feature {key!r}: names may not contain '/' (LeRobot uses it in episode stats columns)"
            )
        if key in RESERVED_FEATURES:
            raise ValueError(f"feature {key!r} is reserved; the writer adds it")
        if "dtype" not in ft or "shape" not in ft:
            raise ValueError(f"feature {key!r}: needs 'dtype' and 'shape', got {sorted(ft)}")
        shape = [int(s) for s in ft["shape"]]
        dtype = str(ft["dtype"])
        if dtype in CAMERA_DTYPES:
            if len(shape) != 3 or shape[2] != 3:
                raise ValueError(f"feature {key!r}: camera shape must be (H, W, 3), got {shape}")
            f: dict[str, Any] = {
                "dtype": image_mode,
                "shape": shape,
                "names": ft.get("names") or ["height", "width", "channels"],
            }
            if image_mode == "video":
                f["info"] = {
                    "video.height": shape[0],
                    "video.width": shape[1],
                    "video.codec": {
                        "libx264": "h264",
                        "libsvtav1": "av1",
                        "libaom-av1": "av1",
                        "libx265": "hevc",
                    }.get(codec, codec),
                    "video.pix_fmt": PIX_FMT,
                    "video.is_depth_map": False,
                    "video.fps": fps,
                    "video.channels": 3,
                    "has_audio": False,
                }
        elif dtype in _NUMERIC_DTYPES:
            if len(shape) != 1:
                raise ValueError(f"feature {key!r}: only 1-D shapes are supported for {dtype}, got {shape}")
            f = {"dtype": dtype, "shape": shape, "names": ft.get("names")}
        else:
            raise ValueError(
                f"feature {key!r}: unsupported dtype {dtype!r} (use one of {_NUMERIC_DTYPES + CAMERA_DTYPES})"
            )
        out[key] = f
    out.update({k: dict(v) for k, v in RESERVED_FEATURES.items()})
    return out


# ---------------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------------
class LeRobotWriter:
    """Write a LeRobotDataset v3.0 folder episode by episode, crash-safe and resumable.

    Usage::

        w = LeRobotWriter(root, fps=80, features={...}, robot_type="sawyer", image_mode="video",
                          extra_info={"damvla": {...}})
        for key in my_episode_keys:                     # e.g. "pick-place-v3/seed-17"
            if key in w.completed_episodes():           # done before an interruption
                continue
            w.add_episode({"observation.images.image": frames, "observation.state": s, "action": a},
                          task="pick up the puck", key=key)
        w.finalize()

    How it stays safe:

    - Nothing is written to ``root`` until ``finalize``. Episodes go to a staging folder ``<root>.partial``:
      each ``add_episode`` writes the episode's frames (parquet) and videos (one mp4 per camera) into a
      temporary folder, fsyncs them and renames the folder to ``episodes/<index>`` — one atomic step, so a
      crash leaves either the whole episode or nothing (temporary folders are removed on reopen).
    - ``finalize`` assembles the LeRobot layout in ``<root>.partial/build`` (data files, videos remuxed
      without re-encoding, tasks, episodes, stats, and ``meta/info.json`` last), then renames it to ``root``
      and deletes the staging folder. A crash during finalize leaves ``root`` absent; rerunning finalize
      redoes it. ``root`` therefore never holds a half-written dataset, and a folder without
      ``meta/info.json`` never loads.
    - Reopening ``LeRobotWriter`` on the same ``root`` continues the staged collection: the settings must
      match the first run (checked), episode indices continue, and ``completed_episodes()`` maps the
      caller's keys to the episodes already stored, so an interrupted collection can skip what is done.
      A lock file stops two writers from sharing one staging folder.
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: Mapping[str, Mapping[str, Any]],
        robot_type: str = "unknown",
        image_mode: str = "video",
        extra_info: Mapping[str, Any] | None = None,
        *,
        video_codec: str = DEFAULT_VIDEO_CODEC,
        video_crf: int = DEFAULT_VIDEO_CRF,
        chunks_size: int = DEFAULT_CHUNK_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            root: the dataset folder to create (must not exist unless ``overwrite``).
            fps: frames per second of every episode.
            features: LeRobot feature dicts ``{key: {"dtype", "shape", "names"}}`` for the user features
                (not the reserved timestamp/frame_index/episode_index/index/task_index). Cameras use dtype
                "video" or "image" and shape (H, W, 3); they are stored as ``image_mode``.
            robot_type: free text stored in info.json.
            image_mode: "video" (mp4, ``video_codec``) or "image" (PNG bytes in the parquet).
            extra_info: extra top-level info.json entries, e.g. ``{"damvla": {"gripper_index": 3, ...}}``.
            overwrite: replace an existing ``root`` at finalize (and discard its staging folder now).
        """
        self.root = Path(root)
        self.staging = self.root.with_name(self.root.name + ".partial")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        extra = dict(extra_info or {})
        reserved = {"codebase_version", "fps", "features", "robot_type", "total_episodes", "total_frames",
                    "total_tasks", "chunks_size", "data_files_size_in_mb", "video_files_size_in_mb",
                    "data_path", "video_path", "splits"}  # fmt: skip
        clash = sorted(reserved & set(extra))
        if clash:
            raise ValueError(f"extra_info may not set the reserved info.json keys {clash}")
        if image_mode == "video" and video_codec not in available_video_codecs():
            raise ValueError(
                f"video codec {video_codec!r} cannot encode here; available: {available_video_codecs()}"
            )
        self.config: dict[str, Any] = {
            "fps": int(fps),
            "features": normalize_features(features, image_mode, int(fps), video_codec),
            "robot_type": str(robot_type),
            "image_mode": image_mode,
            "video_codec": video_codec,
            "video_crf": int(video_crf),
            "chunks_size": int(chunks_size),
            "data_files_size_in_mb": data_files_size_in_mb,
            "video_files_size_in_mb": video_files_size_in_mb,
        }
        self.extra_info = json.loads(json.dumps(extra))  # JSON-clean copy; fails early on non-JSON values
        if self.root.exists():
            if not overwrite:
                raise FileExistsError(f"{self.root} already exists; pass overwrite=True to replace it")
        if overwrite and self.staging.exists():
            shutil.rmtree(self.staging)
        self._overwrite = overwrite
        (self.staging / "episodes").mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(self.staging / "lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"{self.staging} is locked by another writer") from e
        self._finalized = False
        try:
            self._resume_or_init()
        except BaseException:
            self.close()  # don't keep the staging folder locked after a refused resume
            raise

    # -- staging --------------------------------------------------------------------------------
    @property
    def user_features(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.config["features"].items() if k not in RESERVED_FEATURES}

    @property
    def camera_keys(self) -> list[str]:
        return [k for k, v in self.user_features.items() if v["dtype"] in CAMERA_DTYPES]

    def _resume_or_init(self) -> None:
        cfg_path = self.staging / "writer.json"
        for tmp in (self.staging / "episodes").glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)  # an episode that was being written when we crashed
        if cfg_path.exists():
            old = _load_json(cfg_path, "writer staging config")
            diffs = [
                k
                for k in self.config
                if json.dumps(old.get("config", {}).get(k)) != json.dumps(self.config[k])
            ]
            if diffs:
                raise ValueError(
                    f"{self.staging}: resuming with different settings than the staged episodes ({diffs}); "
                    f"use the original settings or overwrite=True"
                )
        write_json_atomic(cfg_path, {"config": self.config, "extra_info": self.extra_info})
        self._episodes: dict[int, dict[str, Any]] = {}
        for d in sorted((self.staging / "episodes").iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            meta = _load_json(d / "episode.json", "staged episode metadata")
            self._episodes[int(meta["episode_index"])] = meta
        expected = list(range(len(self._episodes)))
        if sorted(self._episodes) != expected:
            raise DatasetError(
                f"{self.staging}: staged episode indices {sorted(self._episodes)} are not 0..{len(expected) - 1}"
            )

    def completed_episodes(self) -> dict[str, int]:
        """Caller keys of the episodes already stored (this run or an interrupted earlier one) -> index."""
        return {m["key"]: i for i, m in self._episodes.items() if m.get("key") is not None}

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def num_frames(self) -> int:
        return sum(m["length"] for m in self._episodes.values())

    def add_episode(self, frames: Mapping[str, np.ndarray], task: str, key: str | None = None) -> int:
        """Store one finished episode atomically; returns its episode index.

        Args:
            frames: every user feature -> per-frame array: cameras ``(T, H, W, 3)`` uint8, others
                ``(T, *shape)`` (``(T,)`` allowed for shape (1,)). Float features must be finite.
            task: the natural-language instruction.
            key: optional caller id (e.g. "pick-place-v3/seed-17"); a key already stored is an error, so
                a resumed collection cannot duplicate an episode (check ``completed_episodes()`` first).
        """
        if self._finalized:
            raise RuntimeError("writer already finalized")
        if not isinstance(task, str) or not task.strip():
            raise ValueError(f"task must be a non-empty string, got {task!r}")
        if key is not None and key in self.completed_episodes():
            raise ValueError(
                f"episode key {key!r} is already stored as episode {self.completed_episodes()[key]}"
            )
        feats = self.user_features
        missing, extra = sorted(set(feats) - set(frames)), sorted(set(frames) - set(feats))
        if missing or extra:
            raise ValueError(f"add_episode: missing features {missing}, unexpected features {extra}")
        lengths = {k: len(v) for k, v in frames.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"add_episode: features have different lengths {lengths}")
        t = next(iter(lengths.values()))
        if t < 2:
            raise ValueError(f"add_episode: an episode needs at least 2 frames, got {t}")

        columns: dict[str, pa.Array] = {}
        cam_stats: dict[str, dict[str, Any]] = {}
        videos: dict[str, np.ndarray] = {}
        for name, ft in feats.items():
            arr = np.asarray(frames[name])
            if ft["dtype"] in CAMERA_DTYPES:
                if arr.dtype != np.uint8 or arr.shape[1:] != tuple(ft["shape"]):
                    raise ValueError(
                        f"add_episode: {name} must be uint8 (T, {', '.join(map(str, ft['shape']))}), got {arr.dtype} {arr.shape}"
                    )
                cam_stats[name] = stats_to_json({name: image_stats(arr)})[name]
                if ft["dtype"] == "video":
                    videos[name] = arr
                else:
                    columns[name] = pa.array(
                        [{"bytes": encode_png(f), "path": None} for f in arr], type=_IMAGE_STRUCT
                    )
                continue
            shape = tuple(ft["shape"])
            try:
                arr = arr.reshape((t, *shape)).astype(ft["dtype"], copy=False)
            except ValueError as e:
                raise ValueError(
                    f"add_episode: {name} has shape {arr.shape}, expected (T, {', '.join(map(str, shape))})"
                ) from e
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr.reshape(t, -1)).all(axis=1))[0])
                raise ValueError(f"add_episode: {name} holds NaN/inf at frame {bad}")
            columns[name] = _to_arrow(arr, ft)
        columns["timestamp"] = pa.array((np.arange(t) / self.config["fps"]).astype(np.float32))
        columns["frame_index"] = pa.array(np.arange(t, dtype=np.int64))

        index = self.num_episodes
        tmp = self.staging / "episodes" / f".tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            pq.write_table(pa.table(columns), tmp / "frames.parquet")
            fsync_file(tmp / "frames.parquet")
            for name, arr in videos.items():
                p = tmp / f"{name}.mp4"
                encode_video(p, arr, self.config["fps"], self.config["video_codec"], self.config["video_crf"])
                fsync_file(p)
            meta = {"episode_index": index, "key": key, "task": task, "length": t, "camera_stats": cam_stats}
            write_json_atomic(tmp / "episode.json", meta)
            fsync_dir(tmp)
            os.rename(tmp, self.staging / "episodes" / f"{index:06d}")  # the commit point
            fsync_dir(self.staging / "episodes")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._episodes[index] = meta
        return index

    # -- finalize -------------------------------------------------------------------------------
    def finalize(self) -> Path:
        """Assemble the staged episodes into ``root`` (see the class docstring); returns ``root``."""
        if self._finalized:
            return self.root
        if not self._episodes:
            raise ValueError(f"{self.staging}: no episodes to finalize")
        cfg = self.config
        feats, fps = cfg["features"], cfg["fps"]
        build = self.staging / "build"
        if build.exists():
            shutil.rmtree(build)  # a finalize that crashed earlier
        build.mkdir()
        eps = [self._episodes[i] for i in range(self.num_episodes)]
        tasks: dict[str, int] = {}
        for m in eps:
            tasks.setdefault(m["task"], len(tasks))

        # data files: one row group per episode, roll over to a new file past data_files_size_in_mb
        schema = pa.schema(
            [pa.field(k, _arrow_type(ft)) for k, ft in feats.items() if ft["dtype"] != "video"],
            metadata={
                "huggingface": json.dumps(
                    {
                        "info": {
                            "features": {
                                k: _hf_feature(ft) for k, ft in feats.items() if ft["dtype"] != "video"
                            }
                        }
                    }
                )
            },
        )
        rows: list[dict[str, Any]] = []
        lowdim = [k for k, ft in feats.items() if ft["dtype"] not in CAMERA_DTYPES]
        all_lowdim: dict[str, list[np.ndarray]] = {k: [] for k in lowdim}
        ep_stats: list[dict[str, Any]] = []
        chunk, file_, file_bytes, writer, global_index = 0, 0, 0, None, 0
        limit = cfg["data_files_size_in_mb"] * 1024**2
        try:
            for m in eps:
                i, t = m["episode_index"], m["length"]
                src = self.staging / "episodes" / f"{i:06d}" / "frames.parquet"
                table = _read_parquet(src)
                table = table.append_column("episode_index", pa.array(np.full(t, i, dtype=np.int64)))
                table = table.append_column(
                    "index", pa.array(np.arange(global_index, global_index + t, dtype=np.int64))
                )
                table = table.append_column(
                    "task_index", pa.array(np.full(t, tasks[m["task"]], dtype=np.int64))
                )
                table = table.select(schema.names).cast(schema)
                if writer is not None and file_bytes + table.nbytes > limit:
                    writer.close()
                    writer, file_bytes = None, 0
                    chunk, file_ = _next_file(chunk, file_, cfg["chunks_size"])
                if writer is None:
                    path = build / DEFAULT_DATA_PATH.format(chunk_index=chunk, file_index=file_)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    writer = pq.ParquetWriter(path, schema)
                writer.write_table(table, row_group_size=max(t, 1))
                file_bytes += table.nbytes
                st: dict[str, Any] = {}
                for k in lowdim:
                    a = column_to_numpy(table[k], tuple(feats[k]["shape"]), f"{src}:{k}")
                    all_lowdim[k].append(a)
                    st[k] = feature_stats(a.reshape((t, *feats[k]["shape"])))
                st.update(stats_from_json(m["camera_stats"]))
                ep_stats.append(st)
                rows.append({
                    "episode_index": i, "tasks": [m["task"]], "length": t,
                    "data/chunk_index": chunk, "data/file_index": file_,
                    "dataset_from_index": global_index, "dataset_to_index": global_index + t,
                })  # fmt: skip
                global_index += t
        finally:
            if writer is not None:
                writer.close()

        # videos: remux staged per-episode mp4s back to back; new file past the size limit or when the
        # codec parameters differ (remuxing needs identical ones)
        for key in [k for k, ft in feats.items() if ft["dtype"] == "video"]:
            groups: list[list[int]] = [[]]
            size, extradata = 0.0, None
            vlimit = cfg["video_files_size_in_mb"] * 1024**2
            for m in eps:
                p = self.staging / "episodes" / f"{m['episode_index']:06d}" / f"{key}.mp4"
                ed, sz = _video_extradata(p), p.stat().st_size
                if groups[-1] and (size + sz > vlimit or ed != extradata):
                    groups.append([])
                    size = 0.0
                groups[-1].append(m["episode_index"])
                size, extradata = size + sz, ed
            chunk, file_ = 0, 0
            for gi, group in enumerate(groups):
                if gi:
                    chunk, file_ = _next_file(chunk, file_, cfg["chunks_size"])
                out = build / DEFAULT_VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=file_)
                spans = _concat_videos(
                    out,
                    [self.staging / "episodes" / f"{i:06d}" / f"{key}.mp4" for i in group],
                    [self._episodes[i]["length"] for i in group],
                    fps,
                )
                for i, (a, b) in zip(group, spans):
                    rows[i].update({
                        f"videos/{key}/chunk_index": chunk, f"videos/{key}/file_index": file_,
                        f"videos/{key}/from_timestamp": a, f"videos/{key}/to_timestamp": b,
                    })  # fmt: skip

        # stats: exact over all frames for low-dim features; aggregated per-episode for cameras
        stats = aggregate_stats(ep_stats)
        for k in lowdim:
            stats[k] = feature_stats(
                np.concatenate(all_lowdim[k]).reshape((global_index, *feats[k]["shape"]))
            )
        for row, st in zip(rows, ep_stats):
            for k, s in st.items():
                for name in STAT_KEYS:
                    row[f"stats/{k}/{name}"] = np.asarray(s[name]).tolist()
            row["meta/episodes/chunk_index"] = 0
            row["meta/episodes/file_index"] = 0
        ep_path = build / DEFAULT_EPISODES_PATH.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), ep_path)
        _write_tasks(build / TASKS_PATH, list(tasks))
        write_json_atomic(build / STATS_PATH, stats_to_json(stats))
        has_video = any(ft["dtype"] == "video" for ft in feats.values())
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": cfg["robot_type"],
            "total_episodes": len(eps),
            "total_frames": global_index,
            "total_tasks": len(tasks),
            "chunks_size": cfg["chunks_size"],
            "data_files_size_in_mb": cfg["data_files_size_in_mb"],
            "video_files_size_in_mb": cfg["video_files_size_in_mb"],
            "fps": fps,
            "splits": {"train": f"0:{len(eps)}"},
            "data_path": DEFAULT_DATA_PATH,
            "video_path": DEFAULT_VIDEO_PATH if has_video else None,
            "features": feats,
            **self.extra_info,
        }
        for p in build.rglob("*"):
            if p.is_file():
                fsync_file(p)
        write_json_atomic(build / INFO_PATH, info)  # last: its presence marks the dataset complete
        fsync_dir(build / "meta")
        if self.root.exists():
            if not self._overwrite:
                raise FileExistsError(f"{self.root} appeared while writing; not replacing it")
            shutil.rmtree(self.root)
        os.rename(build, self.root)
        fsync_dir(self.root.parent)
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        self._finalized = True
        return self.root

    def close(self) -> None:
        """Release the staging lock without finalizing (staged episodes stay for a later resume)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Delete the staging folder and every staged episode."""
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> LeRobotWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # Finalize only on success: after an exception the staged episodes stay for a resume.
        if exc_type is None:
            self.finalize()
        else:
            self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _next_file(chunk: int, file_: int, chunks_size: int) -> tuple[int, int]:
    """LeRobot's numbering: file index wraps at chunks_size files per chunk folder."""
    return (chunk + 1, 0) if file_ >= chunks_size - 1 else (chunk, file_ + 1)


def _to_arrow(arr: np.ndarray, ft: Mapping[str, Any]) -> pa.Array:
    typ = _arrow_type(ft)
    if pa.types.is_fixed_size_list(typ):
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), int(ft["shape"][0]))
    return pa.array(arr.reshape(-1), type=typ)


def _write_tasks(path: Path, tasks: list[str]) -> None:
    """meta/tasks.parquet as LeRobot writes it (``pandas.DataFrame({"task_index": ...}, index=tasks)``):
    a ``task_index`` column plus the task strings as the pandas index, with pandas metadata so
    ``pandas.read_parquet`` restores the index (pandas itself is not needed to write it)."""
    pandas_meta = {
        "index_columns": ["__index_level_0__"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {
                "name": None,
                "field_name": "__index_level_0__",
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": None,
            },
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = pa.table(
        {
            "task_index": pa.array(np.arange(len(tasks), dtype=np.int64)),
            "__index_level_0__": pa.array(tasks, pa.string()),
        }
    ).replace_schema_metadata({"pandas": json.dumps(pandas_meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# ---------------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------------
@dataclass
class VideoLocation:
    """Where one episode of one camera lives: file indices and its time span in that file (s)."""

    chunk_index: int
    file_index: int
    from_timestamp: float
    to_timestamp: float


@dataclass
class EpisodeMeta:
    """One row of meta/episodes: length, tasks, where its frames and videos are."""

    episode_index: int
    length: int
    tasks: list[str]
    data_chunk_index: int
    data_file_index: int
    dataset_from_index: int
    dataset_to_index: int
    videos: dict[str, VideoLocation] = field(default_factory=dict)
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    meta_path: Path | None = None  # the meta/episodes parquet file holding this row


class LeRobotDatasetReader:
    """Read a LeRobotDataset v3.0 folder (ours or LeRobot's) without the ``lerobot`` package.

    Attributes:
        root, info (info.json dict), fps, features (info["features"]), stats (stats.json as numpy; {} when
        the file is absent), tasks (list of task strings by task_index), episodes (dict index -> EpisodeMeta,
        sorted), camera_keys / video_keys / image_keys.

    Per-episode access: ``episode_arrays`` (low-dim columns), ``episode_actions``, ``episode_states``,
    ``episode_task``, ``episode_frames`` (a whole episode of one camera, decoded in one pass).
    The reader holds no open file handles, so it pickles into DataLoader workers.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        info_path = self.root / INFO_PATH
        if self.root.is_file():
            # e.g. DIR/meta/info.json given for DIR: say so instead of looking for DIR/meta/info.json/meta/...
            inside = self.root.parents[1] if self.root.name == "info.json" and self.root.parent.name == "meta" else None
            raise DatasetError(
                f"{self.root}: expected the dataset folder, got a file"
                + (f" (the dataset folder is probably {inside})" if inside is not None else "")
            )
        if not info_path.is_file():
            hint = ""
            if self.root.with_name(self.root.name + ".partial").exists():
                hint = (
                    " (a staged, unfinished write exists next to it: resume the writer and call finalize())"
                )
            raise DatasetError(
                f"{info_path}: not found; {self.root} is not a complete LeRobot v3.0 dataset{hint}"
            )
        self.info: dict[str, Any] = _load_json(info_path, "dataset info")
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise DatasetError(
                f"{info_path}: codebase_version {version!r}; this reader supports LeRobot v3.x"
            )
        for k in ("fps", "features", "data_path"):
            if k not in self.info:
                raise DatasetError(f"{info_path}: missing key {k!r}")
        self.fps: int = int(self.info["fps"])
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        for k, ft in self.features.items():
            if not isinstance(ft, dict) or "dtype" not in ft or "shape" not in ft:
                raise DatasetError(f"{info_path}: feature {k!r} needs 'dtype' and 'shape'")
        if self.video_keys and not self.info.get("video_path"):
            raise DatasetError(f"{info_path}: video features {self.video_keys} but no 'video_path' template")
        stats_path = self.root / STATS_PATH
        self.stats = stats_from_json(_load_json(stats_path, "stats")) if stats_path.is_file() else {}
        self.tasks = self._load_tasks()
        self.episodes = self._load_episodes()
        self._table_cache: OrderedDict[tuple[str, tuple[str, ...]], pa.Table] = OrderedDict()

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def camera_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] in CAMERA_DTYPES]

    @property
    def video_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def image_keys(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] == "image"]

    @property
    def num_episodes(self) -> int:
        return len(self.episodes)

    @property
    def num_frames(self) -> int:
        return sum(e.length for e in self.episodes.values())

    def _load_tasks(self) -> list[str]:
        path = self.root / TASKS_PATH
        table = _read_parquet(path)
        if "task_index" not in table.column_names:
            raise DatasetError(f"{path}: no 'task_index' column (have {table.column_names})")
        # LeRobot writes the task string as the pandas index: find that column via the pandas metadata,
        # else fall back to a 'task' column or the only string column.
        names: list[str] = []
        meta = table.schema.metadata or {}
        if b"pandas" in meta:
            with contextlib.suppress(Exception):
                names = [c for c in json.loads(meta[b"pandas"])["index_columns"] if isinstance(c, str)]
        names += ["task", "__index_level_0__"]
        names += [
            f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)
        ]
        col = next((n for n in names if n in table.column_names), None)
        if col is None:
            raise DatasetError(f"{path}: no task string column (have {table.column_names})")
        idx = table["task_index"].to_numpy()
        strings = table[col].to_pylist()
        out: list[str | None] = [None] * (int(idx.max()) + 1 if len(idx) else 0)
        for i, s in zip(idx, strings):
            out[int(i)] = s
        if any(s is None for s in out):
            raise DatasetError(f"{path}: task_index values are not contiguous 0..{len(out) - 1}")
        return [str(s) for s in out]

    def _load_episodes(self) -> dict[int, EpisodeMeta]:
        files = sorted((self.root / "meta" / "episodes").glob("*/*.parquet"))
        if not files:
            raise DatasetError(f"{self.root / 'meta' / 'episodes'}: no episode metadata parquet files")
        out: dict[int, EpisodeMeta] = {}
        need = [
            "episode_index",
            "tasks",
            "length",
            "data/chunk_index",
            "data/file_index",
            "dataset_from_index",
            "dataset_to_index",
        ]
        for path in files:
            rows = _read_parquet(path).to_pylist()
            for r in rows:
                missing = [c for c in need if c not in r]
                for vk in self.video_keys:
                    missing += [
                        f"videos/{vk}/{c}"
                        for c in ("chunk_index", "file_index", "from_timestamp")
                        if f"videos/{vk}/{c}" not in r
                    ]
                if missing:
                    raise DatasetError(f"{path}: missing columns {missing}")
                i = int(r["episode_index"])
                videos = {
                    vk: VideoLocation(
                        int(r[f"videos/{vk}/chunk_index"]), int(r[f"videos/{vk}/file_index"]),
                        float(r[f"videos/{vk}/from_timestamp"]), float(r.get(f"videos/{vk}/to_timestamp") or np.nan),
                    )
                    for vk in self.video_keys
                }  # fmt: skip
                stats: dict[str, dict[str, np.ndarray]] = {}
                for c, v in r.items():
                    if c.startswith("stats/") and v is not None:
                        feat, _, stat = c[len("stats/") :].rpartition("/")
                        stats.setdefault(feat, {})[stat] = np.asarray(
                            v, dtype=np.int64 if stat == "count" else np.float64
                        )
                tasks = r["tasks"] if isinstance(r["tasks"], list) else [r["tasks"]]
                ep = EpisodeMeta(
                    i, int(r["length"]), [str(t) for t in tasks], int(r["data/chunk_index"]), int(r["data/file_index"]),
                    int(r["dataset_from_index"]), int(r["dataset_to_index"]), videos, stats, path,
                )  # fmt: skip
                if ep.dataset_to_index - ep.dataset_from_index != ep.length:
                    raise DatasetError(
                        f"{path}: episode {i}: dataset_to_index - dataset_from_index != length {ep.length}"
                    )
                if i in out:
                    raise DatasetError(f"{path}: episode {i} listed twice")
                out[i] = ep
        total = self.info.get("total_episodes")
        if total is not None and int(total) != len(out):
            raise DatasetError(
                f"{self.root / INFO_PATH}: total_episodes={total} but meta/episodes lists {len(out)}"
            )
        return dict(sorted(out.items()))

    def episode(self, episode_index: int) -> EpisodeMeta:
        try:
            return self.episodes[int(episode_index)]
        except KeyError:
            raise DatasetError(f"{self.root}: no episode {episode_index}") from None

    def data_path(self, episode_index: int) -> Path:
        ep = self.episode(episode_index)
        return self.root / self.info["data_path"].format(
            chunk_index=ep.data_chunk_index, file_index=ep.data_file_index
        )

    def video_path(self, episode_index: int, key: str) -> Path:
        ep = self.episode(episode_index)
        if key not in ep.videos:
            raise DatasetError(f"{self.root}: {key!r} is not a video feature (videos: {self.video_keys})")
        loc = ep.videos[key]
        return self.root / self.info["video_path"].format(
            video_key=key, chunk_index=loc.chunk_index, file_index=loc.file_index
        )

    # -- per-episode data -------------------------------------------------------------------------
    def _file_table(self, path: Path, columns: tuple[str, ...]) -> pa.Table:
        # Consecutive episodes usually share a data file: keep the last few low-dim tables around.
        k = (str(path), columns)
        if k in self._table_cache:
            self._table_cache.move_to_end(k)
            return self._table_cache[k]
        schema_names = _parquet_columns(path)
        missing = [c for c in columns if c not in schema_names]
        if missing:
            raise DatasetError(f"{path}: missing columns {missing} (have {schema_names})")
        table = _read_parquet(path, columns=list(columns))
        self._table_cache[k] = table
        while len(self._table_cache) > 4:
            self._table_cache.popitem(last=False)
        return table

    def _episode_rows(self, episode_index: int, table: pa.Table, path: Path) -> np.ndarray:
        """Row indices of one episode in a data-file table, ordered by frame_index, checked complete."""
        ep = self.episode(episode_index)
        epi = table["episode_index"].to_numpy()
        rows = np.flatnonzero(epi == ep.episode_index)
        if len(rows) != ep.length:
            raise DatasetError(
                f"{path}: episode {ep.episode_index} has {len(rows)} rows, meta/episodes says length {ep.length}"
            )
        if "frame_index" in table.column_names:
            fi = table["frame_index"].to_numpy()[rows]
            order = np.argsort(fi, kind="stable")
            rows, fi = rows[order], fi[order]
            if not np.array_equal(fi, np.arange(ep.length)):
                raise DatasetError(
                    f"{path}: episode {ep.episode_index}: frame_index is not 0..{ep.length - 1}"
                )
        return rows

    def episode_arrays(self, episode_index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Low-dimensional per-frame columns of one episode.

        Args:
            keys: feature keys (default: every non-camera feature, reserved ones included).
        Returns:
            key -> ``(T, *shape)`` arrays (``(T,)`` for shape (1,)), frames ordered by frame_index.
        """
        if keys is None:
            keys = [k for k, ft in self.features.items() if ft["dtype"] not in CAMERA_DTYPES]
        keys = list(keys)
        for k in keys:
            if k not in self.features:
                raise DatasetError(
                    f"{self.root / INFO_PATH}: missing feature {k!r} (have {sorted(self.features)})"
                )
            if self.features[k]["dtype"] in CAMERA_DTYPES:
                raise DatasetError(f"{k!r} is a camera feature; use episode_frames")
        path = self.data_path(episode_index)
        cols = tuple(dict.fromkeys([*keys, "episode_index", "frame_index"]))
        table = self._file_table(path, cols)
        rows = self._episode_rows(episode_index, table, path)
        sub = table.take(pa.array(rows))
        return {
            k: column_to_numpy(
                sub[k], tuple(self.features[k]["shape"]), f"{path}: episode {episode_index}: {k}"
            )
            for k in keys
        }

    def episode_actions(self, episode_index: int, key: str = "action") -> np.ndarray:
        """(T, D) float32 actions of one episode."""
        return (
            self.episode_arrays(episode_index, [key])[key]
            .astype(np.float32)
            .reshape(self.episode(episode_index).length, -1)
        )

    def episode_states(self, episode_index: int, key: str = STATE_KEY) -> np.ndarray:
        """(T, S) float32 states of one episode."""
        return (
            self.episode_arrays(episode_index, [key])[key]
            .astype(np.float32)
            .reshape(self.episode(episode_index).length, -1)
        )

    def episode_task(self, episode_index: int) -> str:
        """The instruction of the episode's first frame (task_index -> tasks.parquet)."""
        ti = int(self.episode_arrays(episode_index, ["task_index"])["task_index"][0])
        if not 0 <= ti < len(self.tasks):
            raise DatasetError(
                f"{self.data_path(episode_index)}: episode {episode_index}: task_index {ti} not in tasks.parquet"
            )
        return self.tasks[ti]

    def episode_frames(self, episode_index: int, key: str) -> np.ndarray:
        """All frames of one camera for one episode, decoded in one pass: (T, H, W, 3) uint8."""
        if key not in self.features:
            raise DatasetError(
                f"{self.root / INFO_PATH}: missing feature {key!r} (cameras: {self.camera_keys})"
            )
        ft = self.features[key]
        ep = self.episode(episode_index)
        where = f"episode {episode_index}: {key}"
        if ft["dtype"] == "video":
            ts = self.episode_arrays(episode_index, ["timestamp"])["timestamp"].astype(np.float64)
            loc = ep.videos[key]
            frames = decode_video_frames(
                self.video_path(episode_index, key), loc.from_timestamp + ts, self.fps, where
            )
        elif ft["dtype"] == "image":
            path = self.data_path(episode_index)
            if key not in _parquet_columns(path):
                raise DatasetError(f"{path}: missing column {key!r}")
            # One row group per episode (ours) lets the filter skip the other episodes' image bytes.
            table = _read_parquet(
                path,
                columns=[key, "episode_index", "frame_index"],
                filters=[("episode_index", "=", ep.episode_index)],
            )
            rows = self._episode_rows(episode_index, table, path)
            cells = table[key].take(pa.array(rows)).to_pylist()
            frames = np.stack(
                [
                    decode_png(_image_bytes(c, f"{path}: {where}"), f"{path}: {where}: frame {j}")
                    for j, c in enumerate(cells)
                ]
            )
        else:
            raise DatasetError(f"{key!r} is not a camera feature (dtype {ft['dtype']})")
        shape = tuple(ft["shape"])
        if frames.shape[1:] != shape:
            raise DatasetError(
                f"{self.root}: {where}: decoded frames {frames.shape[1:]} differ from info.json shape {list(shape)}"
            )
        return frames

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_table_cache"] = OrderedDict()  # don't ship cached tables to DataLoader workers
        return state


def _image_bytes(cell: Any, where: str) -> bytes:
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return cell["bytes"]
        raise DatasetError(
            f"{where}: image cell holds no bytes (path {cell.get('path')!r}); only embedded images are supported"
        )
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    raise DatasetError(f"{where}: unexpected image cell type {type(cell).__name__}")


def _parquet_columns(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: parquet file not found")
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from e
