"""The action router (METHOD.md §1): reads a VLM latent, outputs the gripper-head weight w in (0, 1)."""

from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Linear -> LayerNorm -> Linear(-> 1). ``forward`` returns the logit; sigmoid(logit) = w, and
    w >= 0.5 routes a sample to the gripper head."""

    def __init__(self, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(latent_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # (B, latent_dim) -> (B,) logits
        return self.fc2(self.norm(self.fc1(latent))).squeeze(-1)
