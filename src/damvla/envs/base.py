"""Simulator-agnostic environment interface: what the collector, the rollout harness and evaluation
rely on, so that robosuite / LIBERO / SIMPLER can be added later by implementing the same three things:

- ``Env``: ``reset(initial_state) -> obs``, ``step(action7) -> (obs, reward, done, info)``, ``instruction``;
- ``InitialState``: a JSON-able record that reproduces an episode's start exactly (a seed alone does not
  for every simulator: Meta-World's start is fixed by a sampled "random vector" of object/goal positions);
- ``ActionMapping``: our 7-D action layout <-> the simulator's native action, stored as a plain dict in the
  dataset metadata so evaluation can map a policy's output back without guessing.

Our 7-D action: ``(dx, dy, dz, droll, dpitch, dyaw, gripper)`` with the gripper binarised, 1 = open and
0 = closed (``GRIPPER_OPEN`` / ``GRIPPER_INDEX``; matches ``info["damvla"]`` in docs/CONTRACTS.md).

An observation is a dict:

| key | type / shape | meaning |
|---|---|---|
| ``image`` | uint8 (H, W, 3) | the camera image, upright (sky up, not mirrored) |
| ``state`` | float32 (S,) | proprio state (simulator-specific, names in ``Env.state_names``) |
| ``privileged`` | float (P,) | full simulator state a scripted expert reads; never a policy input |
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

ACTION_DIM = 7
ACTION_NAMES = ["x", "y", "z", "roll", "pitch", "yaw", "gripper"]
GRIPPER_INDEX = 6
GRIPPER_OPEN = 1.0  # our convention: 1 = open, 0 = closed
GRIPPER_THRESHOLD = 0.5  # a 7-D gripper value > threshold means "open"

Observation = dict[str, Any]


@dataclass(frozen=True)
class InitialState:
    """Everything needed to reproduce an episode's first state.

    ``simulator`` names the implementation (e.g. ``"metaworld_v3"``), ``task`` the task id, ``seed`` the
    seed the state was sampled from (provenance and the episode key), and ``data`` the simulator-specific,
    JSON-able values that actually fix the state (for Meta-World: ``{"rand_vec": [...]}``, the object and
    goal positions). ``reset(state)`` must not depend on anything else.
    """

    simulator: str
    task: str
    seed: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Stable episode key, e.g. ``"pick-place-v3/seed-17"`` (the dataset writer's resume key)."""
        return f"{self.task}/seed-{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InitialState:
        missing = {"simulator", "task", "seed"} - set(d)
        if missing:
            raise ValueError(f"InitialState: missing keys {sorted(missing)} in {d!r}")
        return cls(str(d["simulator"]), str(d["task"]), int(d["seed"]), dict(d.get("data", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> InitialState:
        return cls.from_dict(json.loads(s))


class ActionMapping(abc.ABC):
    """Maps our 7-D action to a simulator's native action and back.

    ``to_native(from_native(a))`` must reproduce what the simulator executes for ``a`` (up to clipping),
    and ``from_native(to_native(a7))`` must return ``a7`` for every 7-D action the simulator can express
    (axes it has no actuator for come back as 0).
    """

    @abc.abstractmethod
    def to_native(self, action7: np.ndarray) -> np.ndarray:
        """(7,) or (B, 7) float -> (N,) or (B, N) native action."""

    @abc.abstractmethod
    def from_native(self, native: np.ndarray) -> np.ndarray:
        """(N,) or (B, N) native action -> (7,) or (B, 7) float32 in our layout (gripper in {0, 1})."""

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, stored as ``info["damvla"]["action_mapping"]``; must carry ``"type"``."""


class Env(abc.ABC):
    """One task of one simulator, rendering one camera.

    Subclasses set ``simulator``, ``task``, ``instruction``, ``action_mapping``, ``state_names``,
    ``max_steps`` and ``fps``. ``done`` from ``step`` means the time limit is reached; success is
    reported separately in ``info["success"]`` (bool) because most benchmarks count an episode as solved
    the first time it succeeds, and the caller decides whether to stop there.
    """

    simulator: str
    task: str
    instruction: str
    action_mapping: ActionMapping
    state_names: list[str]
    max_steps: int
    fps: float

    @abc.abstractmethod
    def sample_initial_state(self, seed: int) -> InitialState:
        """Deterministically draw the initial state of ``seed`` (same seed -> same state, any process)."""

    @abc.abstractmethod
    def reset(self, initial_state: InitialState) -> Observation:
        """Put the simulator exactly into ``initial_state`` and return the first observation."""

    @abc.abstractmethod
    def step(self, action7: np.ndarray) -> tuple[Observation, float, bool, dict[str, Any]]:
        """Apply one (7,) action in our layout; returns ``(obs, reward, done, info)`` with
        ``info["success"]`` a bool. Optionally ``info["milestones"]``: {name: bool} task-progress flags of
        this step, in task order (e.g. reached the object, grasped it); evaluation reports how many
        episodes got at least that far, which says in which phase a policy fails. Optionally
        ``info["goal_distance"]``: the distance [m] between the task's object and its goal at this step;
        evaluation reports how close failed episodes came (a near miss and a policy that never carried the
        object fail differently). Optionally ``info["goal_offset"]``: object minus goal [m], xyz, whose norm is
        that distance: which way failed episodes miss. Optionally ``info["hand_offset"]``: the hand minus the
        task's object [m], xyz: where a policy that never reaches the object goes instead."""

    def close(self) -> None:  # noqa: B027 - optional hook, most simulators need nothing
        """Release renderer / simulator resources."""

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def binarize_gripper(value: np.ndarray | float, threshold: float = GRIPPER_THRESHOLD) -> np.ndarray:
    """Our gripper value(s) -> {0., 1.} (1 = open) with ``value > threshold`` meaning open."""
    return (np.asarray(value, dtype=np.float64) > threshold).astype(np.float32)
