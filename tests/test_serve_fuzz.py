"""1,000 malformed or adversarial requests: each is answered with an error text frame (or, when over the
size limit, refused with a close), the server never crashes, and a valid request afterwards still works."""

from __future__ import annotations

import http.client
import logging
import random
import struct

import msgpack
import numpy as np
import pytest
import torch
import websockets
from websockets.sync.client import connect

from damvla.config import preset
from damvla.serving.server import PolicyServer, ServerThread

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")

MAX_BYTES = 256 * 1024  # a small limit keeps the oversized cases cheap
N_MESSAGES = 1000


class DoublePolicy:
    def __init__(self) -> None:
        self.config = preset("tiny")
        self.metadata = {"state_dim": 8}

    def predict_action_chunk(self, batch, return_info=False):
        h, d = self.config.horizon, self.config.action_dim
        rows = len(batch["task"])
        info = {"router_weight": torch.zeros(rows), "head": torch.zeros(rows, dtype=torch.long)}
        return torch.zeros(rows, h, d), info


def nd(arr: np.ndarray) -> dict:
    return {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": list(arr.shape)}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def valid_map(rng: np.random.Generator) -> dict:
    return {
        "observation/image": nd(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)),
        "observation/state": nd(rng.standard_normal(8).astype(np.float32)),
        "prompt": "stack the blocks",
    }


def junk_value(r: random.Random):
    """A value of the wrong kind for any observation key."""
    choices = [
        lambda: r.randint(-(2**63), 2**63 - 1),
        lambda: r.random(),
        lambda: None,
        lambda: True,
        lambda: "x" * r.randint(0, 50),
        lambda: bytes(r.getrandbits(8) for _ in range(r.randint(0, 30))),
        lambda: [1, [2, [3, {"a": None}]]],
        lambda: {"nested": {"junk": [b"\x00", 1.5]}},
        lambda: nd(np.zeros((112, 112, 3), np.float32)),  # float image
        lambda: nd(np.zeros((112, 112, 3), np.int8)),  # signed image
        lambda: nd(np.zeros((112, 112), np.uint8)),  # no channels
        lambda: nd(np.zeros((112, 112, 4), np.uint8)),  # RGBA
        lambda: nd(np.zeros((4, 4, 3), np.uint8)),  # too small
        lambda: nd(np.zeros((5000, 2, 3), np.uint8)),  # absurd aspect / too tall
        lambda: nd(np.zeros((2, 8), np.float32)),  # 2-D state
        lambda: nd(np.zeros(8, np.int64)),  # integer state
        lambda: nd(np.full(8, np.nan, np.float32)),  # NaN state
        lambda: nd(np.zeros(7, np.float32)),  # wrong state length
        lambda: nd(np.zeros(0, np.float32)),  # empty
        lambda: {b"__npgeneric__": True, b"data": 1.0, b"dtype": "<f4"},  # scalar where an array goes
    ]
    return r.choice(choices)()


