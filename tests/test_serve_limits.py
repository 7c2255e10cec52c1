"""`damvla serve` under hostile clients (issue #13, findings 1-6): msgpack bombs, silent connections,
buffered frames, prompts and states the checkpoint cannot take, and an open bind without a key."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import websockets
from websockets.sync.client import connect

from damvla.config import preset
from damvla.serving.protocol import ProtocolError, packb, unpackb
from damvla.serving.server import (
    BAD_REQUEST_PENALTY,
    LARGE_FRAME_NICE,
    ByteBudget,
    PolicyServer,
    RequestError,
    ServerThread,
)

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


class DoublePolicy:
    """A stand-in policy; ``gate`` (when given) holds every inference until it is set."""

    def __init__(self, metadata: dict | None = None, gate: threading.Event | None = None, **config) -> None:
        self.config = preset("tiny")
        for k, v in config.items():
            setattr(self.config, k, v)
        self.metadata = {"state_dim": 8} if metadata is None else metadata
        self.gate = gate
        self.entered = threading.Event()

    def predict_action_chunk(self, batch, return_info=False):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        h, d = self.config.horizon, self.config.action_dim
        rows = len(batch["task"])
        info = {"router_weight": torch.zeros(rows), "head": torch.zeros(rows, dtype=torch.long)}
        return torch.zeros(rows, h, d), info


def obs(state_dim: int = 8, prompt: str = "stack the blocks", size: int = 112) -> dict:
    return {
        "observation/image": np.zeros((size, size, 3), np.uint8),
        "observation/state": np.zeros(state_dim, np.float32),
        "prompt": prompt,
    }


def ws_connect(port: int, source: str | None = None):
    kw = {"source_address": (source, 0)} if source else {}
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, **kw)
    assert isinstance(ws.recv(timeout=10), bytes)  # the metadata message
    return ws


def array16(n: int, item: bytes) -> bytes:
    return b"\xdc" + struct.pack(">H", n) + item * n


# ---- finding 1: msgpack bombs ------------------------------------------------------------------------
def bomb(lists: int = 300, per_list: int = 4000) -> bytes:
    """{"x": [[[], [], ...], ...]}: every container is short, but there are ``lists * per_list`` objects."""
    return b"\x81\xa1x" + b"\xdc" + struct.pack(">H", lists) + array16(per_list, b"\x90") * lists


def test_a_msgpack_bomb_is_refused_from_its_headers_before_anything_is_built(monkeypatch):
    def never(*_a, **_k):
        raise AssertionError("msgpack started building the bomb")

    monkeypatch.setattr(msgpack, "unpackb", never)
    cases = {
        "objects": bomb(),  # 1.2 M empty lists in 1.2 MB: each list is short, their number is not
        "elements": b"\x81\xa1x" + b"\xdd" + struct.pack(">I", 60_000) + b"\x90" * 60_000,  # one long list
        "keys": b"\xde" + struct.pack(">H", 300) + b"".join(b"\xa3" + b"%03d" % i + b"\xc0" for i in range(300)),
        "nested": b"\x91" * 100 + b"\xc0",
    }
    for what, data in cases.items():
        with pytest.raises(ProtocolError, match=what):
            unpackb(data)


def test_a_bomb_with_huge_declared_counts_is_refused_at_its_first_header():
    # a 5-byte frame that declares 4 billion elements: refused by the declared count, not by running out
    for data in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x81\xa1x\xdd\x00\x01\x00\x00"):
        with pytest.raises(ProtocolError, match="elements|keys"):
            unpackb(data)


def test_requests_with_a_long_state_list_and_extra_keys_still_decode():
    msg = obs()
    msg["observation/state"] = [0.5] * 1024  # a plain list of numbers, at MAX_STATE_DIM
    msg.update({f"extra/{i}": {"t": float(i), "tags": ["a", "b"]} for i in range(100)})
    back = unpackb(packb(msg))
    assert back["observation/state"] == [0.5] * 1024 and back["extra/99"]["tags"] == ["a", "b"]


def test_the_server_answers_a_bomb_with_a_bad_request_and_keeps_serving():
    with ServerThread(PolicyServer(DoublePolicy(), port=0)) as srv:
        ws = ws_connect(srv.port)
        ws.send(bomb())
        reply = ws.recv(timeout=10)
        assert isinstance(reply, str) and reply.startswith("damvla serve: bad request") and "objects" in reply
        ws.send(packb(obs()))
        assert isinstance(ws.recv(timeout=10), bytes)
        ws.close()


# ---- finding 2: silent connections, per-address limit -------------------------------------------------
def closed_by_server(ws) -> websockets.ConnectionClosed:
    with pytest.raises(websockets.ConnectionClosed) as e:
        ws.recv(timeout=20)
    return e.value


def test_a_connection_that_never_sends_a_request_is_closed_after_the_first_request_timeout():
    with ServerThread(PolicyServer(DoublePolicy(), port=0, first_request_timeout_s=0.5)) as srv:
        ws = ws_connect(srv.port)
        e = closed_by_server(ws)
        assert e.rcvd is not None and e.rcvd.code == 1008 and "first request" in e.rcvd.reason


def test_an_idle_connection_is_closed_after_the_idle_timeout():
    with ServerThread(PolicyServer(DoublePolicy(), port=0, idle_timeout_s=0.5)) as srv:
        ws = ws_connect(srv.port)
        ws.send(packb(obs()))
        assert isinstance(ws.recv(timeout=10), bytes)
        e = closed_by_server(ws)
        assert e.rcvd is not None and e.rcvd.code == 1008 and "idle" in e.rcvd.reason


def test_silent_clients_cannot_keep_a_real_one_out():
    server = PolicyServer(DoublePolicy(), port=0, max_connections=2, first_request_timeout_s=0.5)
    with ServerThread(server) as srv:
        silent = [ws_connect(srv.port) for _ in range(2)]
        deadline = time.monotonic() + 20
        while True:  # the silent ones are closed after 0.5 s, and their places are given back
            try:
                ws = ws_connect(srv.port)
                break
            except websockets.InvalidStatus as e:
                assert e.response.status_code == 503
                assert time.monotonic() < deadline, "silent connections kept every place"
                time.sleep(0.1)
        ws.send(packb(obs()))
        assert isinstance(ws.recv(timeout=10), bytes)
        for s in silent:
            s.close()


def test_one_address_may_hold_only_its_share_of_the_connections():
    server = PolicyServer(DoublePolicy(), port=0, max_connections=8, max_connections_per_address=2)
    with ServerThread(server) as srv:
        mine = [ws_connect(srv.port) for _ in range(2)]
        with pytest.raises(websockets.InvalidStatus) as e:
            ws_connect(srv.port)
        assert e.value.response.status_code == 503
        assert b"per address" in e.value.response.body
        other = ws_connect(srv.port, source="127.0.0.2")  # another address still gets in
        other.send(packb(obs()))
        assert isinstance(other.recv(timeout=10), bytes)
        for ws in (*mine, other):
            ws.close()
        # health checks never count against the limits
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200


def test_serve_has_timeouts_and_a_per_address_limit_by_default():
    import argparse

    from damvla import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["ckpt"])
    assert args.first_request_timeout == 30 and args.idle_timeout == 300
    assert args.max_connections == 16 and args.max_connections_per_address == 8
    assert args.max_mb_per_second == 32
    with pytest.raises(ValueError, match="max-mb-per-second"):
        serve.run(p.parse_args(["ckpt", "--max-mb-per-second", "-1"]))
    with pytest.raises(ValueError, match="max_connections_per_address"):
        PolicyServer(DoublePolicy(), max_connections_per_address=0)


# ---- finding 3: frames buffered per connection --------------------------------------------------------
FRAME_MB = 1
SENDER = textwrap.dedent("""
    import sys, msgpack
    from websockets.sync.client import connect
    ws = connect(sys.argv[1], compression=None, max_size=None)
    ws.recv()
    img = {b"__ndarray__": True, b"data": bytes(8 * 8 * 3), b"dtype": "|u1", b"shape": [8, 8, 3]}
    frame = msgpack.packb({"observation/image": img, "observation/state": [0.0] * 8, "prompt": "go",
                           "pad": bytes(int(sys.argv[2]) << 20)})
    for i in range(12):
        ws.send(frame)  # never reads a reply: a pipelining client
        print(i, flush=True)
