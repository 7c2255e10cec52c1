"""Simulators behind one interface (``damvla.envs.base``): scripted experts, instructions, initial-state
pools, demonstration collection (``damvla collect``) and closed-loop rollouts.

Submodules are imported on demand so that importing ``damvla.envs`` does not pull in MuJoCo. Importing
it does choose MuJoCo's headless EGL backend (``MUJOCO_GL=egl``, unless the user set another), because
MuJoCo reads that variable once, when it is first imported - import ``damvla.envs`` before ``mujoco`` or
``metaworld``.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
