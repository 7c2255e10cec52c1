"""SIMPLER's evaluation protocols as data: every episode of the paper tables, one initial state each.

The grids are those of the SimplerEnv / CogACT evaluation scripts (``scripts/*_visual_matching.sh``,
``*_variant_agg.sh``, ``*_bridge.sh``): which env, scene, robot pose, object pose or episode id, RGB
overlay and build keyword arguments each episode uses. ``--suite simpler:NAME`` runs a named suite; each of
its tasks is one column of the paper table, and the table's average is the unweighted mean of the columns
(``damvla.evaluation.stats.summarize``).

| suite | paper table | tasks (episodes) |
|---|---|---|
| ``google_vm`` | Google robot, visual matching | pick coke can (300), move near (240), open/close drawer (216), open top drawer and place apple (108) |
| ``google_va`` | Google robot, variant aggregation | pick coke can (825), move near (600), open/close drawer (378), open top drawer and place apple (189) |
| ``widowx`` | WidowX (Bridge), visual matching | spoon on towel, carrot on plate, stack cube, eggplant in basket (24 each) |

Robot orientations are stored as the quaternion the scripts compute, ``euler2quat(r, p, y) * (0, 0, 0, 1)``
(w, x, y, z; a yaw about z applied to the robot's base orientation), so a state replays without SimplerEnv's
argument parser.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

GOOGLE = {"robot": "google_robot_static", "control_freq": 3, "sim_freq": 513}
WIDOWX = {"control_freq": 5, "sim_freq": 500, "max_episode_steps": 120}
URDF_VM = [
    None,
    "recolor_tabletop_visual_matching_1",
    "recolor_tabletop_visual_matching_2",
    "recolor_cabinet_visual_matching_1",
]
COKE_CAN_ORIENTATIONS = [{"lr_switch": True}, {"upright": True}, {"laid_vertically": True}]
DRAWER_ENVS = [
    "OpenTopDrawerCustomInScene-v0",
    "OpenMiddleDrawerCustomInScene-v0",
    "OpenBottomDrawerCustomInScene-v0",
    "CloseTopDrawerCustomInScene-v0",
    "CloseMiddleDrawerCustomInScene-v0",
    "CloseBottomDrawerCustomInScene-v0",
]
# Visual matching drawer overlays: (overlay id, robot x, robot y, robot yaw).
DRAWER_VM_POSES = [
    ("a0", 0.644, -0.179, -0.03),
    ("a1", 0.765, -0.182, -0.02),
    ("a2", 0.889, -0.203, -0.06),
    ("b0", 0.652, 0.009, 0.0),
    ("b1", 0.752, 0.009, 0.0),
    ("b2", 0.851, 0.035, 0.0),
    ("c0", 0.665, 0.224, 0.0),
    ("c1", 0.765, 0.222, -0.025),
    ("c2", 0.865, 0.222, -0.025),
]
DRAWER_VM_KWARGS = {
    "station_name": "mk_station_recolor",
    "light_mode": "simple",
    "disable_bad_material": True,
}


def linspace(lo: float, hi: float, n: int) -> list[float]:
    """SimplerEnv's ``--*-range LO HI N``: ``np.linspace(LO, HI, N)`` as Python floats."""
    return [float(v) for v in np.linspace(lo, hi, int(n))]


def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (w, x, y, z) quaternions."""
    w1, x1, y1, z1 = a
    w2, x2, y2, z2 = b
    return np.array(
        [
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
        ]
    )


def euler_to_quat(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Static-frame x-y-z Euler angles (transforms3d's default ``sxyz``: R = Rz(yaw) Ry(pitch) Rx(roll))
    -> (w, x, y, z)."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    return np.array(
        [
            cr * cp * cy + sr * sp * sy,
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
        ]
    )


def robot_quat(
    yaw: float, roll: float = 0.0, pitch: float = 0.0, center: tuple[float, ...] = (0, 0, 0, 1)
) -> list[float]:
    """The scripts' robot orientation: ``(Pose(q=euler2quat(r, p, y)) * Pose(q=center)).q``."""
    return [float(v) for v in quat_mul(euler_to_quat(roll, pitch, yaw), np.asarray(center, dtype=np.float64))]


