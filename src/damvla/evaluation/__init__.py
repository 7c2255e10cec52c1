"""Closed-loop evaluation (``damvla eval``), split by concern:

- ``executors``: policy callables for the rollout harness (a checkpoint with one action queue per env
  slot and per-episode noise, the scripted expert, a uniform random policy), each logging per step what
  the policy did (router weight, head, gripper command) and how long it took;
- ``stats``: Wilson score intervals and per-task / overall summaries;
- ``phases``: phase labels (routing labels from gripper commands; a scripted-expert replay);
- ``video``: mp4 videos with the router weight and gripper command drawn on the frames;
- ``plots``: per-episode router weight vs. phase label figures;
- ``report``: ``results.json``, ``report.md`` and the marked sections of ``docs/results.md``.

``damvla.evaluate`` ties them together behind the command line. Nothing here imports MuJoCo at module
import time.
"""