def bad_ndarray(r: random.Random) -> dict:
    """Tagged arrays whose fields lie or are dangerous."""
    data = b"\x00" * r.choice([0, 1, 12, 64])
    options = [
        {b"__ndarray__": True, b"data": data, b"dtype": "<f4", b"shape": [10**12, 10**12]},
        {b"__ndarray__": True, b"data": data, b"dtype": "<f4", b"shape": [2**62, 2**62, 2**62]},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1", b"shape": [-1, 3]},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1", b"shape": [len(data) + 1]},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1", b"shape": [1] * 40},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1", b"shape": "12"},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1", b"shape": [1.5]},
        {b"__ndarray__": True, b"data": data, b"dtype": "|u1"},
        {b"__ndarray__": True, b"dtype": "|u1", b"shape": [0]},
        {b"__ndarray__": True, b"data": "text", b"dtype": "|u1", b"shape": [4]},
        {b"__ndarray__": True, b"data": data, b"dtype": r.choice(["|O", "|V8", "<c8", "<c16", "<M8[s]"]),
         b"shape": [len(data) // 8 or 1]},
        {b"__ndarray__": True, b"data": data, b"dtype": r.choice(["", "nope", "x" * 500, "i4,f4", 7, None]),
         b"shape": [1]},
        {b"__ndarray__": True, b"data": data, b"dtype": "<U999999999999", b"shape": [1]},
        {b"__npgeneric__": True, b"data": 1, b"dtype": "|O"},
        {b"__npgeneric__": True, b"data": 10**12, b"dtype": "|i1"},
        {b"__npgeneric__": True, b"data": [1, 2], b"dtype": "<f4"},
        {b"__npgeneric__": True, b"data": "abc", b"dtype": "<f8"},
    ]
    return r.choice(options)


def malformed(i: int, r: random.Random, rng: np.random.Generator) -> tuple[str, bytes | str]:
    """The i-th adversarial message and its kind; every kind is something the server must refuse."""
    kind = ["random_bytes", "wrong_type", "missing_key", "bad_value", "bad_ndarray", "nested_junk",
            "text_frame", "truncated", "trailing", "bad_keys", "ext", "oversized"][i % 12]
    valid = valid_map(rng)
    if kind == "random_bytes":
        return kind, bytes(r.getrandbits(8) for _ in range(r.randint(0, 300)))
    if kind == "wrong_type":
        return kind, pack(r.choice([1, -5, 3.5, None, True, "prompt", b"bytes", [valid], [], {}]))
    if kind == "missing_key":
        for k in r.sample(sorted(valid), r.randint(1, 3)):
            del valid[k]
        return kind, pack(valid)
    if kind == "bad_value":
        key = r.choice(sorted(valid))
        value = junk_value(r)
        while key == "prompt" and isinstance(value, str) and value.strip():
            value = junk_value(r)  # a non-empty string is a valid prompt, not junk
        valid[key] = value
        return kind, pack(valid)
    if kind == "bad_ndarray":
        valid[r.choice(["observation/image", "observation/state", "extra"])] = bad_ndarray(r)
        return kind, pack(valid)
    if kind == "nested_junk":
        depth = r.choice([50, 500, 2000, 50_000])  # 50k maps = 150 kB, under the limit
        if r.random() < 0.5:
            return kind, b"\x91" * depth + b"\xc0"  # lists inside lists
        return kind, b"\x81\xa1k" * depth + b"\xc0"  # maps inside maps
    if kind == "text_frame":
        return kind, r.choice(["", "hello", '{"prompt": "json?"}', "\u2603" * 100, pack(valid).hex()])
    if kind == "truncated":
        raw = pack(valid)
        return kind, raw[: r.randint(0, len(raw) - 1)]
    if kind == "trailing":
        return kind, pack(valid) + bytes(r.getrandbits(8) for _ in range(r.randint(1, 10)))
    if kind == "bad_keys":
        # int / float / nil map keys (refused), or a header claiming a huge map / list / bin
        return kind, r.choice([
            b"\x81\x01\x02", b"\x81\xcb" + struct.pack(">d", 1.0) + b"\x01", b"\x81\xc0\x01",
            b"\xdf\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
        ])
    if kind == "ext":
        return kind, pack({"prompt": msgpack.ExtType(r.randint(0, 127), b"\x00" * 4),
                           "observation/image": msgpack.Timestamp(1, 0)})
    # oversized: a frame bigger than the limit, closed by websockets before it is read
    return kind, b"\x00" * (MAX_BYTES + 1 + r.randint(0, 1000))


def test_a_thousand_malformed_messages_are_refused_and_the_server_survives(caplog):
    r, rng = random.Random(1234), np.random.default_rng(1234)
    counts: dict[str, int] = {}
    closes = 0
    # No byte rate limit: a thousand refused frames from one address would (rightly) put it in debt; what is
    # tested here is that every malformed message is refused and the server survives.
    with caplog.at_level(logging.ERROR), ServerThread(
        PolicyServer(DoublePolicy(), port=0, max_message_bytes=MAX_BYTES, max_bytes_per_second=0)
    ) as srv:
        uri = f"ws://127.0.0.1:{srv.port}"

        def reconnect():
            ws = connect(uri, compression=None, max_size=None)
            assert isinstance(ws.recv(), bytes)  # the metadata message
            return ws

        ws = reconnect()
        for i in range(N_MESSAGES):
            kind, message = malformed(i, r, rng)
            counts[kind] = counts.get(kind, 0) + 1
            try:
                ws.send(message)
                reply = ws.recv(timeout=10)
            except websockets.ConnectionClosed as e:
                # only a frame over the size limit may cost the client its connection
                assert kind == "oversized", f"message {i} ({kind}) closed the connection: {e}"
                assert e.rcvd is not None and e.rcvd.code == 1009
                closes += 1
                ws = reconnect()
                continue
            assert kind != "oversized", "an oversized frame was read instead of refused"
            assert isinstance(reply, str), f"message {i} ({kind}) got a binary reply: {reply[:80]!r}"
            assert reply.startswith("damvla serve: bad request"), reply[:300]
        # the same connection still serves a valid request ...
        ws.send(pack(valid_map(rng)))
        reply = msgpack.unpackb(ws.recv())
        assert reply["actions"][b"shape"] == [16, 7]
        ws.close()
        # ... and so does a fresh one, and the health check
        ws = reconnect()
        ws.send(pack(valid_map(rng)))
        assert isinstance(ws.recv(), bytes)
        ws.close()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    assert sum(counts.values()) == N_MESSAGES and closes == counts["oversized"]
    # no handler ever crashed (websockets logs "connection handler failed" at ERROR when one does)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR], caplog.text[:2000]


def test_a_frame_just_under_the_limit_is_read_and_validated():
    with ServerThread(PolicyServer(DoublePolicy(), port=0, max_message_bytes=MAX_BYTES)) as srv:
        with connect(f"ws://127.0.0.1:{srv.port}", compression=None, max_size=None) as ws:
            ws.recv()
            msg = pack({"prompt": "x", "pad": b"\x00" * (MAX_BYTES - 64)})
            assert len(msg) <= MAX_BYTES
            ws.send(msg)
            assert "missing keys" in ws.recv()
