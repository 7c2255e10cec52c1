"""``PolicyDataset``: a LeRobot v3.0 folder -> the training samples of docs/CONTRACTS.md.

Per sample (frame t of an episode of length T)::

    observation.images.<cam>  uint8 (3, S, S)   each selected camera at t, resized to the model's size S
    observation.state         float32 (S_dim,)
    observation.environment_state  float32 (E,)  only with ``env_state_key`` (an auxiliary training target)
    task                      str
    action                    float32 (H, D)    a[t : t+H] normalised (q01/q99 -> [-1, 1]); the gripper
                                                dimension binarised (1 = open) and not normalised
    action_is_pad             bool (H,)         t + j >= T; there the last action is repeated (LeRobot)
    trajectory_weight         float32 (H,)      w^t(t + j) (damvla.weighting), clamped like the actions
    router_label              int64 ()          routing label of step t (0 arm, 1 gripper)
    episode_index, frame_index, index  int64 ()

Everything low-dimensional (actions, states, weights, labels) is read, validated and precomputed once in
``__init__``, per episode. Frames are decoded a whole episode at a time and kept, already resized when
that is smaller, in a per-process LRU cache bounded in bytes; ``EpisodeBlockSampler`` orders samples so a
shuffled epoch decodes each episode about once per worker instead of once per sample.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from damvla import weighting
from damvla.data.lerobot import CAMERA_DTYPES, INFO_PATH, STATS_PATH, DatasetError, LeRobotDatasetReader
from damvla.keys import ACTION_KEY, ENV_STATE_KEY, STATE_KEY, image_key
from damvla.normalize import ActionNormalizer

__all__ = ["PolicyDataset", "EpisodeBlockSampler", "resize_images", "binarize_gripper", "GripperSpec"]



def resize_images(images: torch.Tensor, size: int, batch: int = 64) -> torch.Tensor:
    """Resize uint8 images to (size, size) with antialiased bilinear interpolation.

    Args:
        images: uint8 ``(N, 3, H, W)``.
        size: output side S.
        batch: frames resized at once (bounds the float32 temporary to batch * 3 * max(H,S) * max(W,S)).
    Returns:
        uint8 ``(N, 3, S, S)`` (the input itself when already that size).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"resize_images: expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8, device=images.device)
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch]
        if x.device.type == "cpu":
            # PyTorch's uint8 antialiased bilinear kernel (CPU): ~3-7x faster than going through float32 and
            # within one grey level of it.
            out[i : i + batch] = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        else:
            y = F.interpolate(
                x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            out[i : i + batch] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


class GripperSpec:
    """How the raw gripper action maps to binary open (1) / closed (0).

    ``binary = (g > threshold)`` when ``open_value > threshold``, else ``(g < threshold)``.
    """

    def __init__(self, index: int, threshold: float, open_value: float, levels: tuple[float, float]) -> None:
        self.index, self.threshold, self.open_value, self.levels = (
            index,
            float(threshold),
            float(open_value),
            levels,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "threshold": self.threshold,
            "open_value": self.open_value,
            "levels": list(self.levels),
        }


def feature_names(feature: dict[str, Any], dim: int) -> list[str] | None:
    """The ``dim`` per-dimension names of an info.json feature, or None when it has none that fit.

    LeRobot writes ``"names": [...]``, older datasets ``"names": {"motors": [...]}``."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    if isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names):
        return list(names)
    return None


def binarize_gripper(g: np.ndarray, threshold: float, open_value: float) -> np.ndarray:
    """Raw gripper values ``(...)`` -> float32 {0, 1} with 1 = open."""
    g = np.asarray(g, dtype=np.float64)
    b = g > threshold if open_value > threshold else g < threshold
    return b.astype(np.float32)


class PolicyDataset(Dataset):
    """Training samples (docs/CONTRACTS.md) from a LeRobot v3.0 dataset folder.

    Args:
        root: dataset folder.
        horizon: H, the action-chunk length.
        image_size: S, the model's square input size (``config.vision.image_size``).
        camera: camera name (``observation.images.<camera>``) or a full feature key, or a list of them (every
            sample then holds each camera; the first is ``camera_key``).
        gripper_index: gripper dimension of the action; default ``info["damvla"]["gripper_index"]``. Required
            unless ``phase_key`` is given (then ``None`` means: no gripper, every dimension normalised).
        gripper_threshold: raw value separating open and closed; default ``info["damvla"]["gripper_threshold"]``,
            else the midpoint of the two levels found in the data.
        gripper_open: raw value meaning open; default ``info["damvla"]["gripper_open"]``, else 1.0.
        gripper_tolerance: every raw gripper value must lie within this fraction of the level gap from one
            of the two levels, otherwise the channel is not binary and loading fails.
        sigma_lead, sigma_trail: widths of the asymmetric Gaussian around each event (damvla.weighting).
        normalizer: an ``ActionNormalizer`` (e.g. from a checkpoint); default from ``stats.json`` q01/q99 of
            the action with the gripper excluded.
        phase_key: optional per-frame column to derive routing events from instead of the gripper. Integer
            values are phase labels (0 = arm, k >= 1 = expert k; ``weighting.phase_events``); other values
            are a scalar signal whose crossings of ``phase_threshold`` are the events.
        phase_threshold: threshold for a scalar ``phase_key`` signal.
        episodes: episode indices to use (e.g. a train split); default all.
        cache_bytes: per-process budget of the decoded-frame LRU cache.
        action_key, state_key: feature names read as the action and the state (emitted as ``action`` and
            ``observation.state``).
        env_state_key: a feature read as the environment state (emitted as ``observation.environment_state``),
            e.g. ``observation.environment_state``; default none.
        progress: show a progress bar while loading (default: for 200+ episodes).
        require_routing: with ``False``, a dataset with neither a gripper index nor ``phase_key`` loads
            with no routing signal (every label 0, every trajectory weight 0) instead of failing; for
            validating the format (``damvla data check``). See ``has_routing``.
    """

    def __init__(
        self,
        root: str | Path,
        horizon: int = 16,
        image_size: int = 224,
        camera: str | Sequence[str] = "image",
        gripper_index: int | None = None,
        gripper_threshold: float | None = None,
        sigma_lead: float = 6.0,
        sigma_trail: float = 2.0,
        normalizer: ActionNormalizer | None = None,
        phase_key: str | None = None,
        episodes: Sequence[int] | None = None,
        *,
        gripper_open: float | None = None,
        gripper_tolerance: float = 0.1,
        phase_threshold: float = 0.5,
        cache_bytes: int = 1 << 30,
        action_key: str = ACTION_KEY,
        state_key: str = STATE_KEY,
        env_state_key: str | None = None,
        progress: bool | None = None,
        require_routing: bool = True,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.reader = LeRobotDatasetReader(self.root)
        r = self.reader
        info_path = self.root / INFO_PATH
        self.horizon, self.image_size = int(horizon), int(image_size)
        self.sigma_lead, self.sigma_trail = float(sigma_lead), float(sigma_trail)
        self.action_key, self.state_key, self.phase_key = action_key, state_key, phase_key
        self.env_state_key = env_state_key
        self.cache_bytes = int(cache_bytes)

        # -- features ---------------------------------------------------------------------------
        cams = [camera] if isinstance(camera, str) else list(camera)
        if not cams:
            raise ValueError("camera: at least one camera is needed")
        self.camera_keys = [c if c in r.features else image_key(c) for c in cams]
        for key in self.camera_keys:
            if key not in r.features or r.features[key]["dtype"] not in CAMERA_DTYPES:
                raise DatasetError(f"{info_path}: missing feature {key!r} (cameras: {r.camera_keys})")
        self.camera_key = self.camera_keys[0]
        for k in (action_key, state_key) + tuple(k for k in (phase_key, env_state_key) if k):
            if k not in r.features:
                raise DatasetError(f"{info_path}: missing feature {k!r} (have {sorted(r.features)})")
            if r.features[k]["dtype"] in CAMERA_DTYPES + ("string",):
                raise DatasetError(
                    f"{info_path}: feature {k!r} has dtype {r.features[k]['dtype']}, expected numeric"
                )
        if phase_key and list(r.features[phase_key]["shape"]) != [1]:
            raise DatasetError(
                f"{info_path}: phase feature {phase_key!r} must have shape [1], got {r.features[phase_key]['shape']}"
            )
        self.action_dim = int(np.prod(r.features[action_key]["shape"]))
        self._check_stats()

        # -- gripper settings -------------------------------------------------------------------
        dam = r.info.get("damvla") or {}
        if gripper_index is None:
            gripper_index = dam.get("gripper_index")
        if gripper_index is None and phase_key is None and require_routing:
            raise ValueError(
                f"{info_path}: no gripper index: pass gripper_index (e.g. --gripper-index) or write "
                f'info["damvla"]["gripper_index"]; or pass phase_key to route on another signal'
            )
        if gripper_index is not None:
            gripper_index = int(gripper_index)
            if gripper_index < 0:
                gripper_index += self.action_dim
            if not 0 <= gripper_index < self.action_dim:
                raise ValueError(
                    f"gripper_index {gripper_index} outside the action dimension {self.action_dim}"
                )
        self.gripper_index = gripper_index
        self.has_routing = gripper_index is not None or phase_key is not None

        # -- episodes -----------------------------------------------------------------------------
        self.episode_indices = [int(e) for e in (episodes if episodes is not None else r.episodes)]
        if not self.episode_indices:
            raise ValueError(f"{self.root}: no episodes selected")
        for e in self.episode_indices:
            r.episode(e)  # raises for unknown episodes
        if any(k in r.video_keys for k in self.camera_keys):
            self._probe_videos()
        raw = self._load_lowdim(progress)

        # gripper: levels, threshold, binarisation check over every selected frame
        self.gripper: GripperSpec | None = None
        if gripper_index is not None:
            if gripper_threshold is None:
                gripper_threshold = dam.get("gripper_threshold")
            if gripper_open is None:
                gripper_open = dam.get("gripper_open", 1.0)
            self.gripper = self._gripper_spec(
                raw, gripper_index, gripper_threshold, float(gripper_open), gripper_tolerance
            )

        # -- normaliser ---------------------------------------------------------------------------
        exclude = [gripper_index] if gripper_index is not None else []
        if normalizer is None:
            normalizer = ActionNormalizer.from_stats(r.stats[action_key], exclude=exclude)
        if normalizer.dim != self.action_dim:
            raise ValueError(
                f"normalizer dimension {normalizer.dim} != action dimension {self.action_dim} of {info_path}"
            )
        if gripper_index is not None and normalizer.normalize[gripper_index]:
            raise ValueError(
                f"normalizer normalises the gripper dimension {gripper_index}; it must be excluded"
            )
        self.normalizer = normalizer

        # -- per-episode precomputation (once) ---------------------------------------------------
        self._precompute(raw)
        self._cache: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()
        self._cache_used = 0

    # ------------------------------------------------------------------------------------------
    def _check_stats(self) -> None:
        r = self.reader
        path = self.root / STATS_PATH
        if not r.stats:
            raise DatasetError(
                f"{path}: missing (needed for the action normaliser); recompute the dataset stats"
            )
        if self.action_key not in r.stats:
            raise DatasetError(f"{path}: no entry for feature {self.action_key!r} (have {sorted(r.stats)})")
        for key, st in r.stats.items():
            ft = r.features.get(key)
            if ft is None:
                continue
            expected = (3, 1, 1) if ft["dtype"] in CAMERA_DTYPES else tuple(ft["shape"])
            for name, v in st.items():
                if name == "count":
                    continue
                if v.shape != expected and not (
                    v.size == int(np.prod(expected)) and ft["dtype"] not in CAMERA_DTYPES
                ):
                    raise DatasetError(
                        f"{path}: stats[{key!r}][{name!r}] has shape {list(v.shape)}, feature shape is {list(expected)}"
                    )
                if key == self.action_key and not np.all(np.isfinite(v)):
                    raise DatasetError(f"{path}: stats[{key!r}][{name!r}] holds NaN/inf")

    def _probe_videos(self) -> None:
        """Open every video file the selected episodes use once, so a corrupt mp4 fails at load time."""
        import av

        seen: set[Path] = set()
        for key in self.camera_keys:
            if key not in self.reader.video_keys:
                continue
            for e in self.episode_indices:
                p = self.reader.video_path(e, key)
                if p in seen:
                    continue
                seen.add(p)
                if not p.is_file():
                    raise DatasetError(f"{p}: video file of episode {e} ({key}) not found")
                try:
                    with av.open(str(p)) as c:
                        if not c.streams.video:
                            raise DatasetError(f"{p}: episode {e}: no video stream")
                except DatasetError:
                    raise
                except Exception as ex:
                    raise DatasetError(f"{p}: episode {e}: cannot open video ({type(ex).__name__}: {ex})") from ex

    def _load_lowdim(self, progress: bool | None) -> list[dict[str, np.ndarray]]:
        r = self.reader
        keys = [self.action_key, self.state_key, "task_index"] + [k for k in (self.phase_key, self.env_state_key) if k]
        out = []
        show = len(self.episode_indices) >= 200 if progress is None else progress
        for e in tqdm(self.episode_indices, desc="loading episodes", disable=not show, leave=False):
            path = r.data_path(e)
            d = r.episode_arrays(e, keys)
            t = r.episode(e).length
            if t < 2:
                raise DatasetError(f"{path}: episode {e} has {t} frame(s); at least 2 are needed")
            a = np.asarray(d[self.action_key], dtype=np.float64).reshape(t, -1)
            s = np.asarray(d[self.state_key], dtype=np.float64).reshape(t, -1)
            checked = [(self.action_key, a), (self.state_key, s)]
            if self.env_state_key:
                env = np.asarray(d[self.env_state_key], dtype=np.float64).reshape(t, -1)
                checked.append((self.env_state_key, env))
            for name, arr in checked:
                bad = ~np.isfinite(arr)
                if bad.any():
                    f, j = np.argwhere(bad)[0]
                    raise DatasetError(
                        f"{path}: episode {e}: field {name!r} holds NaN/inf (frame {f}, dim {j})"
                    )
            ti = np.asarray(d["task_index"], dtype=np.int64).reshape(t)
            if ti.min() < 0 or ti.max() >= len(r.tasks):
                raise DatasetError(
                    f"{path}: episode {e}: task_index outside 0..{len(r.tasks) - 1} of meta/tasks.parquet"
                )
            item = {"action": a, "state": s.astype(np.float32), "task_index": ti}
            if self.env_state_key:
                item["env_state"] = env.astype(np.float32)
            if self.phase_key:
                ph = np.asarray(d[self.phase_key], dtype=np.float64).reshape(t)
                if not np.all(np.isfinite(ph)):
                    raise DatasetError(f"{path}: episode {e}: field {self.phase_key!r} holds NaN/inf")
                item["phase"] = ph
            out.append(item)
        return out

    def _gripper_spec(
        self,
        raw: list[dict[str, np.ndarray]],
        gi: int,
        threshold: float | None,
        open_value: float,
        tol: float,
    ) -> GripperSpec:
        g_all = np.concatenate([d["action"][:, gi] for d in raw])
        lo, hi = float(g_all.min()), float(g_all.max())
        gap = hi - lo
        if threshold is None:
            if gap < 1e-6:
                raise DatasetError(
                    f"{self.root}: gripper dimension {gi} of {self.action_key!r} is constant ({lo:g}); "
                    f"cannot infer the open/closed threshold: pass gripper_threshold"
                )
            threshold = (lo + hi) / 2
        threshold = float(threshold)
        if gap >= 1e-6:
            if not lo < threshold < hi:
                raise DatasetError(
                    f"{self.root}: gripper threshold {threshold:g} is not between the gripper levels {lo:g} and {hi:g} "
                    f"(dimension {gi} of {self.action_key!r})"
                )
            for e, d in zip(self.episode_indices, raw):
                g = d["action"][:, gi]
                dist = np.minimum(np.abs(g - lo), np.abs(g - hi))
                if np.any(dist > tol * gap):
                    f = int(np.argmax(dist > tol * gap))
                    raise DatasetError(
                        f"{self.reader.data_path(e)}: episode {e}: gripper dimension {gi} of {self.action_key!r} is not "
                        f"binarisable: value {g[f]:g} at frame {f} is not near either level {lo:g} / {hi:g} "
                        f"(tolerance {tol:g} of the gap)"
                    )
        return GripperSpec(gi, threshold, open_value, (lo, hi))

    def _precompute(self, raw: list[dict[str, np.ndarray]]) -> None:
        lengths = np.array([len(d["action"]) for d in raw], dtype=np.int64)
        self._ep_len = lengths
        self._ep_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        n = int(lengths.sum())
        self._sample_ep = np.repeat(np.arange(len(raw), dtype=np.int64), lengths)
        self._sample_frame = np.concatenate([np.arange(t, dtype=np.int64) for t in lengths])
        self._ep_from_index = np.array(
            [self.reader.episode(e).dataset_from_index for e in self.episode_indices], dtype=np.int64
        )
        actions = np.empty((n, self.action_dim), dtype=np.float32)
        weights = np.empty(n, dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        num_experts = 2
        if self.phase_key and all(np.all(d["phase"] == np.round(d["phase"])) for d in raw):
            num_experts = max(2, int(max(d["phase"].max() for d in raw)) + 1)
        for d, s, t in zip(raw, self._ep_start, lengths):
            a = d["action"].copy()
            binary = None
            if self.gripper is not None:
                binary = binarize_gripper(
                    a[:, self.gripper.index], self.gripper.threshold, self.gripper.open_value
                )
                a[:, self.gripper.index] = binary
            actions[s : s + t] = self.normalizer.normalize_actions(a).astype(np.float32)
            w, lab = self._episode_weights(d, binary, num_experts)
            weights[s : s + t], labels[s : s + t] = w, lab
        self._actions = actions  # (N, D) normalised
        self._weights = weights  # (N,) w^t
        self._labels = labels  # (N,)
        self._states = np.concatenate([d["state"] for d in raw]).astype(np.float32)  # (N, S)
        self._env_states = np.concatenate([d["env_state"] for d in raw]) if self.env_state_key else None  # (N, E)
        self._task_index = np.concatenate([d["task_index"] for d in raw])  # (N,)
        self.num_experts = num_experts

    def _episode_weights(
        self, d: dict[str, np.ndarray], binary: np.ndarray | None, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(T,) trajectory weight w^t and (T,) router labels of one episode."""
        t = len(d["action"])
        if self.phase_key:
            ph = d["phase"]
            if k >= 2 and np.all(ph == np.round(ph)) and ph.min() >= 0:
                ew = weighting.expert_weights(
                    t, weighting.phase_events(ph.astype(np.int64), k), self.sigma_lead, self.sigma_trail
                )
                return 1.0 - ew[:, 0], weighting.labels_from_weights(ew)
            w = weighting.asymmetric_gaussian(
                t, weighting.signal_events(ph, self.phase_threshold), self.sigma_lead, self.sigma_trail
            )
            return w, (w >= 0.5).astype(np.int64)
        if binary is None:  # no routing signal (require_routing=False): nothing to weight or label
            return np.zeros(t, np.float32), np.zeros(t, np.int64)
        w = weighting.trajectory_weights(binary, self.sigma_lead, self.sigma_trail, threshold=0.5)
        return w, (w >= 0.5).astype(np.int64)

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._sample_ep)

    @property
    def num_episodes(self) -> int:
        return len(self.episode_indices)

    def episode_sample_range(self, position: int) -> tuple[int, int]:
        """[start, stop) sample indices of the episode at ``position`` in ``episode_indices``."""
        s = int(self._ep_start[position])
        return s, s + int(self._ep_len[position])

    def _episode_frames(self, p: int, key: str | None = None) -> torch.Tensor:
        """uint8 (T, 3, h, w) frames of camera ``key`` (default ``camera_key``) of episode position p, from the
        cache or decoded (and resized when smaller)."""
        key = key or self.camera_key
        if (p, key) in self._cache:
            self._cache.move_to_end((p, key))
            return self._cache[p, key]
        frames = self.reader.episode_frames(self.episode_indices[p], key)  # (T, H, W, 3)
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        # Cache whichever is smaller: resized frames (resize once per episode) or the originals (upsampling
        # per item costs less memory than caching the larger image).
        x = resize_images(x, self.image_size) if self.image_size**2 <= h * w else x.contiguous()
        nbytes = x.numel()
        while self._cache and self._cache_used + nbytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_used -= old.numel()
        if nbytes <= self.cache_bytes:
            self._cache[p, key] = x
            self._cache_used += nbytes
        return x

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.get(i)

    def get(self, i: int, image: bool = True) -> dict[str, Any]:
        """Sample ``i``; ``image=False`` leaves the camera frame out (features come from a cache)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        i = int(i) % len(self)
        p, f = int(self._sample_ep[i]), int(self._sample_frame[i])
        s, t = int(self._ep_start[p]), int(self._ep_len[p])
        steps = f + np.arange(self.horizon)
        pad = steps >= t
        rows = s + np.minimum(steps, t - 1)  # past the end: repeat the last action (LeRobot's padding)
        out: dict[str, Any] = {}
        if image:
            for key in self.camera_keys:
                img = self._episode_frames(p, key)[f]
                if img.shape[-2:] != (self.image_size, self.image_size):
                    img = resize_images(img[None], self.image_size)[0]
                out[key] = img
        if self._env_states is not None:
            out[ENV_STATE_KEY] = torch.from_numpy(self._env_states[s + f])
        return out | {
            STATE_KEY: torch.from_numpy(self._states[s + f]),  # the contract key, whatever state_key was read
            "task": self.reader.tasks[int(self._task_index[s + f])],
            "action": torch.from_numpy(self._actions[rows]),
            "action_is_pad": torch.from_numpy(pad),
            "trajectory_weight": torch.from_numpy(self._weights[rows]),
            "router_label": torch.tensor(int(self._labels[s + f]), dtype=torch.int64),
            "episode_index": torch.tensor(self.episode_indices[p], dtype=torch.int64),
            "frame_index": torch.tensor(f, dtype=torch.int64),
            "index": torch.tensor(int(self._ep_from_index[p]) + f, dtype=torch.int64),
        }

    # ------------------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Dataset facts for the checkpoint's metadata.json (JSON-serialisable)."""
        r = self.reader
        return {
            "source": str(self.root.resolve()),
            "codebase_version": r.info.get("codebase_version"),
            "robot_type": r.info.get("robot_type"),
            "fps": r.fps,
            "camera_key": self.camera_key,
            "camera_keys": list(self.camera_keys),
            "image_size": self.image_size,
            "horizon": self.horizon,
            "action_key": self.action_key,
            "state_key": self.state_key,
            "env_state_key": self.env_state_key,
            "features": {k: list(ft["shape"]) for k, ft in r.features.items()},
            # the action dimensions' names from info.json (the server advertises them); None when absent
            "action_names": feature_names(r.features[self.action_key], self.action_dim),
            "gripper": self.gripper.as_dict() if self.gripper else None,
            "phase_key": self.phase_key,
            "sigma_lead": self.sigma_lead,
            "sigma_trail": self.sigma_trail,
            "episodes": len(self.episode_indices),
            "frames": len(self),
            "tasks": r.tasks,
            "damvla": r.info.get("damvla") or {},
        }

    def router_label_balance(self) -> np.ndarray:
        """Count of samples per router label, ``(num_experts,)`` int64."""
        return np.bincount(self._labels, minlength=self.num_experts)

    def make_sampler(
        self, shuffle: bool = True, block_episodes: int = 8, seed: int = 0
    ) -> EpisodeBlockSampler:
        """An ``EpisodeBlockSampler`` over this dataset (pass as ``DataLoader(sampler=...)``)."""
        return EpisodeBlockSampler(self, block_episodes=block_episodes, shuffle=shuffle, seed=seed)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the precomputed arrays but start with an empty frame cache.
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        state["_cache_used"] = 0
        return state


