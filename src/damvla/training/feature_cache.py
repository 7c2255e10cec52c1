"""Frozen-encoder feature cache: run a frozen vision tower once per dataset frame, train on its output.

With ``vision.frozen`` the tower's output for a frame never changes, so computing it at every step is pure
waste: on two CPU cores DINOv2-S alone would cost more than the rest of the model. ``damvla train``
computes the features of every frame once (:meth:`FeatureCache.build`), with a progress bar, and
:class:`CachedFeatureDataset` hands them to the policy under ``FEATURE_KEYS`` in place of the image. At
inference (eval, serve) the tower runs online on the same resized frames, so the numbers are the same.

The cache is a folder ``<root>/<key>/`` whose key is a hash of
- the encoder: a fingerprint of its weights and the vision config that shapes its output (image size,
  patch pooling, encoder sizes), and
- the dataset: its camera, the selected episodes and the bytes of every file the frames and their order
  come from (``meta/info.json``, ``meta/episodes/``, the camera's videos or the image parquet files).
A policy that reads several cameras (``vision.extra_cameras``) has one cache per camera, camera k's features
reaching the policy under ``feature_keys(k)``.
Any change gives another key, so a stale cache is never read. The folder is complete only once its
``meta.json`` exists (written last, atomically); until then the build resumes from the parts it has, each
written atomically. A lock file serialises builders of the same cache (two runs started together).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from damvla.data.dataset import PolicyDataset, file_sha256
from damvla.model.vision import FEATURE_KEYS, feature_keys
from damvla.model.weights import state_fingerprint

CACHE_FORMAT = 1
EPISODES_PER_PART = 16  # parts of the resumable build (each written atomically)


def default_cache_root() -> Path:
    """``$DAMVLA_FEATURE_CACHE``, else ``~/.cache/damvla/features``."""
    return Path(os.environ.get("DAMVLA_FEATURE_CACHE") or Path.home() / ".cache" / "damvla" / "features")


def dataset_fingerprint(ds: PolicyDataset, camera_key: str | None = None) -> str:
    """Hash of what the frames of camera ``camera_key`` (default ``ds.camera_key``) of ``ds`` are: camera,
    size, episodes, and the bytes of their files."""
    r, key = ds.reader, camera_key or ds.camera_key
    files = {ds.root / "meta" / "info.json"}
    files |= set((ds.root / "meta" / "episodes").rglob("*.parquet"))
    for e in ds.episode_indices:
        files.add(r.video_path(e, key) if key in r.video_keys else r.data_path(e))
    h = hashlib.sha256()
    head = {"camera": key, "image_size": ds.image_size, "episodes": ds.episode_indices, "frames": len(ds)}
    h.update(json.dumps(head, sort_keys=True).encode())
    for f in sorted(files):
        h.update(f"{f.relative_to(ds.root)}:{file_sha256(f)}".encode())
    return h.hexdigest()


def encoder_fingerprint(vision: nn.Module, vision_config: dict[str, Any]) -> str:
    """Hash of the frozen tower: its weights and the config fields that shape its output."""
    ignored = ("camera", "extra_cameras", "frozen", "gripper_queries", "arm_queries", "patch_position")
    shaping = {k: v for k, v in vision_config.items() if k not in ignored}
    for enc in ("dinov2", "siglip"):
        if isinstance(shaping.get(enc), dict):  # where the weights came from does not matter, their bytes do
            shaping[enc] = {k: v for k, v in shaping[enc].items() if k != "pretrained_path"}
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "config": shaping}, sort_keys=True).encode())
    h.update(state_fingerprint(vision).encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureCache:
    """The cached features of one (frozen encoder, dataset) pair; see the module docstring."""

    def __init__(self, root: str | Path, encoder_fp: str, dataset_fp: str) -> None:
        self.key = hashlib.sha256(f"{encoder_fp}:{dataset_fp}".encode()).hexdigest()[:24]
        self.encoder_fp, self.dataset_fp = encoder_fp, dataset_fp
        self.dir = Path(root) / self.key
        self._arrays: dict[str, np.ndarray] | None = None

    @classmethod
    def for_policy(cls, policy: nn.Module, dataset: PolicyDataset, root: str | Path | None = None,
                   camera_key: str | None = None) -> FeatureCache:  # fmt: skip
        """The cache of camera ``camera_key`` (default the dataset's first) of ``dataset`` under ``policy``'s tower."""
        vision_cfg = policy.config.to_dict()["vision"]  # type: ignore[attr-defined]
        return cls(root or default_cache_root(), encoder_fingerprint(policy.vision, vision_cfg),
                   dataset_fingerprint(dataset, camera_key))  # fmt: skip

    @classmethod
    def for_cameras(cls, policy: nn.Module, dataset: PolicyDataset, root: str | Path | None = None) -> list[FeatureCache]:
        """One cache per camera of ``dataset`` (``dataset.camera_keys``, the policy's cameras in order)."""
        return [cls.for_policy(policy, dataset, root, key) for key in dataset.camera_keys]

    @property
    def complete(self) -> bool:
        return (self.dir / "meta.json").is_file()

    # ---- building ---------------------------------------------------------------------------------
    @torch.no_grad()
    def build(self, vision: nn.Module, dataset: PolicyDataset, batch_size: int = 64, progress: bool = True,
              camera_key: str | None = None) -> None:  # fmt: skip
        """Compute the features of every frame of camera ``camera_key`` (default ``dataset.camera_key``) of
        ``dataset`` (row i = sample i), unless complete."""
        camera_key = camera_key or dataset.camera_key
        with _locked(self.dir.with_name(self.key + ".lock")):
            if self.complete:
                return
            parts = self.dir / "parts"
            parts.mkdir(parents=True, exist_ok=True)
            vision.eval()
            dev = next(vision.parameters()).device
            n_ep = dataset.num_episodes
            groups = [range(g, min(g + EPISODES_PER_PART, n_ep)) for g in range(0, n_ep, EPISODES_PER_PART)]
            todo = [g for g in groups if not (parts / f"part-{g.start:06d}.npz").is_file()]
            done_frames = len(dataset) - sum(dataset._ep_len[list(g)].sum() for g in todo)
            desc = "feature cache" + (f" {camera_key.removeprefix('observation.images.')}" if len(dataset.camera_keys) > 1 else "")
            bar = tqdm(total=len(dataset), initial=int(done_frames), unit="frame", desc=desc,
                       disable=not progress, dynamic_ncols=True)  # fmt: skip
            for g in todo:
                out: dict[str, list[np.ndarray]] = {k: [] for k in FEATURE_KEYS}
                for p in g:
                    frames = dataset._episode_frames(p, camera_key)  # uint8 (T, 3, S, S), exactly as training samples
                    if frames.shape[-2:] != (dataset.image_size, dataset.image_size):
                        from damvla.data.dataset import resize_images

                        frames = resize_images(frames, dataset.image_size)
                    for i in range(0, len(frames), batch_size):
                        f = vision(frames[i : i + batch_size].to(dev).float() / 255.0)
                        for k in FEATURE_KEYS:
                            out[k].append(getattr(f, k).float().cpu().numpy())
                        bar.update(min(batch_size, len(frames) - i))
                tmp = parts / f"part-{g.start:06d}.tmp.npz"
                np.savez(tmp, **{k: np.concatenate(v) for k, v in out.items()})
                os.replace(tmp, parts / f"part-{g.start:06d}.npz")
            bar.close()
            for k in FEATURE_KEYS:  # one array per key, rows in sample order
                chunks = []
                for g in groups:
                    with np.load(parts / f"part-{g.start:06d}.npz") as z:
                        chunks.append(z[k])
                _atomic_save_npy(self.dir / f"{k}.npy", np.concatenate(chunks))
            meta = {
                "format": CACHE_FORMAT, "frames": len(dataset), "encoder_fingerprint": self.encoder_fp,
                "dataset_fingerprint": self.dataset_fp, "dataset": str(dataset.root), "camera": camera_key,
                "image_size": dataset.image_size,
                "episodes": {str(e): [int(s), int(t)] for e, s, t in
                             zip(dataset.episode_indices, dataset._ep_start, dataset._ep_len)},
            }  # fmt: skip
            _atomic_write_text(self.dir / "meta.json", json.dumps(meta))
            for f in parts.iterdir():
                f.unlink()
            parts.rmdir()

    # ---- reading ----------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Memory-mapped (frames, ...) float32 arrays per feature key (shared page cache across processes)."""
        if not self.complete:
            raise FileNotFoundError(f"feature cache {self.dir} is not complete: build it first")
        if self._arrays is None:
            self._arrays = {k: np.load(self.dir / f"{k}.npy", mmap_mode="r") for k in FEATURE_KEYS}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers re-open the memory maps instead of receiving a pickled copy of the arrays.
        return self.__dict__ | {"_arrays": None}

    def episode_rows(self) -> dict[int, tuple[int, int]]:
        """episode index -> (first row, length)."""
        meta = json.loads((self.dir / "meta.json").read_text())
        return {int(e): (int(s), int(t)) for e, (s, t) in meta["episodes"].items()}


class CachedFeatureDataset(Dataset):
    """The samples of ``dataset`` with the images replaced by their cached features: camera k's from
    ``caches[k]`` under ``feature_keys(k)`` (one cache: the first camera's, under ``FEATURE_KEYS``).

    ``dataset`` may hold any subset of the episodes the caches were built on (e.g. the train or validation
    split); rows are found by (episode, frame)."""

    def __init__(self, dataset: PolicyDataset, cache: FeatureCache | list[FeatureCache]) -> None:
        caches = [cache] if isinstance(cache, FeatureCache) else list(cache)
        if len(caches) != len(dataset.camera_keys):
            raise ValueError(f"{len(caches)} feature caches for a dataset of {len(dataset.camera_keys)} cameras")
        self.dataset, self.caches = dataset, caches
        self._row_start = []
        for c in caches:
            rows = c.episode_rows()
            starts = []
            for e, t in zip(dataset.episode_indices, dataset._ep_len):
                if e not in rows or rows[e][1] != int(t):
                    raise ValueError(f"feature cache {c.dir} does not hold episode {e} of {dataset.root} as it is now")
                starts.append(rows[e][0])
            self._row_start.append(np.asarray(starts, dtype=np.int64))

    @property
    def cache(self) -> FeatureCache:
        """The first camera's cache."""
        return self.caches[0]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.dataset.get(i, image=False)
        i = int(i) % len(self.dataset)
        p, f = self.dataset._sample_ep[i], self.dataset._sample_frame[i]
        for k, (c, starts) in enumerate(zip(self.caches, self._row_start)):
            row = int(starts[p] + f)
            arrays = c.arrays()
            for field, key in feature_keys(k).items():
                x[key] = torch.from_numpy(np.array(arrays[field][row]))
        return x

    # What the trainer's sampler and logs read from a dataset.
    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "caches", "_row_start"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
