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
With image augmentation (``--aug-shift`` / ``--aug-color``, which a cache would otherwise rule out), the cache
holds ``views`` features per frame (:class:`AugmentedViews`): view 0 is the frame itself, views 1.. are
augmented copies drawn from seeds of (episode, frame, view), and each training sample reads the view its own
draw seed picks (:meth:`CachedFeatureDataset.get_seeded`; validation reads view 0). A few fixed copies per frame
are less augmentation than a fresh draw every epoch, but they cost one encoder pass each, once.
Any change gives another key (the views and their strengths included), so a stale cache is never read. The folder is complete only once its
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
from dataclasses import asdict, dataclass
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
from damvla.training.augment import augment_images

CACHE_FORMAT = 1
EPISODES_PER_PART = 16  # parts of the resumable build (each written atomically)
_VIEW_STREAM = 0x7E1E_5C0  # separates a sample's choice of view from its other draws of the same seed


@dataclass(frozen=True)
class AugmentedViews:
    """``views`` features per frame: the frame itself, then ``views - 1`` copies through
    ``augment_images(frame, seed, shift, color)``."""

    views: int
    shift: float
    color: float

    def __post_init__(self) -> None:
        if self.views < 2 or (self.shift <= 0 and self.color <= 0):
            raise ValueError(f"augmented views need views >= 2 and a shift or colour strength, got {self}")

    def seeds(self, episode: int, frames: range, view: int) -> torch.Tensor:
        """The augmentation seeds of ``frames`` of ``episode`` in ``view``: the same whichever batch or part
        computes them."""
        return torch.tensor([((episode << 24) + f) * 1024 + view for f in frames], dtype=torch.int64)

    def pick(self, seed: int) -> int:
        """The view a training sample with draw seed ``seed`` reads (uniform over all views)."""
        g = torch.Generator().manual_seed((int(seed) ^ _VIEW_STREAM) & (2**63 - 1))
        return int(torch.randint(0, self.views, (1,), generator=g))


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


def _atomic_concat_npy(path: Path, parts: list[Path], key: str, rows: int) -> None:
    """``np.concatenate`` of array ``key`` of every part (``rows`` rows in all), written through a memory map
    (an augmented cache can exceed the free memory) and made visible atomically."""
    tmp = path.with_name(path.name + ".tmp")
    out, at = None, 0
    for f in parts:
        with np.load(f) as z:
            a = z[key]
        if out is None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=a.dtype, shape=(rows, *a.shape[1:]))
        out[at : at + len(a)] = a
        at += len(a)
    assert out is not None and at == rows, f"{path}: the parts hold {at} rows, expected {rows}"
    out.flush()
    del out
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FeatureCache:
    """The cached features of one (frozen encoder, dataset) pair; see the module docstring."""

    def __init__(self, root: str | Path, encoder_fp: str, dataset_fp: str, views: AugmentedViews | None = None) -> None:
        ident = f"{encoder_fp}:{dataset_fp}"
        if views is not None:  # (a cache without views keeps the key it always had)
            ident += ":views" + json.dumps(asdict(views), sort_keys=True)
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:24]
        self.encoder_fp, self.dataset_fp, self.views = encoder_fp, dataset_fp, views
        self.dir = Path(root) / self.key
        self._arrays: dict[str, np.ndarray] | None = None

    @classmethod
    def for_policy(cls, policy: nn.Module, dataset: PolicyDataset, root: str | Path | None = None,
                   camera_key: str | None = None, views: AugmentedViews | None = None) -> FeatureCache:  # fmt: skip
        """The cache of camera ``camera_key`` (default the dataset's first) of ``dataset`` under ``policy``'s tower."""
        vision_cfg = policy.config.to_dict()["vision"]  # type: ignore[attr-defined]
        return cls(root or default_cache_root(), encoder_fingerprint(policy.vision, vision_cfg),
                   dataset_fingerprint(dataset, camera_key), views)  # fmt: skip

    @classmethod
    def for_cameras(cls, policy: nn.Module, dataset: PolicyDataset, root: str | Path | None = None,
                    views: AugmentedViews | None = None) -> list[FeatureCache]:  # fmt: skip
        """One cache per camera of ``dataset`` (``dataset.camera_keys``, the policy's cameras in order)."""
        return [cls.for_policy(policy, dataset, root, key, views) for key in dataset.camera_keys]

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
                        batch = frames[i : i + batch_size]
                        per_view = []
                        for v in range(1 if self.views is None else self.views.views):
                            x = batch
                            if v:  # (view 0: the frame itself)
                                seeds = self.views.seeds(int(dataset.episode_indices[p]), range(i, i + len(batch)), v)
                                x = augment_images(batch, seeds, self.views.shift, self.views.color)
                            f = vision(x.to(dev).float() / 255.0)
                            per_view.append({k: getattr(f, k).float().cpu().numpy() for k in FEATURE_KEYS})
                        for k in FEATURE_KEYS:  # (n, ...) without views, (n, views, ...) with them
                            out[k].append(per_view[0][k] if self.views is None else np.stack([pv[k] for pv in per_view], 1))
                        bar.update(len(batch))
                tmp = parts / f"part-{g.start:06d}.tmp.npz"
                np.savez(tmp, **{k: np.concatenate(v) for k, v in out.items()})
                os.replace(tmp, parts / f"part-{g.start:06d}.npz")
            bar.close()
            files = [parts / f"part-{g.start:06d}.npz" for g in groups]
            for k in FEATURE_KEYS:  # one array per key, rows in sample order
                _atomic_concat_npy(self.dir / f"{k}.npy", files, k, len(dataset))
            meta = {
                "format": CACHE_FORMAT, "frames": len(dataset), "encoder_fingerprint": self.encoder_fp,
                "dataset_fingerprint": self.dataset_fp, "dataset": str(dataset.root), "camera": camera_key,
                "image_size": dataset.image_size, "views": None if self.views is None else asdict(self.views),
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
        if len({c.views for c in caches}) > 1:
            raise ValueError(f"the cameras' feature caches hold different augmented views: {[c.views for c in caches]}")
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

    @property
    def views(self) -> AugmentedViews | None:
        return self.caches[0].views

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample ``i`` with the features of its frame itself (view 0 of an augmented cache)."""
        return self._sample(i, 0)

    def get_seeded(self, i: int, seed: int) -> dict[str, Any]:
        """Sample ``i`` as a training draw with seed ``seed`` sees it: in an augmented cache, the view the seed
        picks (the same in every camera)."""
        views = self.views
        return self._sample(i, 0 if views is None else views.pick(seed))

    def _sample(self, i: int, view: int) -> dict[str, Any]:
        x = self.dataset.get(i, image=False)
        i = int(i) % len(self.dataset)
        p, f = self.dataset._sample_ep[i], self.dataset._sample_frame[i]
        for k, (c, starts) in enumerate(zip(self.caches, self._row_start)):
            row = int(starts[p] + f)
            arrays = c.arrays()
            for field, key in feature_keys(k).items():
                a = arrays[field][row] if c.views is None else arrays[field][row, view]
                x[key] = torch.from_numpy(np.array(a))
        return x

    # What the trainer's sampler and logs read from a dataset.
    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "caches", "_row_start", "views"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
