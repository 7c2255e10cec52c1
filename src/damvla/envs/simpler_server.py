"""The SIMPLER side of ``damvla eval --suite simpler:...``: a small server that runs in SimplerEnv's own
interpreter and answers reset / step requests over its stdin / stdout (docs/simpler.md).

SimplerEnv pins ``gymnasium<1.0`` and ``numpy<2`` (sapien 2.2.2); Meta-World needs ``gymnasium>=1.1``. The two
dependency sets therefore never share an interpreter: damvla starts this file *by path* with SimplerEnv's
Python (``--simpler-python`` / ``DAMVLA_SIMPLER_PYTHON``), so this module imports only the standard library
and numpy at the top, and never ``damvla``. The client side is ``damvla.envs.simpler``.

Protocol (version 1), one message per request and one per reply, in both directions the same framing:

    uint32 big-endian N | N bytes of UTF-8 JSON header | raw bytes of each array the header lists

The header's ``"arrays"`` is a list of ``{"name", "dtype", "shape"}`` (numpy ``dtype.str``, C order); the
array payloads follow in that order. Object, void and complex dtypes are refused. Requests (``"cmd"``):

| cmd | request fields | reply fields |
|---|---|---|
| ``hello`` | | ``protocol``, ``server``, ``versions`` |
| ``reset`` | ``state`` (an ``InitialState`` dict), ``shader`` (None: the config's own) | ``instruction``, ``max_steps``, ``robot``, ``info``; arrays ``image`` uint8 (H, W, 3), ``state`` float32 (S,) |
| ``step`` | array ``action`` float64 (7,): SIMPLER's native action | ``instruction`` (it changes between the subtasks of long-horizon tasks), ``reward``, ``done`` (time limit), ``success``, ``milestones`` {name: bool}, ``info``; arrays ``image``, ``state`` |
| ``close`` | | (then the server exits) |

Every reply carries ``"ok": true``, or ``"ok": false`` with ``"error"`` (type and message) and
``"traceback"``; the server keeps serving after an error. The server writes its replies to the *original*
stdout only: stdout is re-pointed at stderr at start-up so that the simulator's own prints (sapien,
ManiSkill) cannot corrupt the stream.

Initial states (``InitialState.data``): ``env_name`` (a ManiSkill2-real2sim env id), ``kwargs`` (its build
keyword arguments, e.g. ``robot``, ``scene_name``, ``urdf_version``; ``rgb_overlay`` names a file of
``ManiSkill2_real2sim/data/real_inpainting/``), ``options`` (``env.reset`` options: ``robot_init_options``,
``obj_init_options``), ``reset_seed`` (``env.reset(seed=...)``; the prepackaged configs draw their episode
layout from it) and ``prepackaged`` (bool: SimplerEnv's ``prepackaged_config=True`` visual-matching setup).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import traceback
from typing import Any, BinaryIO

import numpy as np

PROTOCOL_VERSION = 1
_HEADER = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class ProtocolError(RuntimeError):
    """A malformed or truncated message, or a peer that closed the stream."""


# ---- framing -------------------------------------------------------------------------------------
def write_message(f: BinaryIO, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> None:
    """Write one message (``header`` JSON plus the raw bytes of ``arrays``) and flush."""
    arrays = arrays or {}
    specs, blobs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.kind in "OVc":
            raise ProtocolError(f"array {name!r}: dtype {a.dtype} cannot cross the SIMPLER pipe")
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        blobs.append(a.tobytes())
    text = json.dumps({**header, "arrays": specs}).encode("utf-8")
    f.write(_HEADER.pack(len(text)) + text)
    for b in blobs:
        f.write(b)
    f.flush()


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            raise ProtocolError(f"stream closed after {got} of {n} bytes of {what}")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def read_message(f: BinaryIO) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read one message; returns ``(header, arrays)``. Raises ``ProtocolError`` at end of stream or on a
    malformed message (``EOFError`` is not used: a closed peer is an error here)."""
    (n,) = _HEADER.unpack(_read_exact(f, _HEADER.size, "the message length"))
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"message header of {n} bytes (> {MAX_HEADER_BYTES}): not a damvla SIMPLER message"
        )
    try:
        header = json.loads(_read_exact(f, n, "the message header").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"message header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ProtocolError(f"message header is a {type(header).__name__}, expected an object")
    arrays = {}
    for spec in header.pop("arrays", []):
        dtype = np.dtype(spec["dtype"])
        if dtype.kind in "OVc":
            raise ProtocolError(f"array {spec['name']!r}: dtype {dtype} refused")
        shape = tuple(int(s) for s in spec["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = _read_exact(f, nbytes, f"array {spec['name']!r}")
        arrays[str(spec["name"])] = np.frombuffer(buf, dtype=dtype).reshape(shape).copy()
    return header, arrays


# ---- the real backend ----------------------------------------------------------------------------
GOOGLE_CONTROL_MODE = "arm_pd_ee_delta_pose_align_interpolate_by_planner_gripper_pd_joint_target_delta_pos_interpolate_by_planner"
WIDOWX_CONTROL_MODE = "arm_pd_ee_target_delta_pose_align2_gripper_pd_joint_pos"


def robot_kind(robot: str) -> str:
    """``google_robot`` or ``widowx`` for a ManiSkill2-real2sim robot uid."""
    if "google_robot" in robot:
        return "google_robot"
    if "widowx" in robot:
        return "widowx"
    raise ValueError(f"robot {robot!r} is neither a Google robot nor a WidowX")


def _jsonable(x: Any) -> Any:
    """Simulator info values -> JSON (numpy scalars and arrays to Python; poses and the like to str)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, str):
        return x
    return str(x)


def milestones_of(info: dict[str, Any]) -> dict[str, bool]:
    """Task-progress flags of one step: the boolean entries of SIMPLER's ``info["episode_stats"]`` (e.g.
    ``is_grasped``, ``lifted_object``, ``moved_correct_obj``, ``is_drawer_open``). The drawer tasks record
    only the joint position there, so they have none."""
    stats = info.get("episode_stats") or {}
    return {str(k): bool(v) for k, v in stats.items() if isinstance(v, (bool, np.bool_))}


class SimplerBackend:
    """One SimplerEnv environment, rebuilt when an initial state asks for another env or build arguments."""

    def __init__(self) -> None:
        self.env: Any = None
        self.env_key: str | None = None
        self.robot: str | None = None
        self.camera: str | None = None

    def hello(self) -> dict[str, Any]:
        from importlib import metadata

        out = {}
        for pkg in ("simpler_env", "mani_skill2_real2sim", "sapien", "gymnasium", "numpy"):
            try:
                out[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                out[pkg] = None
        return {"protocol": PROTOCOL_VERSION, "server": "simpler", "versions": out, "python": sys.version}

    def _build(self, data: dict[str, Any], shader: str | None) -> None:
        import gymnasium as gym
        import mani_skill2_real2sim.envs  # noqa: F401  (registers the envs)
        from mani_skill2_real2sim import ASSET_DIR

        env_name = data["env_name"]
        kwargs = dict(data.get("kwargs") or {})
        kwargs.setdefault("obs_mode", "rgbd")
        if data.get("prepackaged"):
            kwargs["prepackaged_config"] = True
            if shader is not None:
                _override_prepackaged_shader(env_name, shader)
        else:
            robot = kwargs["robot"]
            kwargs.setdefault(
                "control_mode",
                GOOGLE_CONTROL_MODE if robot_kind(robot) == "google_robot" else WIDOWX_CONTROL_MODE,
            )
            kwargs.setdefault("camera_cfgs", {"add_segmentation": True})
            overlay = kwargs.pop("rgb_overlay", None)
            if overlay is not None:
                kwargs["rgb_overlay_path"] = str(ASSET_DIR / "real_inpainting" / overlay)
                kwargs.setdefault(
                    "rgb_overlay_cameras",
                    ["overhead_camera"] if robot_kind(robot) == "google_robot" else ["3rd_view_camera"],
                )
            if shader is not None:
                kwargs["shader_dir"] = shader
        self.close()
        self.env = gym.make(env_name, **kwargs)
        self.env_key = json.dumps(
            [env_name, data.get("kwargs"), bool(data.get("prepackaged")), shader], sort_keys=True
        )

    def reset(
        self, state: dict[str, Any], shader: str | None
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        data = state.get("data") or {}
        for key in ("env_name",):
            if key not in data:
                raise ValueError(
                    f"initial state {state.get('task')}/seed-{state.get('seed')}: data has no {key!r}"
                )
        key = json.dumps(
            [data["env_name"], data.get("kwargs"), bool(data.get("prepackaged")), shader], sort_keys=True
        )
        if self.env is None or key != self.env_key:
            self._build(data, shader)
        options = _reset_options(data.get("options") or {})
        obs, info = self.env.reset(seed=data.get("reset_seed"), options=options)
        self.robot = str(self.env.unwrapped.robot_uid)
        self.camera = "overhead_camera" if robot_kind(self.robot) == "google_robot" else "3rd_view_camera"
        max_steps = getattr(self.env, "_max_episode_steps", None) or getattr(
            self.env.spec, "max_episode_steps", None
        )
        header = {
            "instruction": self.env.unwrapped.get_language_instruction(),
            "max_steps": int(max_steps) if max_steps else None,
            "robot": self.robot,
            "camera": self.camera,
            "info": _jsonable({k: v for k, v in info.items() if not k.endswith("_wrt_robot_base")}),
        }
        return header, self._obs(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        if self.env is None:
            raise RuntimeError("step before reset")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (7,):
            raise ValueError(f"SIMPLER takes a 7-D action (xyz, axis-angle, gripper), got shape {a.shape}")
        obs, reward, terminated, truncated, info = self.env.step(a)
        header = {
            # Long-horizon tasks (open the drawer, then place the apple) change it mid-episode.
            "instruction": self.env.unwrapped.get_language_instruction(),
            "reward": float(reward),
            "done": bool(truncated),
            "success": bool(info.get("success", terminated)),
            "milestones": milestones_of(info),
            "info": {"episode_stats": _jsonable(info.get("episode_stats") or {})},
        }
        return header, self._obs(obs)

    def _obs(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(obs["image"][self.camera]["rgb"])
        if image.dtype != np.uint8:
            image = np.clip(image * 255.0 if image.max() <= 1.0 else image, 0, 255).astype(np.uint8)
        qpos = np.asarray(obs.get("agent", {}).get("qpos", np.zeros(0)), dtype=np.float32)
        return {"image": image[..., :3], "state": qpos}

    def close(self) -> None:
        if self.env is not None:
            env, self.env = self.env, None
            env.close()


def _reset_options(options: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the numpy arrays ManiSkill2-real2sim expects."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = {
                kk: (np.asarray(vv, dtype=np.float64) if isinstance(vv, list) else vv) for kk, vv in v.items()
            }
        else:
            out[k] = v
    return out


_PATCHED: dict[str, str] = {}


def _override_prepackaged_shader(env_name: str, shader: str) -> None:
    """``prepackaged_config=True`` overwrites keyword arguments given to ``make`` (the drawer configs force
    the ray-traced ``rt`` shader), so the shader is replaced in the env class's own config method, in this
    process only."""
    from mani_skill2_real2sim.utils.registration import REGISTERED_ENVS

    cls = REGISTERED_ENVS[env_name].cls
    if _PATCHED.get(env_name) == shader or not hasattr(cls, "_setup_prepackaged_env_init_config"):
        return
    original = cls.__dict__.get("_damvla_original_config") or cls._setup_prepackaged_env_init_config

    def config(self: Any) -> dict[str, Any]:
        ret = original(self)
        ret["shader_dir"] = shader
        return ret

    cls._damvla_original_config = original
    cls._setup_prepackaged_env_init_config = config
    _PATCHED[env_name] = shader


# ---- the loop ------------------------------------------------------------------------------------
def serve(backend: Any, fin: BinaryIO, fout: BinaryIO) -> None:
    """Answer requests from ``fin`` on ``fout`` until ``close`` or the end of ``fin``.

    ``backend``: ``hello() -> dict``, ``reset(state, shader) -> (header, arrays)``,
    ``step(action) -> (header, arrays)``, ``close()``; the fake server in the tests implements the same."""
    try:
        while True:
            try:
                req, arrays = read_message(fin)
            except ProtocolError:
                return  # the client went away
            cmd = req.get("cmd")
            try:
                if cmd == "hello":
                    write_message(fout, {"ok": True, **backend.hello()})
                elif cmd == "reset":
                    header, out = backend.reset(req["state"], req.get("shader"))
                    write_message(fout, {"ok": True, **header}, out)
                elif cmd == "step":
                    if "action" not in arrays:
                        raise ValueError("step request without an 'action' array")
                    header, out = backend.step(arrays["action"])
                    write_message(fout, {"ok": True, **header}, out)
                elif cmd == "close":
                    write_message(fout, {"ok": True})
                    return
                else:
                    raise ValueError(f"unknown request {cmd!r} (expected hello, reset, step or close)")
            except Exception as e:  # report and keep serving: the client decides
                write_message(
                    fout,
                    {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
                )
    finally:
        backend.close()


def protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """(requests in, replies out): stdin, and a duplicate of the original stdout; file descriptor 1 is
    re-pointed at stderr so that prints from C or Python code cannot reach the reply stream."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(os.dup(0), "rb"), out


def main() -> int:
    fin, fout = protocol_streams()
    serve(SimplerBackend(), fin, fout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
