"""Action normalisation that travels with the checkpoint (CogACT's q01/q99 scheme).

normalise:   clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)   for normalised dimensions
             0                                                  for near-constant dimensions
             x                                                  for excluded ones (the gripper)
unnormalise: the inverse on [-1, 1]; a near-constant dimension comes back as its constant.
Works on numpy arrays and torch tensors alike (last axis = action dimension).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EPS = 1e-8
CONSTANT_RANGE = 1e-6  # q99 - q01 below this: the dimension carries no signal


@dataclass
class ActionNormalizer:
    q01: np.ndarray  # (D,)
    q99: np.ndarray  # (D,)
    normalize: np.ndarray  # (D,) bool; False for dimensions kept as they are (gripper)

    def __post_init__(self) -> None:
        self.q01 = np.asarray(self.q01, dtype=np.float64).reshape(-1)
        self.q99 = np.asarray(self.q99, dtype=np.float64).reshape(-1)
        self.normalize = np.asarray(self.normalize, dtype=bool).reshape(-1)
        d = {len(self.q01), len(self.q99), len(self.normalize)}
        if len(d) != 1:
            raise ValueError(f"ActionNormalizer: q01/q99/normalize lengths differ: {sorted(d)}")
        if not (np.all(np.isfinite(self.q01)) and np.all(np.isfinite(self.q99))):
            raise ValueError("ActionNormalizer: q01/q99 hold NaN or inf")
        if np.any(self.q99 < self.q01):
            raise ValueError(f"ActionNormalizer: q99 < q01 in dimensions {np.flatnonzero(self.q99 < self.q01).tolist()}")

    @property
    def dim(self) -> int:
        return len(self.q01)

    @property
    def constant(self) -> np.ndarray:
        return self.normalize & ((self.q99 - self.q01) < CONSTANT_RANGE)

    @classmethod
    def from_stats(cls, stats: dict[str, Any], exclude: list[int] | tuple[int, ...] = ()) -> ActionNormalizer:
        """From a LeRobot ``stats.json`` entry (needs q01 and q99) and the dimensions left unnormalised."""
        for key in ("q01", "q99"):
            if key not in stats:
                raise ValueError(f"action stats lack {key!r} (have {sorted(stats)}); recompute the dataset stats")
        q01 = np.asarray(stats["q01"], dtype=np.float64).reshape(-1)
        mask = np.ones(len(q01), dtype=bool)
        for i in exclude:
            if not 0 <= i < len(q01):
                raise ValueError(f"excluded dimension {i} outside action dimension {len(q01)}")
            mask[i] = False
        return cls(q01, stats["q99"], mask)

    @classmethod
    def identity(cls, dim: int) -> ActionNormalizer:
        return cls(-np.ones(dim), np.ones(dim), np.zeros(dim, dtype=bool))

    def _check(self, x: Any) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(f"action last dimension {x.shape[-1]} != normaliser dimension {self.dim}")

    def _consts(self, x: Any) -> tuple[Any, Any, Any, Any]:
        if isinstance(x, np.ndarray):
            return self.q01, self.q99, self.normalize & ~self.constant, self.constant
        import torch

        kw = {"dtype": x.dtype if x.is_floating_point() else torch.float32, "device": x.device}
        return (
            torch.as_tensor(self.q01, **kw),
            torch.as_tensor(self.q99, **kw),
            torch.as_tensor(self.normalize & ~self.constant, device=x.device),
            torch.as_tensor(self.constant, device=x.device),
        )

    def normalize_actions(self, x: Any) -> Any:
        self._check(x)
        q01, q99, scaled, const = self._consts(x)
        y = 2 * (x - q01) / (q99 - q01 + EPS) - 1
        y = y.clip(-1, 1)
        out = _where(scaled, y, x)
        return _where(const, out * 0, out)

    def unnormalize_actions(self, y: Any) -> Any:
        self._check(y)
        q01, q99, scaled, const = self._consts(y)
        x = (y.clip(-1, 1) + 1) / 2 * (q99 - q01) + q01
        out = _where(scaled, x, y)
        return _where(const, out * 0 + q01, out)

    def to_dict(self) -> dict[str, Any]:
        return {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "normalize": self.normalize.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActionNormalizer:
        missing = {"q01", "q99", "normalize"} - set(d)
        if missing:
            raise ValueError(f"normaliser entry lacks {sorted(missing)}")
        return cls(d["q01"], d["q99"], d["normalize"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"action": self.to_dict()}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ActionNormalizer:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read normalisation stats ({e})") from e
        if "action" not in d:
            raise ValueError(f"{p}: no 'action' entry (have {sorted(d)})")
        return cls.from_dict(d["action"])


def _where(mask: Any, a: Any, b: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.where(mask, a, b)
    import torch

    return torch.where(mask, a, b)
