"""Policy callables for the rollout harness (``damvla.envs.rollout.rollout``).

Each executor is a ``policy_fn(batch) -> (B, 7)`` and also keeps, per episode (``episode_index``), what
it did at every step: the executed gripper command, the router weight and head of the chunk the action
came from, and its share of the policy's wall time. Three kinds:

- ``CheckpointExecutor``: a ``DAMVLAPolicy``; one ``ActionQueue`` per env slot (chunk execution of n
  steps, CogACT's adaptive ensemble or ACT's temporal ensemble), reset on ``episode_start``. One
  ``predict_action_chunk`` call per harness step covers every slot that needs a new chunk.
- ``ExpertExecutor``: Meta-World's scripted expert, reading the privileged simulator state (validation of
  the harness: it must reproduce the expert's known success rates).
- ``RandomExecutor``: uniform random 7-D actions (the floor).

Determinism: random draws come from a generator *per episode*, seeded from ``(seed, episode key)``. An
episode's noise therefore depends neither on which other episodes share its batch nor on worker timing,
nor on the suite it runs in; the same command gives the same episodes.
"""

from __future__ import annotations

import abc
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from damvla.config import InferenceConfig
from damvla.envs.base import ACTION_DIM, GRIPPER_INDEX, GRIPPER_THRESHOLD
from damvla.keys import MAIN_IMAGE_KEY, STATE_KEY


def episode_seed(seed: int, key: str) -> int:
    """A 63-bit seed for the episode ``key`` (e.g. ``"reach-v3/seed-1000000"``) under run seed ``seed``.

    crc32 (not ``hash``) because Python salts ``hash(str)`` per process."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(key.encode())]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1]))


@dataclass
class EpisodeLog:
    """Per-step record of one episode, as executed (index t = the action applied at step t)."""

    gripper: list[float] = field(default_factory=list)  # executed 7-D gripper command, binarised 1 = open
    router_weight: list[float] = field(default_factory=list)  # NaN where the policy has no router
    head: list[int] = field(default_factory=list)  # 0 arm, 1 gripper, -1 none
    policy_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "gripper": [float(g) for g in self.gripper],
            "router_weight": [None if np.isnan(w) else float(w) for w in self.router_weight],
            "head": [int(h) for h in self.head],
            "policy_seconds": self.policy_seconds,
        }


class Executor(abc.ABC):
    """Base class: bookkeeping shared by every policy kind. Subclasses implement ``_act``."""

    name: str = "policy"
    needs_privileged: bool = False  # the harness must put the simulator state in the batch

    def __init__(self, keys: list[str], seed: int = 0) -> None:
        """``keys``: the episode key of every spec, indexed by ``episode_index``."""
        self.keys = list(keys)
        self.seed = int(seed)
        self.logs: dict[int, EpisodeLog] = {}
        self.calls = 0  # policy forward passes (chunk predictions), for the report

    def __call__(self, batch: dict[str, Any]) -> np.ndarray:
        t0 = time.perf_counter()
        episodes = [int(i) for i in batch["episode_index"]]
        for i, start in zip(episodes, batch["episode_start"]):
            if start:
                self.logs[i] = EpisodeLog()
        actions, weights, heads = self._act(batch)
        actions = np.asarray(actions, dtype=np.float32)
        share = (time.perf_counter() - t0) / max(len(episodes), 1)  # every row advanced one step
        for row, i in enumerate(episodes):
            log = self.logs[i]
            log.gripper.append(float(actions[row, GRIPPER_INDEX] > GRIPPER_THRESHOLD))
            log.router_weight.append(float(weights[row]))
            log.head.append(int(heads[row]))
            log.policy_seconds += share
        return actions

    @abc.abstractmethod
    def _act(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> actions (B, 7) float32, router weight (B,) float (NaN: none), head (B,) int (-1: none)."""


