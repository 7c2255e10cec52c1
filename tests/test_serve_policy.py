"""End to end with the real tiny DAMVLAPolicy: a saved checkpoint served in-process and by `damvla serve`."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import websockets
from websockets.sync.client import connect

pytest.importorskip("damvla.model.policy")

from damvla.config import preset  # noqa: E402
from damvla.model.policy import DAMVLAPolicy  # noqa: E402
from damvla.normalize import ActionNormalizer  # noqa: E402
from damvla.serving.client import PolicyClient  # noqa: E402
from damvla.serving.server import PolicyServer, ServerThread  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def nd(a: np.ndarray) -> dict:  # openpi's msgpack-numpy tag, written out by hand
    return {b"__ndarray__": True, b"data": a.tobytes(), b"dtype": a.dtype.str, b"shape": a.shape}


def from_nd(o: dict):
    if b"__ndarray__" in o:
        return np.ndarray(buffer=o[b"data"], dtype=np.dtype(o[b"dtype"]), shape=o[b"shape"])
    return o


def libero_obs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "put the black bowl on the plate",
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = preset("tiny")
    q01, q99 = -np.ones(cfg.action_dim), np.ones(cfg.action_dim)
    norm = ActionNormalizer(q01 * 0.05, q99 * 0.05, np.arange(cfg.action_dim) != cfg.gripper_index)
    policy = DAMVLAPolicy(cfg, norm, {"fps": 10, "state_dim": 8})
    return policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def check_reply(reply: dict) -> None:
    actions = reply["actions"]
    assert actions.shape == (16, 7) and actions.dtype == np.float32 and np.all(np.isfinite(actions))
    assert np.all(np.abs(actions[:, :6]) <= 0.05 + 1e-6)  # un-normalised into the checkpoint's range
    assert set(np.unique(actions[:, 6])) <= {0.0, 1.0}  # gripper binarised
    assert 0.0 <= reply["router_weight"] <= 1.0
    assert reply["head"] == int(reply["router_weight"] >= 0.5)  # hard routing picks the head the router prefers
    assert reply["head_name"] in ("arm", "gripper")


def test_tiny_checkpoint_served_to_an_openpi_style_client(checkpoint):
    policy = DAMVLAPolicy.from_pretrained(checkpoint).eval()
    with ServerThread(PolicyServer(policy, port=0)) as srv:
        ws = connect(f"ws://127.0.0.1:{srv.port}", compression=None, max_size=None)
        meta = msgpack.unpackb(ws.recv(), object_hook=from_nd)
        assert meta["preset"] == "tiny" and meta["model"] == "dam-vla" and meta["cameras"] == ["image"]
        assert meta["action"]["horizon"] == 16 and meta["action"]["dim"] == 7
        assert meta["observation"]["observation/state"]["shape"] == [8]  # from the checkpoint's metadata
        assert meta["policy_metadata"]["fps"] == 10
        obs = {k: nd(v) if isinstance(v, np.ndarray) else v for k, v in libero_obs().items()}
        ws.send(msgpack.packb(obs))
        reply = msgpack.unpackb(ws.recv(), object_hook=from_nd)
        check_reply(reply)
        assert reply["policy_timing"]["infer_ms"] > 0
        ws.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_damvla_serve_command_serves_a_checkpoint_behind_an_api_key(checkpoint):
    port = free_port()
    env = {**os.environ, "DAMVLA_API_KEY": "k3y"}  # the key travels by environment, not argv
    cmd = [sys.executable, "-m", "damvla.cli", "serve", str(checkpoint), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 50
        while True:  # loading + warm-up, then /healthz answers
            assert proc.poll() is None, proc.stdout.read()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        with pytest.raises(websockets.InvalidStatus):
            PolicyClient("127.0.0.1", port)  # no key
        with PolicyClient("127.0.0.1", port, api_key="k3y") as client:
            assert client.metadata["preset"] == "tiny"
            check_reply(client.infer(libero_obs(1)))
            with pytest.raises(RuntimeError, match="missing keys"):
                client.infer({"prompt": "no image"})
    finally:
        proc.terminate()  # SIGTERM: the server stops its loop and exits cleanly
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "warm-up inference" in out
