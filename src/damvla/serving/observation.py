"""Request validation and the observation map: openpi request keys -> the policy's batch keys.

An openpi client sends flat keys (``observation/image``, ``observation/wrist_image``, ``observation/state``,
``prompt``); the policy reads LeRobot keys (``observation.images.<cam>``, ``observation.state``, ``task``,
see docs/CONTRACTS.md). :class:`ObservationMap` says which request key feeds which batch key. It is data,
configurable from JSON (``damvla serve --obs-map``), so a robot whose client sends other key names needs
no code change on either side::

    {
      "images": {"observation/image": "image", "observation/wrist_image": "wrist_image"},
      "required": ["observation/image"],
      "state": "observation/state",
      "state_required": true,
      "prompt": "prompt",
      "resize": "stretch"
    }

Every field is optional; missing fields keep the defaults above (with ``"image"`` replaced by the camera
the policy reads, ``policy.config.vision.camera``). A policy that reads more cameras
(``vision.extra_cameras``) takes its second from ``observation/wrist_image`` and any further camera NAME from
``observation/NAME``. ``required`` defaults to the request keys that feed the cameras the policy reads. ``resize`` is ``"stretch"`` (plain resize to S x S) or ``"pad"`` (keep the aspect ratio and
pad with black, like openpi's ``resize_with_pad``); an image that is already S x S is passed through
untouched either way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from damvla.keys import STATE_KEY, image_key

MIN_IMAGE_SIDE = 8  # smaller than this is not a camera frame
MAX_IMAGE_SIDE = 4096
MAX_STATE_DIM = 1024
MAX_PROMPT_CHARS = 2000
RESIZE_MODES = ("stretch", "pad")


class ObservationError(ValueError):
    """A request whose keys, dtypes or shapes do not match what the server expects."""


@dataclass
class ObservationMap:
    """Which request key feeds which policy batch key (see the module docstring for the JSON form)."""

    # request key -> camera name; the batch key is ``observation.images.<camera>``
    images: dict[str, str] = field(default_factory=dict)
    # request image keys that must be present (the others are optional)
    required: list[str] = field(default_factory=list)
    # request key of the proprio state (``None``: the server neither expects nor forwards a state)
    state: str | None = "observation/state"
    state_required: bool = True
    # request key of the instruction, forwarded as ``task``
    prompt: str = "prompt"
    resize: str = "stretch"

    @classmethod
    def default(cls, cameras: str | Sequence[str]) -> ObservationMap:
        """openpi's LIBERO keys: ``observation/image`` feeds the policy's camera, ``observation/wrist_image`` its
        second camera (optional when it reads one), ``observation/NAME`` any further camera NAME."""
        cams = _cameras(cameras)
        wrist = cams[1] if len(cams) > 1 else ("wrist_image" if cams[0] != "wrist_image" else "wrist_image_2")
        images = {"observation/image": cams[0], "observation/wrist_image": wrist}
        images |= {f"observation/{c}": c for c in cams[2:]}
        return cls(images=images, required=[k for k, c in images.items() if c in cams])

    @classmethod
    def from_dict(cls, d: dict[str, Any], cameras: str | Sequence[str]) -> ObservationMap:
        """Defaults overridden by ``d``; ``required`` defaults to the keys that feed ``cameras``."""
        if not isinstance(d, dict):
            raise ValueError(f"observation map: expected a JSON object, got {type(d).__name__}")
        known = {f for f in asdict(cls())}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"observation map: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        cams = _cameras(cameras)
        out = cls.default(cams)
        for key, value in d.items():
            setattr(out, key, value)
        if "images" in d and "required" not in d and isinstance(out.images, dict):
            out.required = [k for k, cam in out.images.items() if cam in cams]
        return out.validate(cams)

    @classmethod
    def load(cls, spec: str | None, cameras: str | Sequence[str]) -> ObservationMap:
        """From ``None`` (defaults), a JSON string, or the path of a JSON file."""
        if spec is None:
            return cls.default(cameras).validate(cameras)
        text = spec
        if not spec.lstrip().startswith("{"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"--obs-map {spec!r}: neither inline JSON nor an existing file")
            text = path.read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"observation map {spec!r:.80}: invalid JSON: {e}") from e
        return cls.from_dict(d, cameras)

    def validate(self, cameras: str | Sequence[str]) -> ObservationMap:
        """Check the map is usable for a policy that reads ``cameras``; raises ``ValueError``."""
        errs = []
        cams = _cameras(cameras)
        if not isinstance(self.images, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.images.items()
        ):
            errs.append("images must map request keys to camera names (non-empty strings)")
        else:
            mapped = list(self.images.values())
            for camera in cams:
                if camera not in mapped:
                    errs.append(f"no request key maps to camera {camera!r}, a camera the policy reads")
            dup = sorted({c for c in mapped if mapped.count(c) > 1})
            if dup:
                errs.append(f"several request keys map to camera(s) {dup}")
        if not isinstance(self.required, list) or not all(k in self.images for k in self.required):
            errs.append(f"required={self.required!r} must list keys of images {sorted(self.images)}")
        else:
            for camera in cams:
                if camera in self.images.values() and not any(self.images.get(k) == camera for k in self.required):
                    errs.append(f"the request key feeding camera {camera!r} must be required")
        if self.state is not None and not (isinstance(self.state, str) and self.state):
            errs.append("state must be a request key or null")
        if not isinstance(self.state_required, bool):
            errs.append("state_required must be true or false")
        if not (isinstance(self.prompt, str) and self.prompt):
            errs.append("prompt must be a request key")
        if self.resize not in RESIZE_MODES:
            errs.append(f"resize={self.resize!r}: expected one of {RESIZE_MODES}")
        if errs:
            raise ValueError("invalid observation map: " + "; ".join(errs))
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- validation ----------------------------------------------------------------------------------
def _image(key: str, value: Any) -> np.ndarray:
    """A uint8 H x W x 3 image (3 x H x W is accepted and transposed, as openpi's LIBERO policy does)."""
    if not isinstance(value, np.ndarray):
        raise ObservationError(f"{key}: expected a uint8 array of shape (H, W, 3), got {type(value).__name__}")
    if value.dtype != np.uint8:
        raise ObservationError(f"{key}: expected dtype uint8, got {value.dtype.str}")
    if value.ndim == 3 and value.shape[0] == 3 and value.shape[-1] != 3:
        value = value.transpose(1, 2, 0)
    if value.ndim != 3 or value.shape[-1] != 3:
        raise ObservationError(f"{key}: expected shape (H, W, 3), got {tuple(value.shape)}")
    h, w = value.shape[:2]
    if not (MIN_IMAGE_SIDE <= h <= MAX_IMAGE_SIDE and MIN_IMAGE_SIDE <= w <= MAX_IMAGE_SIDE):
        raise ObservationError(
            f"{key}: image size {h}x{w} is outside {MIN_IMAGE_SIDE}..{MAX_IMAGE_SIDE} pixels per side"
        )
    return value


def _state(key: str, value: Any, state_dim: int | None) -> np.ndarray:
    if isinstance(value, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        value = np.asarray(value, dtype=np.float32)  # a plain list of numbers is unambiguous
    if not isinstance(value, np.ndarray):
        raise ObservationError(f"{key}: expected a 1-D float array, got {type(value).__name__}")
    if value.dtype.kind != "f":
        raise ObservationError(f"{key}: expected a float dtype, got {value.dtype.str}")
    if value.ndim != 1 or not 1 <= value.shape[0] <= MAX_STATE_DIM:
        raise ObservationError(f"{key}: expected shape (N,) with 1 <= N <= {MAX_STATE_DIM}, got {tuple(value.shape)}")
    if state_dim is not None and value.shape[0] != state_dim:
        raise ObservationError(f"{key}: expected {state_dim} values (the checkpoint's state), got {value.shape[0]}")
    if not np.all(np.isfinite(value)):
        raise ObservationError(f"{key}: holds NaN or inf")
    return value.astype(np.float32)


def _prompt(key: str, value: Any) -> str:
    if not isinstance(value, str):  # msgpack str; bytes (msgpack bin) are refused, not guessed at
        raise ObservationError(f"{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ObservationError(f"{key}: the instruction is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ObservationError(f"{key}: {len(value)} characters, the limit is {MAX_PROMPT_CHARS}")
    return str(value)


def resize_image(image: np.ndarray, size: int, mode: str = "stretch") -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, size, size), bilinear with anti-aliasing; exact copy when already sized."""
    # Copy: decoded arrays are read-only views of the received frame.
    chw = torch.from_numpy(np.array(image, dtype=np.uint8, order="C", copy=True)).permute(2, 0, 1)  # (3, H, W)
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return chw.contiguous()
    if mode == "stretch":
        th, tw = size, size
    else:  # "pad": fit the longer side, keep the aspect ratio
        scale = size / max(h, w)
        th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    x = chw.unsqueeze(0).float()
    x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    x = x.round().clamp_(0, 255).to(torch.uint8)[0]
    if (th, tw) == (size, size):
        return x
    out = torch.zeros(3, size, size, dtype=torch.uint8)
    top, left = (size - th) // 2, (size - tw) // 2
    out[:, top : top + th, left : left + tw] = x
    return out


def _cameras(cameras: str | Sequence[str]) -> list[str]:
    cams = [cameras] if isinstance(cameras, str) else list(cameras)
    if not cams:
        raise ValueError("observation map: the policy reads no camera")
    return cams


def observation_to_batch(
    obs: Any,
    obs_map: ObservationMap,
    image_size: int,
    state_dim: int | None = None,
    check_prompt: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Validate one decoded request and build a batch of one for ``predict_action_chunk``.

    Returns ``{"observation.images.<cam>": uint8 (1, 3, S, S), "observation.state": float32 (1, N),
    "task": [prompt]}``. Keys the map does not mention are ignored (clients often send extras).
    ``check_prompt(key, prompt)`` may add a check of its own (the server's token limit). Everything is
    validated before any image is resized, so a bad request costs no resize. Raises
    :class:`ObservationError` naming the first wrong key.
    """
    if not isinstance(obs, dict):
        raise ObservationError(f"a request must be a msgpack map of observations, got {type(obs).__name__}")
    # openpi clients send str keys; accept bytes keys too but never let a non-string key through.
    obs = {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in obs.items()}
    missing = [k for k in obs_map.required if k not in obs]
    if obs_map.prompt not in obs:
        missing.append(obs_map.prompt)
    if obs_map.state is not None and obs_map.state_required and obs_map.state not in obs:
        missing.append(obs_map.state)
    if missing:
        have = [k[:60] for k in sorted(map(str, obs))[:20]]  # bounded: keys come from the client
        raise ObservationError(f"missing keys {missing}; the request has {have}")
    images = {camera: _image(key, obs[key]) for key, camera in obs_map.images.items() if key in obs}
    state = None
    if obs_map.state is not None and obs_map.state in obs:
        state = torch.from_numpy(_state(obs_map.state, obs[obs_map.state], state_dim))[None]
    prompt = _prompt(obs_map.prompt, obs[obs_map.prompt])
    if check_prompt is not None:
        check_prompt(obs_map.prompt, prompt)
    batch: dict[str, Any] = {
        image_key(camera): resize_image(img, image_size, obs_map.resize).unsqueeze(0)
        for camera, img in images.items()
    }
    if state is not None:
        batch[STATE_KEY] = state
    batch["task"] = [prompt]
    return batch


def state_dim_from_metadata(metadata: dict[str, Any] | None) -> int | None:
    """The proprio state length recorded with the checkpoint, if any.

    Looks at ``state_dim``, then at the dataset feature named by ``state_key`` (default
    ``observation.state``) in ``features``, in either form: a plain shape list (what training writes,
    ``{"observation.state": [4]}``) or a LeRobot feature (``{"observation.state": {"shape": [4], ...}}``).
    """
    if not isinstance(metadata, dict):
        return None
    dim = metadata.get("state_dim")
    if dim is None:
        features = metadata.get("features")
        key = metadata.get("state_key") or STATE_KEY
        feat = features.get(key) if isinstance(features, dict) and isinstance(key, str) else None
        shape = feat.get("shape") if isinstance(feat, dict) else feat
        dim = shape[0] if isinstance(shape, (list, tuple)) and len(shape) == 1 else None
    return dim if type(dim) is int and 0 < dim <= MAX_STATE_DIM else None


def state_dim_of(config: Any, metadata: dict[str, Any] | None) -> int | None:
    """The state length the server enforces: the config's ``state_dim`` when the model reads the state
    (it cannot take any other length), else what the checkpoint's metadata records (the length the
    robot sent during training), else ``None`` (any length)."""
    dim = getattr(config, "state_dim", 0)
    return dim if isinstance(dim, int) and dim > 0 else state_dim_from_metadata(metadata)


__all__ = [
    "ObservationError",
    "ObservationMap",
    "observation_to_batch",
    "resize_image",
    "state_dim_from_metadata",
    "state_dim_of",
]
