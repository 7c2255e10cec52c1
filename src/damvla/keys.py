"""The LeRobot feature keys damvla reads and writes (docs/CONTRACTS.md), named once.

A dataset, the rollout batch and the policy server all speak these names; a module that spells one out
itself drifts from the others the first time a name changes."""

from __future__ import annotations

ACTION_KEY = "action"
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"  # LeRobot's name for the simulator's object state
IMAGE_KEY_PREFIX = "observation.images."
# The first camera of every dataset damvla collects and of the rollout batch, whatever the simulator calls it.
MAIN_CAMERA = "image"
MAIN_IMAGE_KEY = IMAGE_KEY_PREFIX + MAIN_CAMERA


def image_key(camera: str) -> str:
    """``observation.images.<camera>``; a key that already carries the prefix is returned as it is."""
    return camera if camera.startswith(IMAGE_KEY_PREFIX) else IMAGE_KEY_PREFIX + camera


def camera_name(key: str) -> str:
    """``observation.images.front`` -> ``front`` (the name an override such as ``vision.camera=`` takes)."""
    return key.removeprefix(IMAGE_KEY_PREFIX)
