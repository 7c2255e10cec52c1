"""A websocket policy server that speaks openpi's protocol (see docs/serving.md).

One connection = one robot. On connect the server sends its metadata (one msgpack map); then every
binary msgpack map it receives is an observation, answered by one msgpack map with the action chunk.
Anything wrong with a request is answered by a *text* frame holding the error (what openpi's server
does with its traceback, and what openpi's client raises on; tracebacks only with ``send_tracebacks``); the connection stays open, so a robot
can fix its request and carry on. Only a frame over the size limit closes the connection (websockets
answers it with close code 1009 before reading it).

Inference runs on one worker thread (one model call at a time, the model is not re-entrant); decoding
and image resizing run on asyncio's default thread pool. The event loop itself only moves frames, so
``GET /healthz`` and keep-alive pings are answered while the model is busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import http
import logging
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import torch
import websockets
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from damvla.config import PolicyConfig
from damvla.serving.observation import (
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    ObservationError,
    ObservationMap,
    observation_to_batch,
    state_dim_from_metadata,
)
from damvla.serving.protocol import ProtocolError, packb, unpackb

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 32 * 2**20
DEFAULT_MAX_CONNECTIONS = 16
MAX_ERROR_CHARS = 20_000
# Frames buffered per connection before websockets stops reading the socket (TCP back-pressure).
# A robot sends one request and waits; a small queue bounds a pipelining client to a few frames in memory.
MAX_QUEUED_FRAMES = 4
HEAD_NAMES = ("arm", "gripper")


class ServablePolicy(Protocol):
    """What the server needs from a policy: ``DAMVLAPolicy`` satisfies it, and so does a test double."""

    config: PolicyConfig
    metadata: dict[str, Any]

    def predict_action_chunk(self, batch: dict[str, Any], return_info: bool = False) -> Any: ...


class RequestError(ValueError):
    """A request the server refuses (bad encoding or bad observation); its text goes back to the client."""


def _plain(obj: Any, depth: int = 0) -> Any:
    """Make free-form metadata msgpack-safe: str keys, lists, plain numbers; anything else as its repr."""
    if depth > 20:
        return repr(obj)[:200]
    if isinstance(obj, dict):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist() if obj.dtype.kind in "biuf" and obj.size <= 4096 else repr(obj)[:200]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)[:200]


def _policy_device(policy: Any) -> torch.device:
    try:
        return next(policy.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def action_names(config: PolicyConfig, metadata: dict[str, Any] | None) -> list[str]:
    """Names of the action dimensions: from the checkpoint's metadata when it records them, else generic."""
    md = metadata if isinstance(metadata, dict) else {}
    names = md.get("action_names")
    feat = md.get("features", {}).get("action") if isinstance(md.get("features"), dict) else None
    if names is None and isinstance(feat, dict):
        names = feat.get("names")
    if isinstance(names, dict):  # LeRobot sometimes nests names: {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == config.action_dim and all(isinstance(n, str) for n in names):
        return list(names)
    out = [f"action_{i}" for i in range(config.action_dim)]
    if config.gripper_index is not None:
        out[config.gripper_index] = "gripper"
    return out


