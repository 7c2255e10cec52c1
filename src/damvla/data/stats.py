"""Feature statistics in LeRobot's ``stats.json`` layout.

Every feature gets ``min, max, mean, std, count, q01, q10, q50, q90, q99`` (numpy arrays):

- low-dimensional features ``(T, *shape)`` -> each stat has ``shape`` (``count`` is ``(1,)``, the number of
  frames);
- camera features ``(T, H, W, 3)`` uint8 -> per channel, in [0, 1], shape ``(3, 1, 1)`` as LeRobot stores
  them, exact over up to 100 evenly spaced frames per episode (from 256-bin histograms).

Per-episode stats are aggregated with ``aggregate_stats``: min/max exactly, mean/std by the pooled-variance
formula, and quantiles as the frame-count-weighted mean of the episodes' quantiles (LeRobot's approximation;
the writer replaces it by exact quantiles over all frames for low-dimensional features).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "STAT_KEYS",
    "QUANTILES",
    "feature_stats",
    "image_stats",
    "episode_stats",
    "aggregate_stats",
    "stats_to_json",
    "stats_from_json",
]

QUANTILES: dict[str, float] = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STAT_KEYS: tuple[str, ...] = ("min", "max", "mean", "std", "count", *QUANTILES)

# Image stats use at most this many evenly spaced frames per episode (LeRobot samples frames too).
_IMAGE_MAX_FRAMES = 100

Stats = dict[str, np.ndarray]


def feature_stats(x: np.ndarray) -> Stats:
    """Stats of a low-dimensional feature over its first axis.

    Args:
        x: ``(N, *shape)`` numeric array (N frames); ``(N,)`` is treated as ``(N, 1)``.
    Returns:
        dict of the ten stats, each ``shape`` (``count`` is ``(1,)``), float64 (count int64).
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.shape[0] == 0:
        raise ValueError("feature_stats: cannot compute statistics of zero frames")
    out: Stats = {
        "min": a.min(axis=0),
        "max": a.max(axis=0),
        "mean": a.mean(axis=0),
        "std": a.std(axis=0),
        "count": np.array([a.shape[0]], dtype=np.int64),
    }
    qs = np.quantile(a, list(QUANTILES.values()), axis=0)  # (5, *shape)
    for i, name in enumerate(QUANTILES):
        out[name] = qs[i]
    return out