@dataclass(frozen=True)
class Episode:
    """One protocol episode: what ``InitialState.data`` holds for it."""

    env_name: str
    kwargs: dict[str, Any]
    options: dict[str, Any]
    variant: str  # the table row / block it belongs to (e.g. "urdf=recolor_cabinet_visual_matching_1")

    def data(self, robot_kind: str) -> dict[str, Any]:
        return {
            "env_name": self.env_name,
            "kwargs": {k: v for k, v in self.kwargs.items()},
            "options": self.options,
            "reset_seed": None,
            "prepackaged": False,
            "robot_kind": robot_kind,
            "variant": self.variant,
        }


def _grid(
    env_name: str,
    kwargs: dict[str, Any],
    robot_xs: list[float],
    robot_ys: list[float],
    yaws: list[float],
    variant: str,
    obj_xs: list[float] | None = None,
    obj_ys: list[float] | None = None,
    obj_episodes: range | None = None,
) -> list[Episode]:
    """The evaluator's loop order: robot x, robot y, robot orientation, then object x, y (or episode id)."""
    out = []
    for rx in robot_xs:
        for ry in robot_ys:
            for yaw in yaws:
                robot = {"init_xy": [rx, ry], "init_rot_quat": robot_quat(yaw)}
                if obj_episodes is not None:
                    objs = [{"episode_id": int(e)} for e in obj_episodes]
                else:
                    assert obj_xs is not None and obj_ys is not None
                    objs = [{"init_xy": [ox, oy]} for ox in obj_xs for oy in obj_ys]
                for obj in objs:
                    out.append(
                        Episode(
                            env_name,
                            dict(kwargs),
                            {"robot_init_options": robot, "obj_init_options": obj},
                            variant,
                        )
                    )
    return out


def _urdf(v: str | None) -> dict[str, Any]:
    return {"urdf_version": v}


# ---- Google robot, visual matching ---------------------------------------------------------------
def google_vm_pick_coke_can() -> list[Episode]:
    out = []
    for urdf in URDF_VM:
        for orient in COKE_CAN_ORIENTATIONS:
            kw = {**GOOGLE, "max_episode_steps": 80, "scene_name": "google_pick_coke_can_1_v4",
                  "rgb_overlay": "google_coke_can_real_eval_1.png", **orient, **_urdf(urdf)}  # fmt: skip
            out += _grid("GraspSingleOpenedCokeCanInScene-v0", kw, [0.35], [0.20], [0.0], f"urdf={urdf} {orient}",
                         linspace(-0.35, -0.12, 5), linspace(-0.02, 0.42, 5))  # fmt: skip
    return out


def google_vm_move_near() -> list[Episode]:
    out = []
    for urdf in URDF_VM:
        kw = {**GOOGLE, "max_episode_steps": 80, "scene_name": "google_pick_coke_can_1_v4",
              "rgb_overlay": "google_move_near_real_eval_1.png", **_urdf(urdf)}  # fmt: skip
        out += _grid("MoveNearGoogleBakedTexInScene-v0", kw, [0.35], [0.21], [-0.09], f"urdf={urdf}",
                     obj_episodes=range(0, 60))  # fmt: skip
    return out


# Visual-matching drawer scenes: the cabinet re-coloured three ways, and the plain one (None).
DRAWER_VM_URDFS = [
    "recolor_cabinet_visual_matching_1",
    "recolor_tabletop_visual_matching_1",
    "recolor_tabletop_visual_matching_2",
    None,
]


def google_vm_drawer() -> list[Episode]:
    out = []
    for urdf in DRAWER_VM_URDFS:
        for env_name in DRAWER_ENVS:
            for overlay, x, y, yaw in DRAWER_VM_POSES:
                kw = {**GOOGLE, "max_episode_steps": 113, "scene_name": "dummy_drawer", "shader_dir": "rt",
                      **DRAWER_VM_KWARGS, **_urdf(urdf), "rgb_overlay": f"open_drawer_{overlay}.png"}  # fmt: skip
                out += _grid(env_name, kw, [x], [y], [yaw], f"urdf={urdf}", [0.0], [0.0])
    return out


def google_vm_put_in_drawer() -> list[Episode]:
    out = []
    for urdf in DRAWER_VM_URDFS:
        for overlay, x, y, yaw in [DRAWER_VM_POSES[0], DRAWER_VM_POSES[3], DRAWER_VM_POSES[6]]:
            kw = {**GOOGLE, "max_episode_steps": 200, "scene_name": "dummy_drawer", "shader_dir": "rt",
                  **DRAWER_VM_KWARGS, **_urdf(urdf), "model_ids": "baked_apple_v2",
                  "rgb_overlay": f"open_drawer_{overlay}.png"}  # fmt: skip
            out += _grid("PlaceIntoClosedTopDrawerCustomInScene-v0", kw, [x], [y], [yaw], f"urdf={urdf}",
                         linspace(-0.08, -0.02, 3), linspace(-0.02, 0.08, 3))  # fmt: skip
    return out


