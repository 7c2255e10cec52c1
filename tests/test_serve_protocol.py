"""`damvla serve` speaks openpi's websocket protocol: wire format, metadata, replies, health, auth.

The client side here is written from openpi's protocol facts (websockets sync client + msgpack with the
msgpack-numpy tags), independently of ``damvla.serving.client``, to prove an unchanged openpi client works.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import websockets
from websockets.sync.client import connect

from damvla.config import preset
from damvla.serving.client import PolicyClient
from damvla.serving.observation import ObservationError, ObservationMap, observation_to_batch, resize_image
from damvla.serving.protocol import ProtocolError, packb, unpackb
from damvla.serving.server import PolicyServer, RequestError, ServerThread, warmup_observation

# openpi's client calls websockets' connect() directly; websockets >= 17.1 warns about that style.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


# ---- an openpi-style client, written independently -------------------------------------------------
def openpi_pack(obj):
    def default(o):
        if isinstance(o, np.ndarray):
            return {b"__ndarray__": True, b"data": o.tobytes(), b"dtype": o.dtype.str, b"shape": o.shape}
        if isinstance(o, np.generic):
            return {b"__npgeneric__": True, b"data": o.item(), b"dtype": o.dtype.str}
        raise TypeError(type(o))

    return msgpack.Packer(default=default).pack(obj)


def openpi_unpack(data):
    def hook(o):
        if b"__ndarray__" in o:
            return np.ndarray(buffer=o[b"data"], dtype=np.dtype(o[b"dtype"]), shape=o[b"shape"])
        if b"__npgeneric__" in o:
            return np.dtype(o[b"dtype"]).type(o[b"data"])
        return o

    return msgpack.unpackb(data, object_hook=hook)


def openpi_connect(port, api_key=None):
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, additional_headers=headers)
    return ws, openpi_unpack(ws.recv())


def libero_obs(h=224, w=224, prompt="put the bowl on the plate", seed=0):
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": prompt,
    }


# ---- a stand-in policy: the server only needs .config, .metadata, .predict_action_chunk -------------
class DoublePolicy:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.config = preset("tiny")
        self.metadata = {"state_dim": 8, "fps": 10}
        self.delay_s = delay_s
        self.batches: list[dict] = []

    def predict_action_chunk(self, batch, return_info=False):
        self.batches.append(batch)
        if self.delay_s:
            time.sleep(self.delay_s)
        img = batch["observation.images.image"]
        h, d = self.config.horizon, self.config.action_dim
        # Actions encode each row's mean pixel so a test can tell the image reached the policy (and its row).
        actions = (img.float().mean(dim=(1, 2, 3)) / 255.0)[:, None, None].expand(-1, h, d).clone()
        info = {"router_weight": torch.tensor([0.75]), "head": torch.tensor([1])}
        return (actions, info) if return_info else actions


@pytest.fixture(scope="module")
def served():
    policy = DoublePolicy()
    with ServerThread(PolicyServer(policy, port=0)) as srv:
        yield srv, policy


def test_a_state_conditioned_checkpoint_gets_its_own_state_length_in_warm_up_and_requests():
    # The released checkpoint (cpu preset, state_dim=4) records its features as damvla writes them; serving
    # it failed at the warm-up, which sent the default 8 values.
    policy = DoublePolicy()
    policy.config.state_dim = 4
    policy.metadata = {"features": {"observation.state": [4]}, "fps": 80}
    server = PolicyServer(policy, port=0)
    state = server.metadata["observation"]["observation/state"]
    assert server.state_dim == 4 and state["shape"] == [4] and state["read_by_model"]
    obs = warmup_observation(server)
    assert obs["observation/state"].shape == (4,)
    server.prepare(packb(obs))
    with pytest.raises(RequestError, match="expected 4 values"):
        server.prepare(packb({**obs, "observation/state": np.zeros(8, np.float32)}))


# ---- wire format -------------------------------------------------------------------------------------
def test_packb_is_byte_identical_to_openpi_encoding():
    obs = libero_obs(32, 32)
    obs["scalar"] = np.float32(1.5)
    assert packb(obs) == openpi_pack(obs)
    back = unpackb(openpi_pack(obs))
    for k in ("observation/image", "observation/state"):
        np.testing.assert_array_equal(back[k], obs[k])
        assert back[k].dtype == obs[k].dtype
    assert back["scalar"] == np.float32(1.5) and isinstance(back["scalar"], np.float32)
    assert back["prompt"] == obs["prompt"]


@pytest.mark.parametrize("dtype", ["|O", "|V8", "<c8", "<c16", "<M8[ns]", "i4,f4", "(2,)f4"])
def test_unpack_refuses_object_void_complex_and_exotic_dtypes(dtype):
    msg = msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": dtype, b"shape": [1]}})
    with pytest.raises(ProtocolError):
        unpackb(msg)


def test_packb_refuses_object_arrays():
    with pytest.raises(ValueError, match="not allowed"):
        packb({"x": np.array([object()])})


@pytest.mark.parametrize(
    "shape", [[10**12, 10**12], [-1, 4], [3], [2, 2, 2], [1.5, 2], ["2"], [True], "4", None, [1] * 20]
)
def test_unpack_refuses_shapes_that_disagree_with_the_data(shape):
    msg = msgpack.packb({"x": {b"__ndarray__": True, b"data": b"\0" * 16, b"dtype": "<f4", b"shape": shape}})
    with pytest.raises(ProtocolError):
        unpackb(msg)


def test_unpack_refuses_garbage_ext_types_deep_nesting_and_oversize():
    for junk in (b"\xc1", b"\x92\x01", b"\xc7\x01\x05a", b"\x91" * 5000 + b"\x00", b"\x01\x02"):
        with pytest.raises(ProtocolError):
            unpackb(junk)
    with pytest.raises(ProtocolError, match="limit"):
        unpackb(packb({"x": np.zeros(4096, np.uint8)}), max_bytes=1024)


# ---- observation map and preprocessing ---------------------------------------------------------------
def test_observation_map_maps_openpi_keys_to_the_policy_batch():
    m = ObservationMap.default("image")
    batch = observation_to_batch(libero_obs(64, 96), m, image_size=112, state_dim=8)
    assert batch["observation.images.image"].shape == (1, 3, 112, 112)
    assert batch["observation.images.image"].dtype == torch.uint8
    assert batch["observation.images.wrist_image"].shape == (1, 3, 112, 112)
    assert batch["observation.state"].shape == (1, 8) and batch["observation.state"].dtype == torch.float32
    assert batch["task"] == ["put the bowl on the plate"]


def test_observation_map_from_inline_json_and_file(tmp_path):
    spec = {"images": {"observation/exterior_image_1_left": "front"}, "state": None, "resize": "pad"}
    m = ObservationMap.load(json.dumps(spec), cameras="front")
    assert m.required == ["observation/exterior_image_1_left"] and m.state is None and m.prompt == "prompt"
    f = tmp_path / "map.json"
    f.write_text(json.dumps(spec))
    assert ObservationMap.load(str(f), cameras="front") == m
    with pytest.raises(ValueError, match="camera 'image'"):
        ObservationMap.load(json.dumps(spec), cameras="image")
    with pytest.raises(ValueError, match="unknown keys"):
        ObservationMap.load('{"imgs": {}}', cameras="image")
    with pytest.raises(FileNotFoundError):
        ObservationMap.load("no/such/map.json", cameras="image")


def test_resize_passes_model_sized_images_through_and_pads_when_asked():
    img = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(img, 112).permute(1, 2, 0).numpy(), img)
    wide = np.full((50, 100, 3), 200, np.uint8)
    out = resize_image(wide, 112, "pad")
    assert out.shape == (3, 112, 112)
    assert out[:, 0].max() == 0 and out[:, 56].min() == 200  # black bars top and bottom, image in the middle


def test_channel_first_images_are_accepted_and_wrong_inputs_name_the_key():
    m = ObservationMap.default("image")
    obs = libero_obs(112, 112)
    obs["observation/image"] = np.ascontiguousarray(obs["observation/image"].transpose(2, 0, 1))
    assert observation_to_batch(obs, m, 112, 8)["observation.images.image"].shape == (1, 3, 112, 112)
    bad = {**libero_obs(112, 112), "observation/image": np.zeros((112, 112, 3), np.float32)}
    with pytest.raises(ObservationError, match="observation/image: expected dtype uint8"):
        observation_to_batch(bad, m, 112, 8)
    bad = {**libero_obs(112, 112), "observation/state": np.zeros(7, np.float32)}
    with pytest.raises(ObservationError, match="observation/state: expected 8 values"):
        observation_to_batch(bad, m, 112, 8)


# ---- the server, end to end --------------------------------------------------------------------------
def test_openpi_client_gets_metadata_then_action_chunks(served):
    srv, policy = served
    ws, meta = openpi_connect(srv.port)
    cfg = policy.config
    assert meta["server"] == "damvla" and meta["preset"] == "tiny" and meta["model"] == "dam-vla"
    assert meta["cameras"] == ["image"] and meta["image_size"] == 112
    assert meta["action"]["horizon"] == cfg.horizon and meta["action"]["dim"] == cfg.action_dim
    assert meta["action"]["gripper_index"] == 6 and meta["action"]["names"][6] == "gripper"
    assert meta["observation"]["observation/image"] == {
        "dtype": "uint8", "shape": [112, 112, 3], "required": True,
        "maps_to": "observation.images.image", "read_by_model": True,
    }
    assert meta["observation"]["observation/state"]["shape"] == [8]
    assert meta["observation"]["observation/wrist_image"]["required"] is False
    for step in range(3):
        obs = libero_obs(seed=step)
        ws.send(openpi_pack(obs))
        reply = openpi_unpack(ws.recv())
        assert reply["actions"].shape == (cfg.horizon, cfg.action_dim) and reply["actions"].dtype == np.float32
        assert reply["router_weight"] == pytest.approx(0.75) and reply["head"] == 1
        assert reply["head_name"] == "gripper"
        assert reply["server_timing"]["infer_ms"] > 0 and "infer_ms" in reply["policy_timing"]
        assert ("prev_total_ms" in reply["server_timing"]) == (step > 0)
        # the 224x224 image was resized to the model's 112x112 and reached the policy channel-first
        expected = float(policy.batches[-1]["observation.images.image"].float().mean()) / 255
        assert reply["actions"][0, 0] == pytest.approx(expected, rel=1e-5)
    ws.close()


def test_prompt_and_state_reach_the_policy_under_batch_keys(served):
    srv, policy = served
    with PolicyClient("127.0.0.1", srv.port) as client:
        obs = libero_obs(112, 112, prompt="open the drawer")
        client.infer(obs)
    batch = policy.batches[-1]
    assert batch["task"] == ["open the drawer"]
    np.testing.assert_array_equal(batch["observation.state"][0].numpy(), obs["observation/state"])
    np.testing.assert_array_equal(batch["observation.images.image"][0].permute(1, 2, 0).numpy(),
                                  obs["observation/image"])


def test_error_replies_are_text_frames_and_the_connection_stays_usable(served):
    srv, _ = served
    ws, _ = openpi_connect(srv.port)
    obs = libero_obs()
    del obs["prompt"]
    ws.send(openpi_pack(obs))
    err = ws.recv()
    assert isinstance(err, str) and "missing keys ['prompt']" in err
    ws.send("hello")  # a text frame
    assert "text frames" in ws.recv()
    ws.send(openpi_pack(libero_obs()))
    assert openpi_unpack(ws.recv())["actions"].shape == (16, 7)
    ws.close()


def test_policy_client_raises_runtime_error_with_the_server_text(served):
    srv, _ = served
    with PolicyClient(f"ws://127.0.0.1:{srv.port}") as client:
        assert client.metadata["preset"] == "tiny" and client.get_server_metadata() is client.metadata
        client.reset()
        with pytest.raises(RuntimeError, match="observation/image: expected dtype uint8"):
            client.infer({**libero_obs(), "observation/image": np.zeros((8, 8, 3), np.float64)})
        assert client.infer(libero_obs())["actions"].shape == (16, 7)


def test_healthz_answers_200_without_upgrading(served):
    srv, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"OK\n"


def test_healthz_answers_while_the_model_is_busy():
    policy = DoublePolicy(delay_s=1.5)
    with ServerThread(PolicyServer(policy, port=0)) as srv:
        ws, _ = openpi_connect(srv.port)
        ws.send(openpi_pack(libero_obs()))
        time.sleep(0.2)  # the request is now inside predict_action_chunk
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        assert time.perf_counter() - t0 < 0.5
        assert openpi_unpack(ws.recv())["actions"].shape == (16, 7)
        ws.close()


def test_connections_over_the_limit_are_refused_and_a_closed_one_frees_its_place():
    with ServerThread(PolicyServer(DoublePolicy(), port=0, max_connections=2)) as srv:
        a, _ = openpi_connect(srv.port)
        b, _ = openpi_connect(srv.port)
        with pytest.raises(websockets.InvalidStatus) as e:
            openpi_connect(srv.port)
        assert e.value.response.status_code == 503
        b.close()
        deadline = time.monotonic() + 10
        while True:  # the server sees the close asynchronously
            try:
                c, _ = openpi_connect(srv.port)
                break
            except websockets.InvalidStatus:
                assert time.monotonic() < deadline, "a closed connection never freed its place"
                time.sleep(0.05)
        c.send(openpi_pack(libero_obs()))
        assert openpi_unpack(c.recv())["actions"].shape == (16, 7)
        a.send(openpi_pack(libero_obs()))
        assert openpi_unpack(a.recv())["actions"].shape == (16, 7)
        a.close()
        c.close()
    with pytest.raises(ValueError, match="max_connections"):
        PolicyServer(DoublePolicy(), max_connections=0)


def test_api_key_is_required_before_the_upgrade():
    with ServerThread(PolicyServer(DoublePolicy(), port=0, api_key="s3cret")) as srv:
        for key in (None, "wrong"):
            with pytest.raises(websockets.InvalidStatus) as e:
                openpi_connect(srv.port, api_key=key)
            assert e.value.response.status_code == 401
        ws, meta = openpi_connect(srv.port, api_key="s3cret")
        assert meta["server"] == "damvla"
        ws.send(openpi_pack(libero_obs()))
        assert openpi_unpack(ws.recv())["actions"].shape == (16, 7)
        ws.close()
        with PolicyClient("127.0.0.1", srv.port, api_key="s3cret") as client:
            assert client.infer(libero_obs())["head"] == 1
        # health checks stay open: load balancers do not carry keys
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200


def test_two_clients_are_served_concurrently(served):
    srv, _ = served
    results: list[tuple] = []

    def robot(seed):
        with PolicyClient("127.0.0.1", srv.port) as c:
            results.append(tuple(c.infer(libero_obs(seed=s))["actions"].shape for s in range(seed, seed + 5)))

    threads = [threading.Thread(target=robot, args=(i * 10,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [((16, 7),) * 5] * 2


def test_serve_cli_arguments_have_safe_defaults():
    import argparse

    from damvla import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["ckpt"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.max_message_mb == 8.0
    assert args.obs_map is None and args.send_tracebacks is False


def test_a_policy_exception_is_reported_as_text_and_the_server_keeps_serving():
    class FlakyPolicy(DoublePolicy):
        def predict_action_chunk(self, batch, return_info=False):
            if batch["task"] == ["explode"]:
                raise RuntimeError("CUDA out of memory (simulated)")
            return super().predict_action_chunk(batch, return_info)

    with ServerThread(PolicyServer(FlakyPolicy(), port=0)) as srv:
        ws, _ = openpi_connect(srv.port)
        ws.send(openpi_pack(libero_obs(prompt="explode")))
        err = ws.recv()
        assert isinstance(err, str) and "inference failed: RuntimeError: CUDA out of memory" in err
        assert "Traceback" not in err and __file__ not in err  # no code or paths leak to clients
        ws.send(openpi_pack(libero_obs()))
        assert openpi_unpack(ws.recv())["actions"].shape == (16, 7)
        ws.close()
    with ServerThread(PolicyServer(FlakyPolicy(), port=0, send_tracebacks=True)) as srv:
        ws, _ = openpi_connect(srv.port)
        ws.send(openpi_pack(libero_obs(prompt="explode")))
        err = ws.recv()
        assert "Traceback" in err and "predict_action_chunk" in err and "CUDA out of memory" in err
        ws.close()


def test_a_custom_observation_map_serves_other_key_names():
    m = ObservationMap.load('{"images": {"cam/front": "image"}, "state": null, "prompt": "instruction"}', "image")
    with ServerThread(PolicyServer(DoublePolicy(), port=0, obs_map=m)) as srv:
        ws, meta = openpi_connect(srv.port)
        assert sorted(meta["observation"]) == ["cam/front", "instruction"]
        ws.send(openpi_pack({"cam/front": np.zeros((60, 80, 3), np.uint8), "instruction": "go"}))
        assert openpi_unpack(ws.recv())["actions"].shape == (16, 7)
        ws.send(openpi_pack(libero_obs()))  # openpi's default keys no longer match
        assert "missing keys ['cam/front', 'instruction']" in ws.recv()
        ws.close()