""")


def test_a_pipelining_client_gets_only_a_frame_or_two_buffered():
    gate = threading.Event()
    policy = DoublePolicy(gate=gate)
    tracemalloc.start()
    try:
        with ServerThread(PolicyServer(policy, port=0)) as srv:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            base = tracemalloc.get_traced_memory()[0]  # the client runs in another process: not counted
            proc = subprocess.Popen([sys.executable, "-c", SENDER, f"ws://127.0.0.1:{srv.port}", str(FRAME_MB)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert policy.entered.wait(30), "the first request never reached the model"
                last, stable_since, deadline = base, time.monotonic(), time.monotonic() + 20
                while time.monotonic() - stable_since < 1.5 and time.monotonic() < deadline:
                    time.sleep(0.1)  # wait until the server stops taking frames off the socket
                    now = tracemalloc.get_traced_memory()[0]
                    if abs(now - last) > 64 << 10:
                        last, stable_since = now, time.monotonic()
                grown = (tracemalloc.get_traced_memory()[0] - base) / (FRAME_MB << 20)
            finally:
                gate.set()
                proc.kill()
                proc.communicate(timeout=20)
    finally:
        tracemalloc.stop()
    # the frame in the model, one waiting behind it and part of the next: not a queue of several
    assert grown < 3.5, f"{grown:.1f} frames buffered while the model was busy"


# ---- findings 4 and 5: prompt and state limits from the checkpoint ------------------------------------
@pytest.fixture(scope="module")
def tiny_policy():
    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    cfg = preset("tiny")
    # the metadata training writes: LeRobot feature shapes as plain lists
    md = {"features": {"observation.state": [4], "action": [7]}, "state_key": "observation.state"}
    return DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), md).eval()


def test_a_prompt_over_the_checkpoints_token_limit_is_a_bad_request_not_an_inference_failure(tiny_policy):
    server = PolicyServer(tiny_policy, port=0)
    limit = tiny_policy.config.language.max_prompt_tokens
    spec = server.metadata["observation"]["prompt"]
    assert spec["max_tokens"] == limit
    assert 0 < spec["max_chars"] < limit  # the byte tokenizer: the template takes its share
    ok = "x" * spec["max_chars"]
    assert server.prepare(packb(obs(4, prompt=ok)))["task"] == [ok]
    for prompt in ("x" * (spec["max_chars"] + 1), "put the bowl on the plate " * 40):
        with pytest.raises(RequestError, match=f"prompt: .* tokens .* limit is {limit}"):
            server.prepare(packb(obs(4, prompt=prompt)))


def test_state_length_comes_from_the_checkpoint_metadata_as_training_writes_it(tiny_policy):
    server = PolicyServer(tiny_policy, port=0)
    spec = server.metadata["observation"]["observation/state"]
    assert spec["shape"] == [4] and spec["read_by_model"] is False
    assert server.prepare(packb(obs(4)))["observation.state"].shape == (1, 4)
    with pytest.raises(RequestError, match="observation/state: expected 4 values .* got 7"):
        server.prepare(packb(obs(7)))


def test_a_policy_that_reads_the_state_takes_its_length_from_the_config():
    policy = DoublePolicy(metadata={"features": {"observation.state": [9]}}, state_dim=4)
    server = PolicyServer(policy, port=0)
    spec = server.metadata["observation"]["observation/state"]
    assert spec["shape"] == [4] and spec["read_by_model"] is True and spec["required"] is True
    with pytest.raises(RequestError, match="expected 4 values"):
        server.prepare(packb(obs(9)))
    from damvla.serving.observation import ObservationMap

    no_state = ObservationMap.load('{"state": null}', "image")
    with pytest.raises(ValueError, match="state_dim=4"):
        PolicyServer(policy, port=0, obs_map=no_state)


# ---- finding 6: open bind without a key ---------------------------------------------------------------
class Reached(Exception):
    pass


def stop_at_model_load(monkeypatch):
    def reached(*_a, **_k):
        raise Reached

    monkeypatch.setattr("damvla.serve._load_policy", reached)
    monkeypatch.delenv("DAMVLA_API_KEY", raising=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_an_open_bind_without_a_key_is_refused_before_the_model_loads(host, monkeypatch, capsys):
    from damvla.cli import main

    stop_at_model_load(monkeypatch)
    assert main(["serve", "preset:tiny", "--host", host, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert "without an API key" in err and "DAMVLA_API_KEY" in err and "--allow-no-key" in err


@pytest.mark.parametrize("argv", [["--host", "0.0.0.0", "--allow-no-key"], ["--host", "127.0.0.2"],
                                  ["--host", "localhost"], ["--host", "0.0.0.0", "--api-key", "k"]])
def test_loopback_a_key_or_an_explicit_allow_no_key_may_start(argv, monkeypatch):
    from damvla.cli import main

    stop_at_model_load(monkeypatch)
    with pytest.raises(Reached):
        main(["serve", "preset:tiny", "--port", "0", *argv])


# ---- byte rate per address (the soak's floods of large frames) ----------------------------------------
def test_the_byte_budget_refills_at_its_rate_and_caps_at_its_burst():
    now = [0.0]
    budget = ByteBudget(rate=100, burst=150, clock=lambda: now[0])
    assert budget.charge("a", 100) == 0  # within the burst
    assert budget.charge("a", 100) == pytest.approx(0.5)  # 50 bytes of debt at 100 B/s
    assert budget.charge("b", 150) == 0  # addresses have budgets of their own
    now[0] = 10.0  # long after: refilled, but never above the burst
    assert budget.charge("a", 150) == 0 and budget.charge("a", 1) == pytest.approx(0.01)
    budget.forget_settled()
    assert len(budget) == 1  # 'b' refilled long ago and is forgotten; 'a' is in debt, so it stays
    now[0] = 100.0
    budget.forget_settled()
    assert len(budget) == 0


def throttled(caplog, address: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"not reading {address} ")]


def test_bytes_are_charged_as_they_arrive_and_an_address_in_debt_is_not_read_until_it_has_paid(caplog):
    caplog.set_level(logging.DEBUG, logger="damvla.serving.server")
    rate = 1 << 20
    server = PolicyServer(DoublePolicy(), port=0, max_message_bytes=2 << 20, max_bytes_per_second=rate)
    big = packb({**obs(), "pad": bytes(900 << 10)})  # two fit in the burst (one max frame), the third does not
    with ServerThread(server) as srv:
        other = ws_connect(srv.port, source="127.0.0.2")
        ws = ws_connect(srv.port)
        for _ in range(2):
            ws.send(big)
            assert isinstance(ws.recv(timeout=10), bytes)
        assert throttled(caplog, "127.0.0.1") == []
        ws.send(big)
        assert isinstance(ws.recv(timeout=10), bytes)  # served once paid; the socket was paused on its arrival
        assert throttled(caplog, "127.0.0.1")
        other.send(packb(obs()))
        assert isinstance(other.recv(timeout=10), bytes)
        assert throttled(caplog, "127.0.0.2") == []  # the other address is not charged for the flood
        ws.send(big)
        assert isinstance(ws.recv(timeout=10), bytes)  # reading resumes once the debt is paid
        ws.close()
        other.close()


def test_the_socket_of_an_address_in_debt_is_not_read_and_new_connections_get_429():
    rate = 1 << 20
    server = PolicyServer(DoublePolicy(), port=0, max_message_bytes=2 << 20, max_bytes_per_second=rate)
    with ServerThread(server) as srv:
        ws = ws_connect(srv.port)
        server.byte_budget.charge("127.0.0.1", (2 << 20) + int(1.5 * rate))  # 1.5 s of debt
        ws.send(packb(obs()))
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.5)  # the request stays in the socket, unread
        with pytest.raises(websockets.InvalidStatus) as refused:
            ws_connect(srv.port)
        assert refused.value.response.status_code == 429
        assert int(refused.value.response.headers["Retry-After"]) >= 1
        other = ws_connect(srv.port, source="127.0.0.2")  # other addresses are unaffected
        other.close()
        assert isinstance(ws.recv(timeout=10), bytes)  # read and served once the debt is paid
        ws.close()


def test_health_checks_do_not_fill_the_log_but_refusals_still_show(caplog):
    caplog.set_level(logging.INFO)
    with ServerThread(PolicyServer(DoublePolicy(), port=0, api_key="k")) as srv:
        for _ in range(5):
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
            conn.request("GET", "/healthz")
            assert conn.getresponse().status == 200
        with pytest.raises(websockets.InvalidStatus):
            ws_connect(srv.port)  # no key: 401
    lines = [r.getMessage() for r in caplog.records]
    assert not any("200" in m for m in lines), lines
    assert any("401" in m for m in lines) and any("API key" in m for m in lines)


def test_a_refused_request_costs_its_sender_the_penalty_times_its_size():
    rate = 1 << 20
    server = PolicyServer(DoublePolicy(), port=0, max_message_bytes=2 << 20, max_bytes_per_second=rate)
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    server._sleep = record  # the handler does not wait; the socket is still held until the debt is paid
    bad = packb({"pad": bytes(1 << 19)})  # no image: a bad request of just over 0.5 MiB
    good = packb(obs())
    with ServerThread(server) as srv:
        ws = ws_connect(srv.port)
        ws.send(bad)
        assert isinstance(ws.recv(timeout=10), str)
        ws.send(good)  # the next request is still served, after the wait
        assert isinstance(ws.recv(timeout=10), bytes)
        ws.close()
    # The frame itself fits in the burst (one max frame); with the penalty it costs 8x its size: 2 MiB of debt.
    debt_s = (BAD_REQUEST_PENALTY * len(bad) - server.max_message_bytes) / rate
    # waits[0]: after the refusal; then the good request, read once the socket is released, may find a
    # remainder of debt to wait out before it is served
    assert debt_s - 0.5 < waits[0] <= debt_s + 0.01 and all(w < waits[0] for w in waits[1:])


# ---- large frames and closing (the soak's floods) -------------------------------------------------------
def test_large_frames_are_decoded_on_their_own_low_priority_thread():
    server = PolicyServer(DoublePolicy(), port=0)
    threads: list[str] = []
    nice: list[int] = []
    prepare = server.prepare

    def recording(message):
        threads.append(threading.current_thread().name)
        if sys.platform == "linux":  # nice is per thread there
            nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return prepare(message)

    server.prepare = recording
    with ServerThread(server) as srv:
        ws = ws_connect(srv.port)
        ws.send(packb(obs()))
        assert isinstance(ws.recv(timeout=10), bytes)
        ws.send(packb({**obs(), "pad": bytes(3 << 20)}))  # over LARGE_FRAME_BYTES, under the limit
        assert isinstance(ws.recv(timeout=10), bytes)
        ws.close()
    assert threads[0].startswith("damvla-prepare_") and threads[1].startswith("damvla-prepare-large")
    if nice:
        assert nice[1] == min(19, nice[0] + LARGE_FRAME_NICE)


def test_a_peer_that_ignores_the_servers_close_is_dropped_soon_not_read_for_10_s():
    # websockets reads and discards what a peer sends after the server's close until the peer closes too;
    # a flooder never does. The server cuts that to CLOSE_TIMEOUT_S (websockets' default is 10 s).
    with ServerThread(PolicyServer(DoublePolicy(), port=0, first_request_timeout_s=0.3)) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
        sock.settimeout(20)
        t0 = time.monotonic()
        received = b""
        while chunk := _recv_or_reset(sock):  # the metadata, the close frame, then EOF or a reset
            received += chunk
        sock.close()
        assert b"first request" in received  # the close frame's reason
        assert time.monotonic() - t0 < 6  # websockets' default close timeout alone is 10 s


def _recv_or_reset(sock) -> bytes:
    try:
        return sock.recv(1 << 16)
    except ConnectionResetError:
        return b""


def test_the_client_refuses_a_request_over_the_servers_limit_before_sending_it():
    from damvla.serving.client import PolicyClient

    with ServerThread(PolicyServer(DoublePolicy(), port=0, max_message_bytes=1 << 20)) as srv:
        with PolicyClient("127.0.0.1", srv.port) as client:
            with pytest.raises(ValueError, match="the server takes at most 1.0 MiB.*--max-message-mb"):
                client.infer({**obs(), "pad": bytes(2 << 20)})
            assert client.infer(obs())["actions"].shape[0] > 0  # the connection is still open
