"""Phase labels for evaluation plots.

- ``executed_labels``: the routing label (0 arm, 1 gripper) of each step of an episode as executed,
  from the gripper commands the policy sent (the same ``damvla.weighting.routing_labels`` that makes the
  training labels from demonstrations).
- ``ExpertReplay``: the scripted expert replayed from an episode's initial state (no rendering), giving
  the labels a demonstration of that exact start would have had: what the router was trained to imitate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from damvla.envs.base import GRIPPER_INDEX, InitialState
from damvla.weighting import routing_labels


def executed_labels(
    gripper: np.ndarray | list[float], sigma_lead: float = 6.0, sigma_trail: float = 2.0
) -> np.ndarray:
    """(T,) binarised gripper commands -> (T,) int64 routing labels (all 0 for an empty episode)."""
    g = np.asarray(gripper, dtype=np.float64)
    if g.size == 0:
        return np.zeros(0, dtype=np.int64)
    return routing_labels(g, sigma_lead=sigma_lead, sigma_trail=sigma_trail)


class ExpertReplay:
    """Replays the scripted expert of Meta-World episodes without rendering; envs cached per task."""

    def __init__(self, max_steps: int | None = None) -> None:
        self.max_steps = max_steps
        self._envs: dict[str, Any] = {}

    def gripper_commands(self, state: InitialState, stop_on_success: bool = True) -> tuple[np.ndarray, bool]:
        """The expert's binarised gripper command per step from ``state``, and whether it succeeded."""
        if state.simulator != "metaworld_v3":
            raise ValueError(f"expert replay: no scripted expert for simulator {state.simulator!r}")
        from damvla.envs.metaworld import MetaWorldEnv, MetaWorldExpert

        if state.task not in self._envs:
            self._envs[state.task] = (
                MetaWorldEnv(state.task, max_steps=self.max_steps, render=False),
                MetaWorldExpert(state.task),
            )
        env, expert = self._envs[state.task]
        obs = env.reset(state)
        grip: list[float] = []
        success = done = False
        while not done and not (success and stop_on_success):
            a = expert.act(obs)
            grip.append(float(a[GRIPPER_INDEX]))
            obs, _, done, info = env.step(a)
            success = success or bool(info["success"])
        return np.asarray(grip, dtype=np.float64), success

    def close(self) -> None:
        for env, _ in self._envs.values():
            env.close()
        self._envs.clear()
