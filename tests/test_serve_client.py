"""PolicyClient and ChunkPrefetcher against a live server with a stand-in policy."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from damvla.config import preset
from damvla.serving.client import ChunkPrefetcher, PolicyClient
from damvla.serving.server import PolicyServer, ServerThread


class StepEchoPolicy:
    """actions[j] = (j, step the observation was taken at): tells which chunk and index an action came from."""

    def __init__(self, delay_s: float) -> None:
        self.config = preset("tiny")
        self.metadata = {"state_dim": 1}
        self.delay_s = delay_s

    def predict_action_chunk(self, batch, return_info=False):
        time.sleep(self.delay_s)
        h, d = self.config.horizon, self.config.action_dim
        actions = torch.zeros(1, h, d)
        actions[0, :, 0] = torch.arange(h, dtype=torch.float32)
        actions[0, :, 1] = batch["observation.state"][0, 0]
        return actions, {"router_weight": torch.zeros(1), "head": torch.zeros(1, dtype=torch.long)}


def obs_at(step: int) -> dict:
    return {
        "observation/image": np.zeros((112, 112, 3), np.uint8),
        "observation/state": np.array([step], np.float32),
        "prompt": "wipe the table",
    }


@pytest.mark.parametrize("delay_s", [0.0, 0.06])
def test_prefetcher_executes_chunk_action_j_at_observation_step_plus_j(delay_s):
    with ServerThread(PolicyServer(StepEchoPolicy(delay_s), port=0)) as srv, PolicyClient(
        "127.0.0.1", srv.port
    ) as client:
        assert client.metadata["action"]["execute_steps"] == 4
        robot = ChunkPrefetcher(client, prefetch_when_left=2)
        for t in range(40):
            action = robot.step(obs_at(t))
            index, obs_step = int(action[0]), int(action[1])
            assert obs_step + index == t, (t, index, obs_step)
            time.sleep(0.02)  # the control period: latency (60 ms) spans several steps
        # prefetching re-plans every few steps, never once per step
        assert 40 / 4 <= robot.requests <= 40 / 2 + 1
        robot.reset()
        assert robot.step_index == 0 and robot.step(obs_at(0))[0] == 0
        robot.close()


def test_client_waits_for_a_server_that_is_not_up_yet():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        PolicyClient("127.0.0.1", port)  # nothing listening, no waiting: refused at once
    srv = ServerThread(PolicyServer(StepEchoPolicy(0.0), port=port))
    threading.Timer(0.7, srv.start).start()  # the robot starts before the server
    try:
        with PolicyClient("127.0.0.1", port, wait_for_server_s=20) as client:
            assert client.infer(obs_at(3))["actions"][5, 0] == 5
    finally:
        srv.server.ready.wait(20)
        srv.stop()


def test_policy_client_reopens_a_connection_the_server_closed_as_idle():
    with ServerThread(PolicyServer(StepEchoPolicy(0.0), port=0, idle_timeout_s=0.3)) as srv:
        with PolicyClient("127.0.0.1", srv.port) as client:
            obs = {"observation/image": np.zeros((112, 112, 3), np.uint8),
                   "observation/state": np.zeros(1, np.float32), "prompt": "go"}
            client.infer(obs)
            time.sleep(1.0)  # the server closes the connection after 0.3 s of silence
            assert client.infer(obs)["actions"].shape == (16, 7)
            assert client.reconnects == 1