class EpisodeBlockSampler(Sampler[int]):
    """Shuffle that keeps decoding cheap: episodes are shuffled and grouped into blocks of
    ``block_episodes``; the samples of a block are shuffled among themselves and blocks follow each other.

    A uniformly shuffled epoch touches a random episode at every sample, so with whole-episode decoding it
    decodes ~one episode per sample once the cache is full. Here each worker decodes each episode about once
    per epoch, while batches still mix ``block_episodes`` episodes (and their tasks). Call ``set_epoch``
    for a new order each epoch (as with DistributedSampler).
    """

    def __init__(
        self, dataset: PolicyDataset, block_episodes: int = 8, shuffle: bool = True, seed: int = 0
    ) -> None:
        if block_episodes < 1:
            raise ValueError(f"block_episodes must be >= 1, got {block_episodes}")
        self.ranges = [dataset.episode_sample_range(p) for p in range(dataset.num_episodes)]
        self.block_episodes, self.shuffle, self.seed, self.epoch = block_episodes, shuffle, seed, 0
        self.n = len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            yield from range(self.n)
            return
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(len(self.ranges))
        for b in range(0, len(order), self.block_episodes):
            idx = np.concatenate([np.arange(*self.ranges[p]) for p in order[b : b + self.block_episodes]])
            yield from rng.permutation(idx).tolist()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_content_fingerprint(ds: PolicyDataset) -> str:
    """sha256 over what training reads: every file under ``meta/`` and ``data/`` (actions, states and,
    in image datasets, the frames live in ``data/``) plus the selected cameras' video files, as
    (sorted relative path, sha256 of bytes). Two datasets with the same length but other actions differ."""
    root = ds.root
    files = {p for sub in ("meta", "data") for p in (root / sub).rglob("*") if p.is_file()}
    for key in ds.camera_keys:
        if key in ds.reader.video_keys:
            files |= {ds.reader.video_path(e, key) for e in ds.episode_indices}
    h = hashlib.sha256()
    for rel in sorted(str(p.relative_to(root)) for p in files):
        h.update(f"{rel}:{file_sha256(root / rel)}\n".encode())
    return h.hexdigest()
