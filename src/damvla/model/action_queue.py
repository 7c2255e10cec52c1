"""Turning predicted chunks into one action per control step (``select_action``).

- ``chunk``: execute the first n actions of each chunk, then predict again.
- ``adaptive_ensemble`` (CogACT): predict every step; average the current step's predictions from the
  last K chunks with weights exp(alpha * cos_sim(a_i, a_newest)).
- ``temporal_ensemble`` (ACT): predict every step; weights exp(-m * i), i = 0 for the oldest prediction.
The gripper dimension is re-binarised (>= 0.5 -> 1) after averaging.
"""

from __future__ import annotations

from collections import deque

import torch

from damvla.config import InferenceConfig


class ActionQueue:
    def __init__(self, cfg: InferenceConfig, horizon: int, gripper_index: int | None) -> None:
        self.cfg, self.horizon, self.gripper_index = cfg, horizon, gripper_index
        self.reset()

    def reset(self) -> None:
        self._queue: deque[torch.Tensor] = deque()  # chunk mode: (B, D) actions
        self._history: deque[torch.Tensor] = deque(maxlen=min(self.cfg.ensemble_horizon, self.horizon))

    def needs_chunk(self) -> bool:
        return self.cfg.execution != "chunk" or not self._queue

    def push(self, chunk: torch.Tensor) -> None:
        """chunk: (B, H, D) un-normalised actions predicted at the current step."""
        if self.cfg.execution == "chunk":
            for i in range(self.cfg.execute_steps):
                self._queue.append(chunk[:, i])
        else:
            self._history.append(chunk)

    def pop(self) -> torch.Tensor:
        """The action for the current step, (B, D)."""
        if self.cfg.execution == "chunk":
            if not self._queue:
                raise RuntimeError("action queue is empty: push a chunk first")
            return self._queue.popleft()
        if not self._history:
            raise RuntimeError("no chunk predicted yet: push a chunk first")
        # The chunk predicted i steps ago holds the current step at index i; newest last in history.
        n = len(self._history)
        preds = torch.stack([c[:, n - 1 - i] for i, c in enumerate(self._history)], dim=1)  # (B, n, D) oldest first
        if self.cfg.execution == "adaptive_ensemble":
            newest = preds[:, -1:]
            sim = torch.nn.functional.cosine_similarity(preds, newest, dim=-1)  # (B, n)
            w = torch.exp(self.cfg.adaptive_alpha * sim)
        else:
            w = torch.exp(-self.cfg.temporal_decay * torch.arange(n, dtype=preds.dtype, device=preds.device))
            w = w[None].expand(preds.shape[0], n)
        w = w / w.sum(dim=1, keepdim=True)
        action = (w[..., None] * preds).sum(dim=1)
        if self.gripper_index is not None:
            g = self.gripper_index
            action[:, g] = (action[:, g] >= 0.5).to(action.dtype)
        return action
