"""A small synchronous client for ``damvla serve`` (and any openpi-protocol server).

It mirrors ``openpi_client.websocket_client_policy.WebsocketClientPolicy``: connect, read the metadata
message, then ``infer(obs) -> reply`` per step. Only ``websockets`` and ``msgpack`` are needed on the robot.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import time
from typing import Any

import numpy as np
import websockets
from websockets.sync.client import ClientConnection, connect

from damvla.serving.protocol import packb, unpackb

# The client trusts its server, so the reply size limit only guards against a runaway peer.
MAX_REPLY_BYTES = 1 << 31
# websockets >= 17.1 warns when connect() is not a context manager unless legacy=True; older ones lack it.
_CONNECT_KW: dict[str, Any] = {"legacy": True} if "legacy" in inspect.signature(connect).parameters else {}


def _closed_for_silence(e: websockets.ConnectionClosed) -> bool:
    """Did ``damvla serve`` close the connection for its first-request or idle timeout?"""
    frame = e.rcvd
    return (frame is not None and frame.code == 1008
            and frame.reason.startswith(("idle for", "no first request")))  # fmt: skip


class PolicyClient:
    """Talk to a policy server.

    Args:
        host: hostname, or a full ``ws://`` / ``wss://`` URI (then ``port`` is ignored).
        port: server port.
        api_key: sent as ``Authorization: Api-Key <api_key>`` when given.
        wait_for_server_s: keep retrying a refused connection this long (robots often start first).
        timeout_s: connect timeout.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = 8000,
        api_key: str | None = None,
        *,
        wait_for_server_s: float = 0.0,
        timeout_s: float = 10.0,
    ) -> None:
        if host.startswith(("ws://", "wss://")):
            self.uri = host
        else:
            self.uri = f"ws://{host}" + (f":{port}" if port is not None else "")
        self._headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self._timeout_s = timeout_s
        self.reconnects = 0  # connections re-opened after the server closed an idle one
        self._connect(wait_for_server_s)

    def _connect(self, wait_for_server_s: float = 0.0) -> None:
        deadline = time.monotonic() + wait_for_server_s
        while True:
            try:
                self._ws: ClientConnection = connect(
                    self.uri, compression=None, max_size=None, additional_headers=self._headers,
                    open_timeout=self._timeout_s, **_CONNECT_KW,
                )
                break
            except (ConnectionRefusedError, TimeoutError, OSError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
        self._metadata: dict[str, Any] = unpackb(self._ws.recv(), max_bytes=MAX_REPLY_BYTES, limits=None)

    @property
    def metadata(self) -> dict[str, Any]:
        """The server's metadata message (observation keys, action layout, model name ...)."""
        return self._metadata

    def get_server_metadata(self) -> dict[str, Any]:
        """openpi's name for :attr:`metadata`."""
        return self._metadata

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        """Send one observation, return the reply (``actions`` (H, D), ``router_weight``, ``head`` ...).

        Raises ``RuntimeError`` with the server's text when the server answers with an error, and
        ``ConnectionError`` when the server closed the connection (e.g. the frame was over its size limit).
        A connection the server closed because it was silent too long (``damvla serve --idle-timeout``, code
        1008) is re-opened once and the request sent again: the server never saw it.
        """
        message = packb(obs)
        limit = self._metadata.get("max_message_bytes")
        if isinstance(limit, int) and len(message) > limit:
            # the server would close the connection (1009) without reading it: say why before sending
            raise ValueError(
                f"this request is {len(message) / 2**20:.1f} MiB, the server takes at most {limit / 2**20:.1f} MiB "
                f"(damvla serve --max-message-mb); send images at the model's size ({self._metadata.get('image_size')} "
                "px, metadata image_size), or raise the server's limit"
            )
        try:
            self._ws.send(message)
            reply = self._ws.recv()
        except websockets.ConnectionClosed as e:
            if not _closed_for_silence(e):
                raise ConnectionError(f"policy server closed the connection: {e}") from e
            self._connect()
            self.reconnects += 1
            try:
                self._ws.send(message)
                reply = self._ws.recv()
            except websockets.ConnectionClosed as e2:
                raise ConnectionError(f"policy server closed the connection: {e2}") from e2
        if isinstance(reply, str):
            raise RuntimeError(f"Error in inference server:\n{reply}")
        return unpackb(reply, max_bytes=MAX_REPLY_BYTES, limits=None)

    def reset(self) -> None:
        """No-op, for openpi ``BasePolicy`` compatibility (the server keeps no per-episode state)."""

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChunkPrefetcher:
    """An action queue for the robot loop that asks for the next chunk before the current one runs out.

    Call :meth:`step` once per control tick with the latest observation; it returns the action to execute
    now. Each chunk contributes ``execute_steps`` actions. When ``prefetch_when_left`` or fewer remain, the
    next request goes out on a background thread with the current observation, so the model's latency
    hides behind the actions still queued. A chunk predicted from the observation of step ``s`` and
    adopted at step ``s'`` starts at its action ``s' - s``: the steps executed while it was being computed
    are skipped, so action ``j`` of a chunk is always executed at step ``s + j``.

    Server errors surface as ``RuntimeError`` from :meth:`step` (see :meth:`PolicyClient.infer`).
    """

    def __init__(self, client: PolicyClient, execute_steps: int | None = None, prefetch_when_left: int = 2) -> None:
        action = client.metadata.get("action", {})
        self.client = client
        self.horizon: int = int(action.get("horizon", 0)) or 10**9
        self.execute_steps = int(execute_steps or action.get("execute_steps") or 5)
        if not 1 <= self.execute_steps <= self.horizon:
            raise ValueError(f"execute_steps={self.execute_steps} must be in 1..horizon={self.horizon}")
        self.prefetch_when_left = prefetch_when_left
        self.step_index = 0  # control steps executed so far
        self.requests = 0
        self.last_reply: dict[str, Any] | None = None
        self._plan: collections.deque[np.ndarray] = collections.deque()
        # One worker: the connection carries one request at a time, from one thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="damvla-prefetch")
        self._pending: concurrent.futures.Future | None = None

    def _request(self, obs: dict[str, Any], obs_step: int) -> tuple[int, dict[str, Any]]:
        return obs_step, self.client.infer(obs)

    def _adopt(self, future: concurrent.futures.Future) -> None:
        self._pending = None
        obs_step, reply = future.result()
        self.requests += 1
        self.last_reply = reply
        skip = self.step_index - obs_step  # steps the previous plan executed while this chunk was computed
        self._plan = collections.deque(reply["actions"][skip : skip + self.execute_steps])

    def step(self, obs: dict[str, Any]) -> np.ndarray:
        """The action (D,) to execute now, given the observation taken just before it."""
        if self._pending is not None and self._pending.done():
            self._adopt(self._pending)
        while not self._plan:  # starved (first step, or a chunk arrived too late to be useful): wait
            if self._pending is None:
                self._pending = self._pool.submit(self._request, obs, self.step_index)
            self._adopt(self._pending)
        action = self._plan.popleft()
        if len(self._plan) <= self.prefetch_when_left and self._pending is None:
            self._pending = self._pool.submit(self._request, obs, self.step_index)
        self.step_index += 1
        return action

    def reset(self) -> None:
        """Start a new episode: drop queued actions and any chunk in flight."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending])
        self._pending = None
        self._plan.clear()
        self.step_index = 0
        self.client.reset()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
