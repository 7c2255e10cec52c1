"""Data: LeRobot v3.0 reading/writing, statistics, and the training dataset.

- ``LeRobotWriter`` / ``LeRobotDatasetReader`` (``damvla.data.lerobot``): native v3.0 folders, crash-safe writes;
- ``PolicyDataset`` (``damvla.data.dataset``): samples with the keys of docs/CONTRACTS.md;
- ``damvla.data.stats``: LeRobot-style feature statistics;
- ``damvla.data.check``: the ``damvla data check DIR`` command.

Submodules import torch/av lazily where they can; ``PolicyDataset`` is imported on first use.
"""

from __future__ import annotations

from typing import Any

from damvla.data.lerobot import DatasetError, LeRobotDatasetReader, LeRobotWriter

__all__ = ["DatasetError", "LeRobotDatasetReader", "LeRobotWriter", "PolicyDataset", "EpisodeBlockSampler"]


def __getattr__(name: str) -> Any:
    # PolicyDataset pulls in torch; the writer (used by the collector) should not have to.
    if name in ("PolicyDataset", "EpisodeBlockSampler"):
        from damvla.data import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'damvla.data' has no attribute {name!r}")