class RandomExecutor(Executor):
    """Uniform random actions: xyz and rotation in [-1, 1], gripper in [0, 1] (binarised by the env)."""

    name = "random"

    def __init__(self, keys: list[str], seed: int = 0) -> None:
        super().__init__(keys, seed)
        self._rng: dict[int, np.random.Generator] = {}  # per slot, re-seeded per episode

    def _act(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = len(batch["slot"])
        out = np.empty((b, ACTION_DIM), dtype=np.float32)
        for row, (slot, idx, start) in enumerate(
            zip(batch["slot"], batch["episode_index"], batch["episode_start"])
        ):
            if start:
                self._rng[int(slot)] = np.random.default_rng(episode_seed(self.seed, self.keys[int(idx)]))
            rng = self._rng[int(slot)]
            out[row] = rng.uniform(-1.0, 1.0, ACTION_DIM)
            out[row, GRIPPER_INDEX] = rng.uniform(0.0, 1.0)
        return out, np.full(b, np.nan), np.full(b, -1)


class ExpertExecutor(Executor):
    """Meta-World's scripted expert for each episode's task (reads ``batch["privileged"]``)."""

    name = "expert"
    needs_privileged = True

    def __init__(self, keys: list[str], tasks: list[str], seed: int = 0) -> None:
        """``tasks``: the task of every spec, indexed like ``keys``."""
        super().__init__(keys, seed)
        from damvla.envs.metaworld import MetaWorldExpert

        self.tasks = list(tasks)
        self._experts = {t: MetaWorldExpert(t) for t in dict.fromkeys(tasks)}  # stateless: one per task

    def _act(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if "privileged" not in batch:
            raise ValueError("the expert needs batch['privileged']: run the harness with privileged=True")
        b = len(batch["slot"])
        out = np.stack(
            [
                self._experts[self.tasks[int(idx)]].act({"privileged": batch["privileged"][row]})
                for row, idx in enumerate(batch["episode_index"])
            ]
        )
        return out, np.full(b, np.nan), np.full(b, -1)


class CheckpointExecutor(Executor):
    """A ``DAMVLAPolicy`` with one action queue and one noise generator per env slot.

    Per harness step: slots at an episode start get a fresh queue and a generator seeded from
    ``(seed, episode key)``; the slots whose queue needs a chunk (chunk mode: queue empty; ensembles:
    every step) are predicted in ONE ``predict_action_chunk`` call, each row with noise drawn from its own
    episode's generator; then every slot pops its action. Images are resized from the env's resolution
    to the model's ``vision.image_size`` exactly as the dataset does (``resize_images``).
    """

    name = "checkpoint"

    def __init__(
        self,
        policy: Any,
        keys: list[str],
        seed: int = 0,
        inference: InferenceConfig | None = None,
        binarize_gripper: bool = True,
    ) -> None:
        """``policy``: a ``DAMVLAPolicy`` (eval mode is set here); ``inference`` overrides its config's.
        ``binarize_gripper=False`` passes the ensembles' averaged gripper value on un-thresholded (SIMPLER:
        CogACT's sticky gripper and WidowX threshold read the averaged value)."""
        from damvla.model.action_queue import ActionQueue

        super().__init__(keys, seed)
        self.policy = policy.eval()
        cfg = policy.config
        self.inference = inference or cfg.inference
        if self.inference.execution == "chunk" and not 1 <= self.inference.execute_steps <= cfg.horizon:
            raise ValueError(
                f"execute_steps={self.inference.execute_steps} must be in [1, horizon={cfg.horizon}]"
            )
        grip = cfg.gripper_index if binarize_gripper else None
        self._make_queue = lambda: ActionQueue(self.inference, cfg.horizon, grip)
        self._queues: dict[int, Any] = {}
        self._gens: dict[int, torch.Generator] = {}
        self._last: dict[int, tuple[float, int]] = {}  # slot -> (router weight, head) of its newest chunk
        self._instruction: dict[int, str] = {}  # slot -> the instruction its queue was filled for

    def _act(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from damvla.data.dataset import resize_images

        cfg = self.policy.config
        slots = [int(s) for s in batch["slot"]]
        for slot, idx, start in zip(slots, batch["episode_index"], batch["episode_start"]):
            if start:
                self._queues[slot] = self._make_queue()
                # CPU generator: the same noise whatever the device, and no device sync per draw.
                self._gens[slot] = torch.Generator().manual_seed(episode_seed(self.seed, self.keys[int(idx)]))
        for slot, text in zip(slots, batch["task"]):
            if self._instruction.get(slot, text) != text:
                # A new subtask's instruction (SIMPLER's long-horizon tasks): start its chunks afresh, as
                # CogACT's wrapper does; the noise generator runs on.
                self._queues[slot] = self._make_queue()
            self._instruction[slot] = text
        need = [row for row, slot in enumerate(slots) if self._queues[slot].needs_chunk()]
        if "has_image" in batch and not np.all(np.asarray(batch["has_image"])[need]):
            raise ValueError("the checkpoint policy needs rendered images: run every spec with render=True")
        if need:
            sub: dict[str, Any] = {
                STATE_KEY: torch.from_numpy(np.asarray(batch[STATE_KEY][need])),
                "task": [batch["task"][row] for row in need],
            }
            # The envs' first camera is observation.images.image whatever the policy calls it; extra cameras
            # arrive under the policy's own keys (observation.images.<name>).
            env_keys = [MAIN_IMAGE_KEY, *self.policy.image_keys[1:]]
            for key, env_key in zip(self.policy.image_keys, env_keys):
                if env_key not in batch:
                    raise ValueError(f"the envs rendered no {env_key!r}, which the policy reads as {key!r}")
                images = torch.from_numpy(np.ascontiguousarray(batch[env_key][need]))
                sub[key] = resize_images(images, cfg.vision.image_size)
            noise = torch.stack(
                [torch.randn((cfg.horizon, cfg.action_dim), generator=self._gens[slots[row]]) for row in need]
            )
            chunks, info = self.policy.predict_action_chunk(sub, noise=noise, return_info=True)
            chunks = chunks.detach().float().cpu()
            weights = info["router_weight"].detach().float().cpu()
            heads = info["head"].detach().cpu()
            self.calls += 1
            for j, row in enumerate(need):
                slot = slots[row]
                self._queues[slot].push(chunks[j : j + 1])
                # No router (CogACT ablation): the policy reports 0; NaN marks "no weight" in our logs.
                w = float(weights[j]) if self.policy.router is not None else float("nan")
                h = int(heads[j]) if self.policy.router is not None else -1
                self._last[slot] = (w, h)
        actions = torch.cat([self._queues[slot].pop() for slot in slots]).numpy()
        weights_out = np.asarray([self._last[slot][0] for slot in slots], dtype=np.float64)
        heads_out = np.asarray([self._last[slot][1] for slot in slots], dtype=np.int64)
        return actions, weights_out, heads_out
