"""`damvla serve` serves the requests that waited for the model with one call (``max_batch``)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from damvla.config import preset
from damvla.serve import DEFAULT_MAX_BATCH, add_arguments
from damvla.serving.protocol import packb, unpackb
from damvla.serving.server import DEFAULT_MAX_BATCH as SERVER_DEFAULT_MAX_BATCH
from damvla.serving.server import PolicyServer, ServerThread, batch_signature, collate

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


class GatedPolicy:
    """Holds its first call until ``gate`` is set; answers every row with that row's mean pixel / 255 and
    refuses (raises on) any batch holding the prompt ``poison``."""

    def __init__(self) -> None:
        self.config = preset("tiny")
        self.config.state_dim = 0
        self.metadata: dict = {}  # no recorded state length: any length is valid, the model ignores it
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def predict_action_chunk(self, batch, return_info=False):
        self.calls.append(list(batch["task"]))
        self.entered.set()
        self.gate.wait(30)
        if "poison" in batch["task"]:
            raise RuntimeError("this policy cannot take the prompt 'poison'")
        img = batch["observation.images.image"].float()
        h, d = self.config.horizon, self.config.action_dim
        actions = (img.mean(dim=(1, 2, 3)) / 255.0)[:, None, None].expand(-1, h, d).clone()
        rows = img.shape[0]
        info = {"router_weight": torch.arange(rows, dtype=torch.float32) / 10, "head": torch.zeros(rows, dtype=torch.long)}
        return actions, info


def request(pixel: int, prompt: str, state: int = 8) -> bytes:
    return packb({"observation/image": np.full((112, 112, 3), pixel, np.uint8), "prompt": prompt,
                  "observation/state": np.zeros(state, np.float32)})  # fmt: skip


def open_client(port: int):
    ws = connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None)
    unpackb(ws.recv(timeout=10), limits=None)  # metadata
    return ws


def run_while_busy(server: PolicyServer, policy: GatedPolicy, frames: list[bytes]) -> list:
    """Send ``frames[0]``, and the others (each from its own connection) while the model is busy with it;
    then free the model. Returns every reply, in the order of ``frames``."""
    with ServerThread(server) as srv:
        clients = [open_client(srv.port) for _ in frames]
        clients[0].send(frames[0])
        assert policy.entered.wait(30), "the first request never reached the model"
        for ws, frame in zip(clients[1:], frames[1:]):
            ws.send(frame)
        deadline = threading.Event()
        deadline.wait(0.5)  # the others are decoded and waiting for the model
        policy.gate.set()
        replies = [ws.recv(timeout=30) for ws in clients]
        for ws in clients:
            ws.close()
    return [r if isinstance(r, str) else unpackb(r, limits=None) for r in replies]


def test_requests_that_wait_for_the_model_are_served_by_one_call_each_getting_its_own_row():
    policy = GatedPolicy()
    frames = [request(10 * i, f"task {i}") for i in range(5)]
    replies = run_while_busy(PolicyServer(policy, port=0), policy, frames)
    assert policy.calls[0] == ["task 0"]
    assert len(policy.calls) == 2 and sorted(policy.calls[1]) == [f"task {i}" for i in range(1, 5)]
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply["actions"], 10 * i / 255.0, rtol=1e-6)
    batched = [r for r in replies[1:]]
    assert {r["policy_timing"]["batch_size"] for r in batched} == {4} and replies[0]["policy_timing"]["batch_size"] == 1
    # router weights come back per row: the 4 rows of the second call got 0.0, 0.1, 0.2, 0.3 in call order
    order = policy.calls[1]
    for r, i in zip(batched, range(1, 5)):
        assert r["router_weight"] == pytest.approx(order.index(f"task {i}") / 10)


def test_max_batch_caps_the_rows_of_one_call_and_1_serves_one_by_one():
    policy = GatedPolicy()
    frames = [request(i, f"task {i}") for i in range(6)]
    run_while_busy(PolicyServer(policy, port=0, max_batch=2), policy, frames)
    assert [len(c) for c in policy.calls] == [1, 2, 2, 1]
    policy = GatedPolicy()
    run_while_busy(PolicyServer(policy, port=0, max_batch=1), policy, frames[:4])
    assert [len(c) for c in policy.calls] == [1, 1, 1, 1]


def test_requests_of_different_shapes_are_not_batched_together():
    # the model does not read the state (state_dim 0), so any length is valid, but rows must stack
    policy = GatedPolicy()
    frames = [request(0, "first"), request(1, "a", state=3), request(2, "b", state=5), request(3, "c", state=3)]
    replies = run_while_busy(PolicyServer(policy, port=0), policy, frames)
    assert sorted(map(sorted, policy.calls[1:])) == [["a", "c"], ["b"]]
    assert all(isinstance(r, dict) for r in replies)


def test_a_request_that_fails_the_model_fails_alone():
    policy = GatedPolicy()
    frames = [request(0, "first"), request(1, "fine"), request(2, "poison"), request(3, "also fine")]
    replies = run_while_busy(PolicyServer(policy, port=0), policy, frames)
    assert isinstance(replies[2], str) and "inference failed" in replies[2] and "poison" in replies[2]
    for i in (0, 1, 3):
        np.testing.assert_allclose(replies[i]["actions"], i / 255.0, rtol=1e-6)


def test_collate_and_signature():
    a = {"observation.images.image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "task": ["a"]}
    b = {"observation.images.image": torch.ones(1, 3, 4, 4, dtype=torch.uint8), "task": ["b"]}
    c = {"observation.images.image": torch.ones(1, 3, 8, 8, dtype=torch.uint8), "task": ["c"]}
    assert batch_signature(a) == batch_signature(b) != batch_signature(c)
    joined = collate([a, b])
    assert joined["task"] == ["a", "b"] and joined["observation.images.image"][:, 0, 0, 0].tolist() == [0, 1]


def test_the_cli_default_is_the_servers_and_the_metadata_says_it():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["preset:tiny"])
    assert args.max_batch == DEFAULT_MAX_BATCH == SERVER_DEFAULT_MAX_BATCH and args.threads is None
    assert PolicyServer(GatedPolicy(), port=0, max_batch=3).metadata["max_batch"] == 3
    with pytest.raises(ValueError, match="max_batch"):
        PolicyServer(GatedPolicy(), port=0, max_batch=0)


def test_serve_leaves_a_core_for_the_event_loop_on_the_cpu_and_torch_its_default_elsewhere(monkeypatch):
    from damvla.serve import inference_threads

    monkeypatch.setattr("os.cpu_count", lambda: 4)
    cpu_model = torch.nn.Linear(2, 2)
    assert inference_threads(None, cpu_model) == 3 and inference_threads(2, cpu_model) == 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert inference_threads(None, cpu_model) == 1
    assert inference_threads(None, torch.nn.Linear(2, 2, device="meta")) is None  # not the CPU: torch's choice