def _hist_quantile(cum: np.ndarray, q: float) -> float:
    """np.quantile (linear interpolation) of integer data given as the cumulative histogram ``cum``."""
    n = int(cum[-1])
    pos = q * (n - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    # the k-th smallest value (0-based) is the first bin whose cumulative count exceeds k
    v_lo, v_hi = np.searchsorted(cum, [lo, hi], side="right")
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


def image_stats(frames: np.ndarray) -> Stats:
    """Per-channel stats of camera frames, LeRobot style.

    Computed exactly over up to 100 evenly spaced frames (all pixels) from per-channel 256-bin histograms,
    which is ~50x faster than sorting float pixels.

    Args:
        frames: ``(T, H, W, C)`` uint8.
    Returns:
        the ten stats, each ``(C, 1, 1)`` in [0, 1] (``count`` is ``(1,)`` = T frames).
    """
    f = np.asarray(frames)
    if f.ndim != 4 or f.dtype != np.uint8:
        raise ValueError(f"image_stats: expected (T, H, W, C) uint8 frames, got {f.dtype} {f.shape}")
    t, c = f.shape[0], f.shape[-1]
    if t > _IMAGE_MAX_FRAMES:
        f = f[np.linspace(0, t - 1, _IMAGE_MAX_FRAMES).round().astype(np.int64)]
    flat = f.reshape(-1, c).astype(np.int32) + np.arange(c, dtype=np.int32) * 256
    hist = np.bincount(flat.reshape(-1), minlength=256 * c).reshape(c, 256).astype(np.float64)
    v = np.arange(256, dtype=np.float64)
    out: dict[str, list[float]] = {k: [] for k in ("min", "max", "mean", "std", *QUANTILES)}
    for h in hist:
        n = h.sum()
        nz = np.flatnonzero(h)
        mean = float((h * v).sum() / n)
        out["min"].append(float(nz[0]))
        out["max"].append(float(nz[-1]))
        out["mean"].append(mean)
        out["std"].append(float(np.sqrt((h * (v - mean) ** 2).sum() / n)))
        cum = np.cumsum(h)
        for name, q in QUANTILES.items():
            out[name].append(_hist_quantile(cum, q))
    res: Stats = {k: np.asarray(x).reshape(c, 1, 1) / 255.0 for k, x in out.items()}
    res["count"] = np.array([t], dtype=np.int64)
    return res


def episode_stats(
    arrays: Mapping[str, np.ndarray], features: Mapping[str, Mapping[str, Any]]
) -> dict[str, Stats]:
    """Stats of one episode for every feature present in ``arrays``.

    Args:
        arrays: feature key -> ``(T, *shape)`` array; camera keys hold ``(T, H, W, 3)`` uint8 frames.
        features: LeRobot feature dicts (``dtype`` "image"/"video" marks cameras).
    """
    out: dict[str, Stats] = {}
    for key, arr in arrays.items():
        ft = features.get(key)
        if ft is None:
            continue
        if ft["dtype"] in ("image", "video"):
            out[key] = image_stats(arr)
        elif ft["dtype"] in ("string",):
            continue
        else:
            a = np.asarray(arr)
            out[key] = feature_stats(a.reshape((len(a), *tuple(ft["shape"]))))
    return out


def aggregate_stats(per_episode: Sequence[Mapping[str, Stats]]) -> dict[str, Stats]:
    """Aggregate per-episode stats into dataset stats.

    min/max are exact; mean and std are exact (pooled variance: E[x^2] - E[x]^2 weighted by frame counts);
    quantiles are the count-weighted mean of the per-episode quantiles (an approximation).
    """
    if not per_episode:
        raise ValueError("aggregate_stats: no episode stats given")
    keys = sorted({k for ep in per_episode for k in ep})
    out: dict[str, Stats] = {}
    for key in keys:
        eps = [ep[key] for ep in per_episode if key in ep]
        counts = np.array([float(np.asarray(e["count"]).reshape(-1)[0]) for e in eps])
        w = counts / counts.sum()
        shape = np.asarray(eps[0]["mean"]).shape
        wb = w.reshape((-1,) + (1,) * len(shape))
        means = np.stack([np.asarray(e["mean"], dtype=np.float64) for e in eps])
        stds = np.stack([np.asarray(e["std"], dtype=np.float64) for e in eps])
        mean = (wb * means).sum(axis=0)
        second = (wb * (stds**2 + means**2)).sum(axis=0)
        agg: Stats = {
            "min": np.stack([np.asarray(e["min"], dtype=np.float64) for e in eps]).min(axis=0),
            "max": np.stack([np.asarray(e["max"], dtype=np.float64) for e in eps]).max(axis=0),
            "mean": mean,
            "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
            "count": np.array([int(counts.sum())], dtype=np.int64),
        }
        for q in QUANTILES:
            agg[q] = (wb * np.stack([np.asarray(e[q], dtype=np.float64) for e in eps])).sum(axis=0)
        out[key] = agg
    return out


def stats_to_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    """numpy stats -> JSON-serialisable nested lists (the ``stats.json`` layout)."""
    return {k: {s: np.asarray(v).tolist() for s, v in st.items()} for k, st in stats.items()}


def stats_from_json(d: Mapping[str, Mapping[str, Any]]) -> dict[str, Stats]:
    """``stats.json`` content -> numpy arrays (count as int64, the rest float64)."""
    out: dict[str, Stats] = {}
    for k, st in d.items():
        if not isinstance(st, Mapping):
            raise ValueError(f"stats.json: entry {k!r} is not a dict of statistics")
        out[k] = {s: np.asarray(v, dtype=np.int64 if s == "count" else np.float64) for s, v in st.items()}
    return out