class PolicyServer:
    """Serve ``policy`` over openpi's websocket protocol.

    Args:
        policy: anything with ``.config`` (``PolicyConfig``), ``.metadata`` (dict) and
            ``.predict_action_chunk(batch, return_info=True) -> (actions (B,H,D), info)``.
        host, port: where to listen; loopback by default. ``port=0`` picks a free port (see ``.port``).
        api_key: when set, the websocket upgrade needs ``Authorization: Api-Key <api_key>`` (else HTTP 401).
        max_message_bytes: largest request frame; bigger frames close the connection (code 1009).
        obs_map: request keys -> batch keys; ``None`` is openpi's LIBERO keys (``ObservationMap.default``).
    """

    def __init__(
        self,
        policy: ServablePolicy,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        obs_map: ObservationMap | None = None,
        send_tracebacks: bool = False,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} must be >= 1")
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes={max_message_bytes} is too small for any observation")
        self.policy = policy
        self.config: PolicyConfig = policy.config
        self.host, self.port = host, port
        self.api_key = api_key or None
        self.max_message_bytes = max_message_bytes
        # openpi sends the full traceback to the client; that exposes the server's file paths and code to
        # anyone who can connect, so here it is opt-in (the server log always has it).
        self.send_tracebacks = send_tracebacks
        # Each connection may hold a max-size frame queue in memory; a cap keeps a misbehaving fleet (or a
        # scanner) from exhausting the host. Counted in the handler (an upgrade that fails after this check
        # never reaches it), so simultaneous handshakes can overshoot the cap by their number.
        self.max_connections = max_connections
        self._connections = 0
        camera = self.config.vision.camera
        self.obs_map = (obs_map or ObservationMap.default(camera)).validate(camera)
        self.image_size = self.config.vision.image_size
        # A state-conditioned policy (config.state_dim) needs exactly that length; else what the data had.
        self.state_dim = self.config.state_dim or state_dim_from_metadata(getattr(policy, "metadata", None))
        self.device = _policy_device(policy)
        self.metadata = self._build_metadata()
        # One worker: the model runs one batch at a time, in arrival order.
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="damvla-infer")
        self._server: Server | None = None
        self._stop: asyncio.Event | None = None
        self.ready = threading.Event()  # set once listening (``.port`` is then the real port)

    def _inference_error(self) -> str:
        """The error frame for an exception raised by the policy (call inside ``except``)."""
        if self.send_tracebacks:
            return "damvla serve: inference failed:\n" + traceback.format_exc()
        e = sys.exc_info()[1]
        return (f"damvla serve: inference failed: {type(e).__name__}: {e} "
                "(the traceback is in the server log)")  # fmt: skip

    # ---- metadata ---------------------------------------------------------------------------
    def _build_metadata(self) -> dict[str, Any]:
        cfg, s = self.config, self.config.vision.image_size
        om = self.obs_map
        observation: dict[str, Any] = {}
        for key, cam in om.images.items():
            observation[key] = {
                "dtype": "uint8",
                "shape": [s, s, 3],  # the model's size; any H x W in range is accepted and resized
                "required": key in om.required,
                "maps_to": f"observation.images.{cam}",
                "read_by_model": cam == cfg.vision.camera,
            }
        if om.state is not None:
            observation[om.state] = {
                "dtype": "float32",
                "shape": [self.state_dim if self.state_dim is not None else -1],  # -1: any length
                "required": om.state_required,
                "maps_to": "observation.state",
                "read_by_model": bool(cfg.state_dim),  # the cpu preset's state condition; else images + prompt
            }
        observation[om.prompt] = {"dtype": "str", "shape": [], "required": True, "maps_to": "task"}
        ab = cfg.ablation
        model = "cogact" if not any(asdict(ab).values()) else ("dam-vla" if ab.dam else "dam-vla-single-head")
        from damvla import __version__

        return {
            "server": "damvla",
            "version": __version__,
            "protocol": "openpi-websocket-msgpack-numpy",
            "model": model,
            "preset": cfg.name,
            "ablation": asdict(ab),
            "cameras": [cfg.vision.camera],
            "image_size": s,
            "image_limits": {"min_side": MIN_IMAGE_SIDE, "max_side": MAX_IMAGE_SIDE, "resize": om.resize},
            "observation": observation,
            "observation_map": om.to_dict(),
            "action": {
                "horizon": cfg.horizon,
                "dim": cfg.action_dim,
                "names": action_names(cfg, getattr(self.policy, "metadata", None)),
                "gripper_index": cfg.gripper_index,
                "gripper_open": 1.0,
                "normalized": False,
                "execute_steps": cfg.inference.execute_steps,
            },
            "heads": list(HEAD_NAMES[: cfg.num_heads]),
            "max_message_bytes": self.max_message_bytes,
            "policy_metadata": _plain(getattr(self.policy, "metadata", None) or {}),
        }

    # ---- request path (thread-side, no asyncio) ----------------------------------------------
    def prepare(self, message: bytes) -> dict[str, Any]:
        """Decode and validate one binary frame into a batch of one; raises :class:`RequestError`."""
        try:
            obs = unpackb(message, max_bytes=self.max_message_bytes)
            return observation_to_batch(obs, self.obs_map, self.image_size, self.state_dim)
        except (ProtocolError, ObservationError) as e:
            raise RequestError(f"damvla serve: bad request: {e}") from e

    def predict(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run the policy on a prepared batch; returns the reply map without ``server_timing``."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.policy.predict_action_chunk(batch, return_info=True)
        infer_ms = (time.perf_counter() - t0) * 1e3
        actions, info = out if isinstance(out, tuple) else (out, {})
        actions = torch.as_tensor(actions).detach().float().cpu().numpy()
        want = (1, self.config.horizon, self.config.action_dim)
        if actions.shape != want:
            raise RuntimeError(f"policy returned actions of shape {actions.shape}, expected {want}")
        weight = info.get("router_weight") if isinstance(info, dict) else None
        head = info.get("head") if isinstance(info, dict) else None
        weight_f = float(torch.as_tensor(weight).reshape(-1)[0]) if weight is not None else 0.0
        head_i = int(torch.as_tensor(head).reshape(-1)[0]) if head is not None else 0
        reply: dict[str, Any] = {
            "actions": np.ascontiguousarray(actions[0], dtype=np.float32),  # (H, D), un-normalised
            "router_weight": weight_f,
            "head": head_i,
            "head_name": HEAD_NAMES[head_i] if 0 <= head_i < len(HEAD_NAMES) else str(head_i),
            "policy_timing": {"infer_ms": infer_ms},
        }
        if isinstance(info, dict) and isinstance(info.get("timing"), dict):
            reply["policy_timing"].update(_plain(info["timing"]))
        return reply

    # ---- websocket side ---------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP hook before the upgrade: health check and API-key check."""
        if urlsplit(request.path).path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            got = request.headers.get("Authorization", "")
            want = f"Api-Key {self.api_key}"
            # constant-time compare: the key must not leak through response timing
            if not hmac.compare_digest(got.encode("utf-8", "surrogateescape"), want.encode("utf-8")):
                log.warning("refused %s: missing or wrong API key", connection.remote_address)
                return connection.respond(
                    http.HTTPStatus.UNAUTHORIZED, "401 Unauthorized: send 'Authorization: Api-Key <key>'\n"
                )
        if self._connections >= self.max_connections:
            log.warning("refused %s: %d connections open (--max-connections)", connection.remote_address,
                        self._connections)  # fmt: skip
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"503 Service Unavailable: {self._connections} connections open, the limit is {self.max_connections}\n",
            )
        return None

    async def _send_error(self, ws: ServerConnection, text: str) -> None:
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS] + " ... (truncated)"
        try:
            await ws.send(text)  # a str is sent as a TEXT frame: openpi clients raise on it
        except websockets.ConnectionClosed:
            pass

    async def _handler(self, ws: ServerConnection) -> None:
        self._connections += 1
        try:
            await self._serve_connection(ws)
        finally:
            self._connections -= 1

    async def _serve_connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        log.info("client connected: %s", ws.remote_address)
        prev_total_ms: float | None = None
        try:
            await ws.send(packb(self.metadata))
            async for message in ws:
                t0 = time.perf_counter()
                if isinstance(message, str):
                    await self._send_error(
                        ws, "damvla serve: bad request: text frames are not part of the protocol; "
                        "send each observation as one binary msgpack map"
                    )
                    continue
                try:
                    batch = await asyncio.to_thread(self.prepare, message)
                    t1 = time.perf_counter()
                    reply = await loop.run_in_executor(self._infer_pool, self.predict, batch)
                except RequestError as e:
                    await self._send_error(ws, str(e))
                    continue
                except Exception:
                    # The policy failed on a valid request: report it as text, as openpi does, and keep
                    # serving; the next request may well succeed.
                    log.exception("inference failed")
                    await self._send_error(ws, self._inference_error())
                    continue
                reply["policy_timing"]["preprocess_ms"] = (t1 - t0) * 1e3
                reply["server_timing"] = {"infer_ms": (time.perf_counter() - t0) * 1e3}
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(packb(reply))
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except websockets.ConnectionClosed:
            pass
        finally:
            log.info("client disconnected: %s", ws.remote_address)

    async def serve(self) -> None:
        """Listen until :meth:`stop` is called (or the task is cancelled)."""
        self._stop = asyncio.Event()
        async with serve(
            self._handler,
            self.host,
            self.port,
            compression=None,  # openpi's choice: payloads are already-compact arrays, deflate costs latency
            max_size=self.max_message_bytes,
            max_queue=MAX_QUEUED_FRAMES,
            process_request=self._process_request,
        ) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1] if server.sockets else self.port
            self._loop = asyncio.get_running_loop()
            if threading.current_thread() is threading.main_thread():
                # Ctrl-C / `docker stop` end the serve loop cleanly instead of killing mid-reply.
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                        self._loop.add_signal_handler(sig, self._stop.set)
            self.ready.set()
            log.info("serving %s on ws://%s:%d (healthz: /healthz)", self.config.name, self.host, self.port)
            await self._stop.wait()

    def serve_forever(self) -> None:
        """Blocking :meth:`serve` in a fresh event loop (Ctrl-C stops it)."""
        try:
            asyncio.run(self.serve())
        except KeyboardInterrupt:
            pass
        finally:
            self._infer_pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Stop listening; safe to call from any thread."""
        if self._stop is not None and getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


class ServerThread:
    """Run a :class:`PolicyServer` in a background thread (tests, notebooks, evaluation scripts).

    >>> with ServerThread(PolicyServer(policy, port=0)) as srv:
    ...     client = PolicyClient("127.0.0.1", srv.port)
    """

    def __init__(self, server: PolicyServer, timeout_s: float = 30.0) -> None:
        self.server = server
        self.timeout_s = timeout_s
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="damvla-serve", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as e:  # e.g. the port is taken: report it to start() instead of hanging
            self.error = e
        finally:
            self.server.ready.set()

    def start(self) -> ServerThread:
        self._thread.start()
        if not self.server.ready.wait(self.timeout_s):
            raise RuntimeError(f"server did not start listening within {self.timeout_s} s")
        if self.error is not None:
            raise RuntimeError(f"server failed to start: {self.error!r}") from self.error
        return self

    def stop(self) -> None:
        self.server.stop()
        self._thread.join(self.timeout_s)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def warmup_observation(server: PolicyServer, prompt: str = "pick up the object") -> dict[str, Any]:
    """A synthetic request that satisfies ``server``'s observation map (startup warm-up, smoke tests)."""
    om, s = server.obs_map, server.image_size
    obs: dict[str, Any] = {om.prompt: prompt}
    for key in om.required:
        obs[key] = np.zeros((s, s, 3), dtype=np.uint8)
    if om.state is not None and om.state_required:
        obs[om.state] = np.zeros(server.state_dim or 8, dtype=np.float32)
    return obs

