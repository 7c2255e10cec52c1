"""A fake SIMPLER server for the tests: the real server's protocol and loop (``damvla/envs/simpler_server.py``,
loaded by path as SimplerEnv's interpreter would) around a tiny drawer / grasp world drawn with numpy.

World: a cabinet whose drawer opening ``qpos`` (metres) grows when the end-effector moves in -x (pulling)
and shrinks in +x; success as SIMPLER's drawer envs (open: ``qpos >= 0.15``, close: ``qpos <= 0.05``). Grasp
tasks report an ``is_grasped`` flag (gripper command > 0 = closing). Images are 640 x 512 (Google robot) or
640 x 480 (WidowX) with the cabinet, the drawer and the robot's hand drawn at their positions.

Environment variables: ``FAKE_SIMPLER_LOG`` (append every received native action as a JSON line),
``FAKE_SIMPLER_FAIL_AT`` (raise at that step of every episode: the error path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

SERVER = Path(__file__).resolve().parents[1] / "src" / "damvla" / "envs" / "simpler_server.py"
_spec = importlib.util.spec_from_file_location("simpler_server", SERVER)
server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server)

LIMITS = {"Drawer": 113, "Grasp": 80, "Put": 60}
SUBTASK_STEPS = 3  # PlaceInto...: "open ... drawer" for 3 steps, then "place apple into ... drawer"


class FakeBackend:
    def __init__(self) -> None:
        self.log = os.environ.get("FAKE_SIMPLER_LOG")
        self.fail_at = int(os.environ.get("FAKE_SIMPLER_FAIL_AT", "0")) or None
        self.env_name = None

    def hello(self) -> dict:
        return {"protocol": server.PROTOCOL_VERSION, "server": "fake-simpler", "versions": {"fake": "1"}}

    def reset(self, state: dict, shader):
        data = state["data"]
        self.env_name = data["env_name"]
        kw = data.get("kwargs") or {}
        rng = np.random.default_rng(data.get("reset_seed") or state["seed"])
        self.widowx = data.get("robot_kind") == "widowx"
        self.robot = "widowx" if self.widowx else "google_robot_static"
        self.drawer = ["top", "middle", "bottom"][int(rng.integers(3))]
        for d in ("Top", "Middle", "Bottom"):
            if d in self.env_name:
                self.drawer = d.lower()
        self.closing = self.env_name.startswith("Close")
        self.is_drawer = "Drawer" in self.env_name
        self.qpos = 0.2 if self.closing else 0.0
        self.hand = np.array([0.5, 0.0]) + rng.uniform(-0.05, 0.05, 2)
        self.t = 0
        limit = kw.get("max_episode_steps") or next((v for k, v in LIMITS.items() if k in self.env_name), 60)
        if self.is_drawer:
            instruction = f"{'close' if self.closing else 'open'} {self.drawer} drawer"
        else:
            instruction = "pick coke can" if "Coke" in self.env_name else "put the spoon on the towel"
        self.instruction = instruction
        header = {
            "instruction": instruction,
            "max_steps": int(limit),
            "robot": self.robot,
            "camera": "3rd_view_camera" if self.widowx else "overhead_camera",
            "info": {"drawer": self.drawer, "shader": shader, "overlay": kw.get("rgb_overlay")},
        }
        return header, self._obs()

    def step(self, action):
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (7,):
            raise ValueError(f"fake SIMPLER: expected a (7,) action, got {a.shape}")
        self.t += 1
        if self.fail_at is not None and self.t >= self.fail_at:
            raise RuntimeError(f"fake SIMPLER failure at step {self.t}")
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"env": self.env_name, "t": self.t, "action": a.tolist()}) + "\n")
        self.hand = np.clip(self.hand + 0.02 * np.clip(a[:2], -1, 1), 0.0, 1.0)
        if self.is_drawer:
            self.qpos = float(np.clip(self.qpos - 0.05 * a[0], 0.0, 0.3))
            success = self.qpos <= 0.05 if self.closing else self.qpos >= 0.15
            stats = {"qpos": f"{self.qpos:.3f}"}  # the drawer envs record no boolean flag
        else:
            success = bool(a[6] > 0.5 and self.t > 2)
            stats = {"is_grasped": bool(a[6] > 0), "consecutive_grasp": success}
        if (
            self.env_name.startswith("PlaceInto") and self.t == SUBTASK_STEPS
        ):  # SIMPLER forces the next subtask
            self.instruction = f"place apple into {self.drawer} drawer"
        header = {
            "instruction": self.instruction,
            "reward": float(success),
            "done": self.t >= 10_000,
            "success": bool(success),
            "milestones": server.milestones_of({"episode_stats": stats}),
            "info": {"episode_stats": stats},
        }
        return header, self._obs()

    def _obs(self) -> dict:
        h, w = (480, 640) if self.widowx else (512, 640)
        img = np.full((h, w, 3), 200, dtype=np.uint8)
        img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = (120, 80, 40)  # cabinet
        dy = int(self.qpos * 400) if self.is_drawer else 0
        img[h // 2 : h // 2 + 40 + dy, w // 3 + 20 : 2 * w // 3 - 20] = (180, 140, 90)  # drawer
        y, x = int(self.hand[1] * h / 2 + h / 2) % h, int(self.hand[0] * w) % w
        img[max(0, y - 15) : y + 15, max(0, x - 15) : x + 15] = (40, 40, 200)  # hand
        return {"image": img, "state": np.array([self.qpos, *self.hand], dtype=np.float32)}

    def close(self) -> None:
        pass


if __name__ == "__main__":
    fin, fout = server.protocol_streams()
    print("fake SIMPLER server started", flush=True)  # goes to stderr: must not corrupt the reply stream
    server.serve(FakeBackend(), fin, fout)
    sys.exit(0)
