"""What ``damvla eval --suite simpler:...`` does differently from Meta-World (docs/simpler.md).

- One robot per run: the Google robot and WidowX differ in ensemble horizon, gripper and control rate.
- A checkpoint's execution defaults to CogACT's SIMPLER setting, the adaptive ensemble with K = 2 (Google)
  or 7 (WidowX) and alpha = 0.1, unless ``--execution`` / ``--ensemble-horizon`` say otherwise; the averaged
  gripper value reaches the sticky gripper / WidowX threshold un-thresholded, as in CogACT.
- No scripted expert and no training-seed check (SIMPLER policies are trained on real-robot data).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from damvla.config import InferenceConfig

VIDEO_FPS = 5  # SimplerEnv writes its videos at 5 fps (the Google robot runs at 3 Hz, WidowX at 5 Hz)
CAMERAS = {"google_robot": "overhead_camera", "widowx": "3rd_view_camera"}


def suite_robot(tasks: list[str]) -> str:
    """The one robot of ``tasks``; raises when a suite mixes robots."""
    from damvla.envs.simpler import robot_of_task

    robots = {t: robot_of_task(t) for t in tasks}
    kinds = sorted(set(robots.values()))
    if len(kinds) != 1:
        raise ValueError(
            f"a SIMPLER suite must use one robot (ensemble horizon, gripper and control rate differ); "
            f"got {robots}: run the Google robot and WidowX tasks separately"
        )
    return kinds[0]


def check_options(opts: Any) -> None:
    """Refuse what SIMPLER cannot do, before anything starts."""
    if opts.policy == "expert":
        raise ValueError(
            "--policy expert: SIMPLER has no scripted expert; use a checkpoint or --policy random"
        )
    if opts.camera is not None:
        raise ValueError(
            f"--camera {opts.camera!r}: SIMPLER evaluates on the robot's own camera (Google robot: "
            "overhead_camera, WidowX: 3rd_view_camera); --camera cannot change it"
        )


def check_checkpoint(policy: Any, robot: str) -> dict[str, Any]:
    """Everything that must agree between a checkpoint and SIMPLER; returns notes for the report.

    The policy must output our 7-D layout in SIMPLER's units (metres and radians of end-effector deltas,
    gripper 1 = open), i.e. be trained on Fractal (Google robot) or Bridge (WidowX) actions. A
    ``damvla.action_mapping`` of another simulator in its metadata is refused; none at all (a converted
    CogACT checkpoint, a LeRobot Fractal / Bridge fine-tune) is accepted and noted."""
    from damvla.envs.base import ACTION_DIM, GRIPPER_INDEX

    cfg, meta = policy.config, policy.metadata
    where = "checkpoint config.json"
    if cfg.action_dim != ACTION_DIM:
        raise ValueError(f"{where}: action_dim={cfg.action_dim}, SIMPLER's policies act in {ACTION_DIM}-D")
    if cfg.gripper_index != GRIPPER_INDEX:
        raise ValueError(
            f"{where}: gripper_index={cfg.gripper_index}, SIMPLER's gripper is dimension {GRIPPER_INDEX}"
        )
    if getattr(cfg, "state_dim", 0):
        raise ValueError(
            f"{where}: state_dim={cfg.state_dim}: the SIMPLER adapter gives no proprio state in the training "
            "data's layout (Fractal / Bridge), only joint positions; evaluate a checkpoint without state input"
        )
    if list(getattr(cfg.vision, "extra_cameras", [])):
        raise ValueError(f"{where}: vision.extra_cameras={cfg.vision.extra_cameras}; SIMPLER renders one camera")
    keys = meta.get("camera_keys")
    if keys is not None and len(keys) != 1:
        raise ValueError(f"checkpoint metadata.json: camera_keys={keys}; SIMPLER renders one camera")
    mapping = (meta.get("damvla") or {}).get("action_mapping")
    notes: dict[str, Any] = {"camera_key": policy.image_key}
    if mapping:
        kind = mapping.get("type")
        if kind != f"simpler_{robot}":
            raise ValueError(
                f"checkpoint metadata.json: action_mapping type {kind!r} is not SIMPLER's {robot} "
                f"('simpler_{robot}'): its actions are not SIMPLER end-effector deltas"
            )
        notes["action_mapping"] = "checked"
    else:
        notes["action_mapping"] = (
            "none in the checkpoint: its actions are taken to be SIMPLER end-effector deltas in metres and "
            "radians (Fractal / Bridge convention)"
        )
    return notes


def inference_for(inference: InferenceConfig, robot: str, opts: Any) -> InferenceConfig:
    """CogACT's SIMPLER execution for ``robot``, then the command line's overrides."""
    from damvla.envs.simpler import ADAPTIVE_ALPHA, ENSEMBLE_HORIZON

    inf = replace(
        inference,
        execution="adaptive_ensemble",
        ensemble_horizon=ENSEMBLE_HORIZON[robot],
        adaptive_alpha=ADAPTIVE_ALPHA,
    )
    overrides = {
        "execution": opts.execution,
        "execute_steps": opts.execute_steps,
        "ensemble_horizon": opts.ensemble_horizon,
    }
    return replace(inf, **{k: v for k, v in overrides.items() if v is not None})


def server_versions(python: str | None) -> dict[str, Any]:
    """The SIMPLER server's ``hello``: protocol, package versions, its Python."""
    from damvla.envs.simpler import SimplerClient, simpler_python

    client = SimplerClient(simpler_python(python))
    try:
        return dict(client.hello)
    finally:
        client.close()


def report_notes(cfg: dict[str, Any]) -> list[str]:
    """Markdown paragraphs the report adds for a SIMPLER run."""
    s = cfg.get("simpler") or {}
    shader = s.get("shader")
    lines = [
        f"SIMPLER ({s.get('robot')}): {s.get('paper_table') or 'tasks ' + ', '.join(cfg.get('tasks', []))}. "
        "CogACT's conventions: Euler deltas to axis-angle, "
        + ("sticky relative gripper held 10 steps" if s.get("robot") == "google_robot" else "gripper +1 / -1")
        + f", images resized to {cfg.get('resolution')} px by area averaging; an episode runs to its time limit "
        "and counts when solved at its last step.",
        "Shader: "
        + (
            "the benchmark's own (ray-traced `rt` where the protocol asks for it)."
            if shader is None
            else f"`{shader}` instead of the protocol's; numbers are NOT comparable with the paper's "
            "(drawer tasks rely on ray-traced shadows)."
        ),
        f"Server: {s.get('server', {}).get('versions', {})}.",
    ]
    if s.get("truncated"):
        lines.append(
            "Partial protocol: "
            + ", ".join(f"{t} {n}/{m}" for t, (n, m) in s["truncated"].items())
            + " episodes."
        )
    return lines