# ---- Google robot, variant aggregation -----------------------------------------------------------
def google_va_pick_coke_can() -> list[Episode]:
    base = {**GOOGLE, "max_episode_steps": 80, "scene_name": "google_pick_coke_can_1_v4"}
    blocks: list[tuple[str, str, dict[str, Any]]] = [("GraspSingleOpenedCokeCanInScene-v0", "base", {})]
    for scene in ["Baked_sc1_staging_objaverse_cabinet1_h870", "Baked_sc1_staging_objaverse_cabinet2_h870"]:
        blocks.append(("GraspSingleOpenedCokeCanInScene-v0", f"table={scene}", {"scene_name": scene}))
    blocks.append(("GraspSingleOpenedCokeCanDistractorInScene-v0", "distractors", {}))
    blocks.append(
        ("GraspSingleOpenedCokeCanDistractorInScene-v0", "more distractors", {"distractor_config": "more"})
    )
    for scene in ["google_pick_coke_can_1_v4_alt_background", "google_pick_coke_can_1_v4_alt_background_2"]:
        blocks.append(("GraspSingleOpenedCokeCanInScene-v0", f"background={scene}", {"scene_name": scene}))
    blocks.append(("GraspSingleOpenedCokeCanInScene-v0", "darker", {"slightly_darker_lighting": True}))
    blocks.append(("GraspSingleOpenedCokeCanInScene-v0", "brighter", {"slightly_brighter_lighting": True}))
    for env_name in [
        "GraspSingleOpenedCokeCanAltGoogleCameraInScene-v0",
        "GraspSingleOpenedCokeCanAltGoogleCamera2InScene-v0",
    ]:
        blocks.append((env_name, f"camera={env_name}", {}))
    out = []
    for env_name, variant, extra in blocks:
        for orient in COKE_CAN_ORIENTATIONS:
            out += _grid(env_name, {**base, **extra, **orient}, [0.35], [0.20], [0.0], f"{variant} {orient}",
                         linspace(-0.35, -0.12, 5), linspace(-0.02, 0.42, 5))  # fmt: skip
    return out


def google_va_move_near() -> list[Episode]:
    base = {**GOOGLE, "max_episode_steps": 80, "scene_name": "google_pick_coke_can_1_v4"}
    blocks: list[tuple[str, str, dict[str, Any]]] = [
        ("MoveNearGoogleInScene-v0", "base", {}),
        ("MoveNearGoogleInScene-v0", "no distractors", {"no_distractor": True}),
    ]
    for scene in ["google_pick_coke_can_1_v4_alt_background", "google_pick_coke_can_1_v4_alt_background_2"]:
        blocks.append(("MoveNearGoogleInScene-v0", f"background={scene}", {"scene_name": scene}))
    blocks.append(("MoveNearGoogleInScene-v0", "darker", {"slightly_darker_lighting": True}))
    blocks.append(("MoveNearGoogleInScene-v0", "brighter", {"slightly_brighter_lighting": True}))
    for scene in ["Baked_sc1_staging_objaverse_cabinet1_h870", "Baked_sc1_staging_objaverse_cabinet2_h870"]:
        blocks.append(("MoveNearGoogleInScene-v0", f"table={scene}", {"scene_name": scene}))
    for env_name in ["MoveNearAltGoogleCameraInScene-v0", "MoveNearAltGoogleCamera2InScene-v0"]:
        blocks.append((env_name, f"camera={env_name}", {}))
    out = []
    for env_name, variant, extra in blocks:
        out += _grid(env_name, {**base, **extra}, [0.35], [0.21], [-0.09], variant, obj_episodes=range(0, 60))
    return out


def _drawer_va_blocks(extra: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The six variant-aggregation drawer blocks plus the base scene; all ray-traced."""
    blocks = [("base", {"scene_name": "frl_apartment_stage_simple", "shader_dir": "rt"})]
    for scene in ["modern_bedroom_no_roof", "modern_office_no_roof"]:
        blocks.append((f"background={scene}", {"scene_name": scene, "shader_dir": "rt"}))
    for light in ["brighter", "darker"]:
        blocks.append(
            (
                f"light={light}",
                {"scene_name": "frl_apartment_stage_simple", "shader_dir": "rt", "light_mode": light},
            )
        )
    for station in ["mk_station2", "mk_station3"]:
        blocks.append(
            (
                f"cabinet={station}",
                {"scene_name": "frl_apartment_stage_simple", "shader_dir": "rt", "station_name": station},
            )
        )
    return [(v, {**kw, **extra}) for v, kw in blocks]


def google_va_drawer() -> list[Episode]:
    out = []
    for variant, extra in _drawer_va_blocks({}):
        for env_name in DRAWER_ENVS:
            kw = {**GOOGLE, "max_episode_steps": 113, **extra}
            out += _grid(
                env_name, kw, linspace(0.65, 0.85, 3), linspace(-0.2, 0.2, 3), [0.0], variant, [0.0], [0.0]
            )
    return out


def google_va_put_in_drawer() -> list[Episode]:
    out = []
    for variant, extra in _drawer_va_blocks({"model_ids": "apple"}):
        kw = {**GOOGLE, "max_episode_steps": 200, **extra}
        out += _grid("PlaceIntoClosedTopDrawerCustomInScene-v0", kw, [0.65], linspace(-0.2, 0.2, 3), [0.0], variant,
                     linspace(-0.08, -0.02, 3), linspace(-0.02, 0.08, 3))  # fmt: skip
    return out


# ---- WidowX (Bridge) -----------------------------------------------------------------------------
def _widowx(env_name: str, sink: bool) -> list[Episode]:
    if sink:
        kw = {
            **WIDOWX,
            "robot": "widowx_sink_camera_setup",
            "scene_name": "bridge_table_1_v2",
            "rgb_overlay": "bridge_sink.png",
        }
        x, y = 0.127, 0.06
    else:
        kw = {
            **WIDOWX,
            "robot": "widowx",
            "scene_name": "bridge_table_1_v1",
            "rgb_overlay": "bridge_real_eval_1.png",
        }
        x, y = 0.147, 0.028
    return _grid(env_name, kw, [x], [y], [0.0], "visual matching", obj_episodes=range(0, 24))


# Named suites: suite -> {task (a table column): (robot kind, episode builder)}, in table order.
NAMED_SUITES: dict[str, dict[str, tuple[str, Any]]] = {
    "google_vm": {
        "google_vm_pick_coke_can": ("google_robot", google_vm_pick_coke_can),
        "google_vm_move_near": ("google_robot", google_vm_move_near),
        "google_vm_drawer": ("google_robot", google_vm_drawer),
        "google_vm_put_in_drawer": ("google_robot", google_vm_put_in_drawer),
    },
    "google_va": {
        "google_va_pick_coke_can": ("google_robot", google_va_pick_coke_can),
        "google_va_move_near": ("google_robot", google_va_move_near),
        "google_va_drawer": ("google_robot", google_va_drawer),
        "google_va_put_in_drawer": ("google_robot", google_va_put_in_drawer),
    },
    "widowx": {
        "widowx_vm_spoon_on_towel": ("widowx", lambda: _widowx("PutSpoonOnTableClothInScene-v0", False)),
        "widowx_vm_carrot_on_plate": ("widowx", lambda: _widowx("PutCarrotOnPlateInScene-v0", False)),
        "widowx_vm_stack_cube": (
            "widowx",
            lambda: _widowx("StackGreenCubeOnYellowCubeBakedTexInScene-v0", False),
        ),
        "widowx_vm_eggplant_in_basket": ("widowx", lambda: _widowx("PutEggplantInBasketScene-v0", True)),
    },
}
SUITE_ALIASES = {
    "google_visual_matching": "google_vm",
    "google_variant_aggregation": "google_va",
    "bridge": "widowx",
    "widowx_vm": "widowx",
}
PROTOCOL_TASKS: dict[str, tuple[str, Any]] = {
    t: v for suite in NAMED_SUITES.values() for t, v in suite.items()
}

# The paper table each named suite reproduces, with the averages the DAM-VLA paper reports.
PAPER_TABLE = {
    "google_vm": "SIMPLER Google robot, visual matching (paper: DAM-VLA 83%, CogACT 72%)",
    "google_va": "SIMPLER Google robot, variant aggregation (paper: DAM-VLA 81%, CogACT 62%)",
    "widowx": "SIMPLER WidowX, visual matching (paper: DAM-VLA 71%, CogACT 52%)",
}
