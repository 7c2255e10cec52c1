"""A websocket policy server that speaks openpi's protocol (see docs/serving.md).

One connection = one robot. On connect the server sends its metadata (one msgpack map); then every
binary msgpack map it receives is an observation, answered by one msgpack map with the action chunk.
Anything wrong with a request is answered by a *text* frame holding the error (what openpi's server
does with its traceback, and what openpi's client raises on; tracebacks only with ``send_tracebacks``); the connection stays open, so a robot
can fix its request and carry on. Only a frame over the size limit closes the connection (websockets
answers it with close code 1009 before reading it).

Inference runs on one worker thread (one model call at a time, the model is not re-entrant); requests
that arrive while it is busy are served together by its next call (``max_batch`` rows at most, never
waiting to fill one). Decoding and image resizing run on a small thread pool of their own. The event loop itself only moves frames, so
``GET /healthz`` and keep-alive pings are answered while the model is busy.

Limits against hostile or broken clients (docs/serving.md, "Limits"): the structure of every message is
checked before it is decoded (``protocol.DecodeLimits``); at most ``max_connections`` connections, and
``max_connections_per_address`` from one address, counted from the HTTP upgrade request on; a connection
that sends no request within ``first_request_timeout_s``, or none for ``idle_timeout_s`` after its last
reply, is closed (code 1008); one frame at most waits behind the one being served, so a connection holds
about two frames of memory; each address may send ``max_bytes_per_second`` on average (``ByteBudget``,
charged as the bytes arrive; a refused request counts ``BAD_REQUEST_PENALTY`` times its size): beyond it
the server stops reading that address's sockets until it has paid, so TCP back-pressure, not the server's
CPU, absorbs a flood of large frames, and a new connection from it is answered 429; prompts and states are
checked against what the checkpoint can take.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import http
import logging
import os
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
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from damvla.config import PolicyConfig
from damvla.keys import STATE_KEY, image_key
from damvla.serving.observation import (
    MAX_IMAGE_SIDE,
    MAX_PROMPT_CHARS,
    MIN_IMAGE_SIDE,
    ObservationError,
    ObservationMap,
    observation_to_batch,
    state_dim_of,
)
from damvla.serving.protocol import REQUEST_LIMITS, ProtocolError, packb, unpackb

log = logging.getLogger(__name__)


class _QuietHealthChecks(logging.Filter):
    """Drop websockets' INFO line for every answered ``/healthz`` (``... (200 OK)``): a prober every 250 ms,
    or anyone hammering the endpoint, would otherwise fill the server log. Refusals (401, 503) still log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.args and record.args[0] == 200)


# websockets' connection log, under our name so that the filter applies to this server only.
_ws_log = logging.getLogger("damvla.serving.websockets")
_ws_log.addFilter(_QuietHealthChecks())

# A 224 x 224 LIBERO request (two cameras, state, prompt) is 0.3 MB; four raw 640 x 480 cameras are 3.7 MB.
# Every frame up to the limit is received whole before it can be judged, and a flood of limit-sized frames
# from a few connections takes CPU from the model (docs/benchmarks.md, soak): 8 MiB keeps that bounded.
DEFAULT_MAX_MESSAGE_BYTES = 8 * 2**20
DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 8
DEFAULT_FIRST_REQUEST_TIMEOUT_S = 30.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
# Requests that arrive while the model is busy are served together by its next call, up to this many: on a
# CPU one call on 8 rows costs about what 2-4 calls on one row do, so a fleet of robots gets more replies per
# core and shorter queues. Nothing waits to fill a batch: a lone robot is served as soon as the model is free.
DEFAULT_MAX_BATCH = 8
# A refused request (bad request: a bomb, a frame that is no observation) costs its sender this many times its
# size in byte budget: a robot with a bug sends a few and is barely slowed; a flood of refused max-size frames
# gets one frame through per PENALTY x (frame / rate) seconds, since refusing them is pure loss to the server.
BAD_REQUEST_PENALTY = 8
# Per client address, averaged: a robot sending three 640x480 RGB cameras raw (2.8 MB) at 10 Hz fits, a
# sender of back-to-back 32 MiB frames (400+ MB/s on loopback) is slowed about 15-fold.
DEFAULT_MAX_BYTES_PER_SECOND = 32 * 2**20
MAX_ERROR_CHARS = 20_000
# websockets' receive queue as (high, low) water marks: reading from the socket pauses as soon as one
# frame waits behind the one being served (high 0: "more than 0 queued") and resumes when it is taken.
# A robot sends one request and waits, so this never delays it; a pipelining client gets TCP back-pressure
# instead of a queue of max-size frames in server memory.
RECEIVE_QUEUE = (0, 0)
# Decoding and resizing threads. Each may hold a frame, its decoded copy and a float image (a few times
# the frame size), so their number bounds that memory too.
PREPARE_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Frames above this size (no robot's observation at the model's resolution comes near it; raw multi-camera
# frames do) are decoded by one thread of their own at a lower CPU priority (Linux): a flood of max-size
# frames then queues behind itself instead of taking the decoders and the cores from the robots' requests
# and the model.
LARGE_FRAME_BYTES = 2 << 20
# After the server closes a connection (a timeout of ours, or websockets' keepalive ping going unanswered),
# websockets reads and discards whatever the peer still sends until the peer closes too, or until this many
# seconds pass. A well-behaved client answers a close within milliseconds; a flooder never does, and with
# websockets' default of 10 s it could push gigabytes through the server's socket at loopback speed.
CLOSE_TIMEOUT_S = 1.0
LARGE_FRAME_NICE = 10


def _lower_thread_priority() -> None:
    """Thread initializer of the large-frame decoder: ``LARGE_FRAME_NICE`` more nice than the server, this
    thread only (Linux threads have their own nice value; elsewhere nothing changes)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()  # relative to the server's own nice value
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + LARGE_FRAME_NICE))
HEAD_NAMES = ("arm", "gripper")


def batch_signature(batch: dict[str, Any]) -> tuple:
    """What two prepared requests must share to run in one model call: the same keys, and tensors of the
    same per-row shape and dtype (a state of another length, or an optional camera one sends and another
    does not, keeps them apart)."""
    return tuple(
        (k, tuple(v.shape[1:]), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
        for k, v in sorted(batch.items())
    )


def collate(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Join prepared requests of one :func:`batch_signature` into one batch, rows in the given order."""
    out: dict[str, Any] = {}
    for key, first in batches[0].items():
        if isinstance(first, torch.Tensor):
            out[key] = torch.cat([b[key] for b in batches])
        else:
            out[key] = [row for b in batches for row in b[key]]
    return out


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


def _client_address(connection: ServerConnection) -> str:
    """The peer's IP address: the key of the per-address connection limit and byte budget."""
    return str((connection.remote_address or ("?",))[0])


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


class PromptLimit:
    """The checkpoint's prompt budget: ``language.max_prompt_tokens`` tokens of its prompt template, counted
    with its own tokenizer, so an instruction that would fail inside the model is refused as a bad request.

    A policy without a language module (a test double) only gets the character cap ``MAX_PROMPT_CHARS``.
    """

    def __init__(self, encode: Any = None, max_tokens: int | None = None, byte_tokens: bool = False) -> None:
        self._encode = encode  # instruction -> token ids of the full prompt (template included)
        self.max_tokens = max_tokens
        self.max_chars = MAX_PROMPT_CHARS
        self._lock = threading.Lock()  # tokenizers are not promised to be thread-safe; encoding is µs
        if encode is not None and byte_tokens:
            # one token per UTF-8 byte: the budget in ASCII characters is exact
            self.max_chars = max(0, min(MAX_PROMPT_CHARS, max_tokens - len(encode(""))))

    @classmethod
    def of(cls, policy: Any) -> PromptLimit:
        language = getattr(policy, "language", None)
        encode = getattr(language, "encode_prompt", None)
        cfg = getattr(getattr(policy, "config", None), "language", None)
        if encode is None or cfg is None:
            return cls()
        from damvla.model.tokenizer import ByteTokenizer

        byte_tokens = isinstance(language.tokenizer, ByteTokenizer)  # loads the tokenizer now, not per request
        return cls(encode, int(cfg.max_prompt_tokens), byte_tokens)

    def as_metadata(self) -> dict[str, Any]:
        return {"max_chars": self.max_chars, "max_tokens": self.max_tokens}

    def check(self, key: str, instruction: str) -> None:
        """Raise :class:`ObservationError` when ``instruction`` does not fit the checkpoint's prompt."""
        if self._encode is None:
            return
        with self._lock:
            n = len(self._encode(instruction))
        if n > self.max_tokens:
            raise ObservationError(
                f"{key}: {len(instruction)} characters make {n} tokens with the prompt template; the limit is "
                f"{self.max_tokens} (the checkpoint's language.max_prompt_tokens; metadata "
                f"observation.{key}.max_chars={self.max_chars})"
            )


class ByteBudget:
    """A token bucket of received bytes per client address.

    Each address may send ``rate`` bytes per second on average and ``burst`` at once; ``charge`` returns how
    long to stop reading from it so that its average comes back within the rate. Shared by the connections
    of one address, and kept while it is in debt after they close, so reconnecting does not refill it."""

    def __init__(self, rate: float, burst: float, clock: Any = time.monotonic) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError(f"ByteBudget: rate={rate} and burst={burst} must be positive")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._state: dict[str, tuple[float, float]] = {}  # address -> (tokens, time of that count)

    def _tokens(self, address: str, now: float) -> float:
        tokens, then = self._state.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def charge(self, address: str, nbytes: int) -> float:
        """Take ``nbytes`` from ``address``'s budget; the seconds it must wait before the next read."""
        now = self.clock()
        tokens = self._tokens(address, now) - nbytes
        self._state[address] = (tokens, now)
        return max(0.0, -tokens / self.rate)

    def debt_s(self, address: str) -> float:
        """Seconds until ``address`` is out of debt (0: it may send now)."""
        if address not in self._state:
            return 0.0
        return max(0.0, -self._tokens(address, self.clock()) / self.rate)

    def forget_settled(self) -> None:
        """Drop the addresses whose budget is full again (bounds the table under many addresses)."""
        now = self.clock()
        for address in [a for a in self._state if self._tokens(a, now) >= self.burst]:
            del self._state[address]

    def __len__(self) -> int:
        return len(self._state)


class MeteredConnection(ServerConnection):
    """A websockets server connection whose received bytes are charged to its address's ``ByteBudget`` as
    they arrive, before websockets parses them. While the address is in debt the socket is not read at all
    (``pause_reading``), so a flood is held back by TCP in the sender's buffers instead of being received,
    unmasked and judged by the server's event loop, which also answers every other client: charging after
    a frame had been served let each new connection of a flooder push one or two limit-sized frames through
    before it paid, and in the soak those arrival bursts were what delayed the robots.

    websockets pauses and resumes the same transport for its own receive queue (``max_queue``); if it
    resumes reading while the address is still in debt, the next bytes to arrive pause it again."""

    server_owner: PolicyServer  # set by PolicyServer's connection factory

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.budget_address = _client_address(self)
        self._release_at: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.server_owner._bytes_arrived(self, len(data))
        super().data_received(data)

    def hold_reading(self, seconds: float) -> None:
        """Stop reading this socket; look again at the address's budget in ``seconds``."""
        if self.transport.is_closing():
            return
        self.transport.pause_reading()
        if self._release_at is None:
            self._release_at = self.loop.call_later(seconds, self._release)

    def _release(self) -> None:
        self._release_at = None
        if self.transport.is_closing():
            return
        wait = self.server_owner.byte_budget.debt_s(self.budget_address)
        if wait > 0:  # charged again meanwhile (a refused request's penalty)
            self._release_at = self.loop.call_later(wait, self._release)
        elif not self.recv_messages.paused:  # websockets' own receive queue may want it paused still
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._release_at is not None:
            self._release_at.cancel()
            self._release_at = None
        super().connection_lost(exc)


class PolicyServer:
    """Serve ``policy`` over openpi's websocket protocol.

    Args:
        policy: anything with ``.config`` (``PolicyConfig``), ``.metadata`` (dict) and
            ``.predict_action_chunk(batch, return_info=True) -> (actions (B,H,D), info)``.
        host, port: where to listen; loopback by default. ``port=0`` picks a free port (see ``.port``).
        api_key: when set, the websocket upgrade needs ``Authorization: Api-Key <api_key>`` (else HTTP 401).
        max_message_bytes: largest request frame; bigger frames close the connection (code 1009).
        obs_map: request keys -> batch keys; ``None`` is openpi's LIBERO keys (``ObservationMap.default``).
        max_connections: connections at once (counted from the upgrade request); more get HTTP 503.
        max_connections_per_address: of those, from one client address (the TCP peer).
        first_request_timeout_s, idle_timeout_s: close a connection (code 1008) that sends no request this
            long after connecting, or after its last reply; ``None`` or 0 disables either.
        max_bytes_per_second: average bytes one address may send (burst: one largest frame); beyond it the
            server pauses reading from that address and refuses its new connections (429) until it has
            paid. ``None`` or 0: no limit.
        max_batch: requests that waited for the model are served by one call of up to this many rows; 1
            serves them one by one, as openpi does.
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
        max_connections_per_address: int = DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        first_request_timeout_s: float | None = DEFAULT_FIRST_REQUEST_TIMEOUT_S,
        idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S,
        max_bytes_per_second: float | None = DEFAULT_MAX_BYTES_PER_SECOND,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if max_connections < 1:
            raise ValueError(f"max_connections={max_connections} must be >= 1")
        if max_connections_per_address < 1:
            raise ValueError(f"max_connections_per_address={max_connections_per_address} must be >= 1")
        for name, value in (("first_request_timeout_s", first_request_timeout_s), ("idle_timeout_s", idle_timeout_s)):
            if value is not None and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 (0 or None: no timeout)")
        if max_bytes_per_second is not None and max_bytes_per_second < 0:
            raise ValueError(f"max_bytes_per_second={max_bytes_per_second} must be >= 0 (0 or None: no limit)")
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
        # Each connection may hold about two max-size frames in memory; the caps keep a misbehaving fleet
        # (or a scanner) from exhausting the host or the slots. A place is taken when the upgrade request
        # passes the checks and given back when the TCP connection closes, whether or not the upgrade
        # completed, so simultaneous handshakes cannot overshoot the caps.
        self.max_connections = max_connections
        self.max_batch = max_batch
        self.max_connections_per_address = max_connections_per_address
        self.first_request_timeout_s = first_request_timeout_s or None
        self.idle_timeout_s = idle_timeout_s or None
        self._connections = 0
        self._per_address: dict[str, int] = {}
        self._releases: set[asyncio.Task] = set()
        self.byte_budget = (
            ByteBudget(max_bytes_per_second, max_message_bytes) if max_bytes_per_second else None
        )
        self._sleep = asyncio.sleep  # the throttle's wait (tests record it instead of waiting)
        cameras = self.config.vision.cameras
        self.obs_map = (obs_map or ObservationMap.default(cameras)).validate(cameras)
        self.image_size = self.config.vision.image_size
        self.state_dim = state_dim_of(self.config, getattr(policy, "metadata", None))
        if self.config.state_dim and (self.obs_map.state is None or not self.obs_map.state_required):
            raise ValueError(
                f"the checkpoint conditions on observation.state (state_dim={self.config.state_dim}): the "
                "observation map must name a required state key (\"state\" and \"state_required\": true)"
            )
        self.prompt_limit = PromptLimit.of(policy)
        self.device = _policy_device(policy)
        self.metadata = self._build_metadata()
        # One worker: the model runs one batch at a time. Requests wait in ``_waiting`` (arrival order) while
        # it is busy, and the next call takes as many of them as fit one batch.
        self._waiting: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="damvla-infer")
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=PREPARE_WORKERS, thread_name_prefix="damvla-prepare"
        )
        self._large_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="damvla-prepare-large", initializer=_lower_thread_priority
        )
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
                "maps_to": image_key(cam),
                "read_by_model": cam in cfg.vision.cameras,
            }
        if om.state is not None:
            observation[om.state] = {
                "dtype": "float32",
                "shape": [self.state_dim if self.state_dim is not None else -1],  # -1: any length
                "required": om.state_required,
                "maps_to": STATE_KEY,
                # the paper's DAM-VLA / CogACT condition on images + instruction only; state_dim > 0 adds it
                "read_by_model": bool(cfg.state_dim),
            }
        observation[om.prompt] = {"dtype": "str", "shape": [], "required": True, "maps_to": "task",
                                  **self.prompt_limit.as_metadata()}  # fmt: skip
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
            "cameras": list(cfg.vision.cameras),
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
            "max_batch": self.max_batch,
            "max_message_bytes": self.max_message_bytes,
            "limits": {
                "max_connections": self.max_connections,
                "max_connections_per_address": self.max_connections_per_address,
                "first_request_timeout_s": self.first_request_timeout_s,
                "idle_timeout_s": self.idle_timeout_s,
                "message": asdict(REQUEST_LIMITS),
            },
            "policy_metadata": _plain(getattr(self.policy, "metadata", None) or {}),
        }

    # ---- request path (thread-side, no asyncio) ----------------------------------------------
    def prepare(self, message: bytes) -> dict[str, Any]:
        """Decode and validate one binary frame into a batch of one; raises :class:`RequestError`."""
        try:
            obs = unpackb(message, max_bytes=self.max_message_bytes)
            return observation_to_batch(obs, self.obs_map, self.image_size, self.state_dim, self.prompt_limit.check)
        except (ProtocolError, ObservationError) as e:
            raise RequestError(f"damvla serve: bad request: {e}") from e

    def predict(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Run the policy on one prepared request; returns the reply map without ``server_timing``."""
        return self.predict_rows(batch)[0]

    def predict_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Run the policy once on a batch of B requests; one reply map per row (without ``server_timing``)."""
        rows = len(batch["task"])
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.policy.predict_action_chunk(batch, return_info=True)
        infer_ms = (time.perf_counter() - t0) * 1e3
        actions, info = out if isinstance(out, tuple) else (out, {})
        actions = torch.as_tensor(actions).detach().float().cpu().numpy()
        want = (rows, self.config.horizon, self.config.action_dim)
        if actions.shape != want:
            raise RuntimeError(f"policy returned actions of shape {actions.shape}, expected {want}")
        info = info if isinstance(info, dict) else {}

        def per_row(key: str, dtype: torch.dtype) -> torch.Tensor:
            value = info.get(key)
            if value is None:
                return torch.zeros(rows, dtype=dtype)
            return torch.as_tensor(value).detach().cpu().reshape(-1).to(dtype).expand(rows)  # (1,) broadcasts

        weights, heads = per_row("router_weight", torch.float32), per_row("head", torch.long)
        timing = _plain(info["timing"]) if isinstance(info.get("timing"), dict) else {}
        replies = []
        for i in range(rows):
            head_i = int(heads[i])
            replies.append({
                "actions": np.ascontiguousarray(actions[i], dtype=np.float32),  # (H, D), un-normalised
                "router_weight": float(weights[i]),
                "head": head_i,
                "head_name": HEAD_NAMES[head_i] if 0 <= head_i < len(HEAD_NAMES) else str(head_i),
                "policy_timing": {"infer_ms": infer_ms, "batch_size": rows, **timing},
            })  # fmt: skip
        return replies

    def predict_many(self, batches: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        """Serve requests that waited together with one model call (``batchable`` ones only); thread-side.

        Returns a reply or the exception per request. When the joint call fails, each request is run on its
        own, so one request the policy cannot handle fails alone instead of taking the others with it."""
        if len(batches) > 1:
            try:
                return self.predict_rows(collate(batches))
            except Exception:
                log.warning("inference on a batch of %d failed; running its requests one by one", len(batches),
                            exc_info=True)  # fmt: skip
        out: list[dict[str, Any] | Exception] = []
        for batch in batches:
            try:
                out.append(self.predict(batch))
            except Exception as e:  # reported to that request's client by _serve_connection
                out.append(e)
        return out

    # ---- websocket side ---------------------------------------------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """HTTP hook before the upgrade: health check, API-key check, connection limits."""
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
        address = _client_address(connection)
        if self.byte_budget is not None and (debt := self.byte_budget.debt_s(address)) > 0:
            retry = max(1, int(debt + 0.999))
            log.warning("refused %s: over its byte budget for %.1f s more (--max-mb-per-second)",
                        connection.remote_address, debt)  # fmt: skip
            response = connection.respond(
                http.HTTPStatus.TOO_MANY_REQUESTS,
                f"429 Too Many Requests: {address} sent more than the server's byte rate allows; retry in {retry} s\n",
            )
            response.headers["Retry-After"] = str(retry)
            return response
        if self._connections >= self.max_connections:
            log.warning("refused %s: %d connections open (--max-connections)", connection.remote_address,
                        self._connections)  # fmt: skip
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"503 Service Unavailable: {self._connections} connections open, the limit is {self.max_connections}\n",
            )
        if self._per_address.get(address, 0) >= self.max_connections_per_address:
            log.warning("refused %s: %d connections open from %s (--max-connections-per-address)",
                        connection.remote_address, self._per_address[address], address)  # fmt: skip
            return connection.respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                f"503 Service Unavailable: {self._per_address[address]} connections open from {address}, the "
                f"limit per address is {self.max_connections_per_address}\n",
            )
        # Take the place now; give it back when the TCP connection is gone, however it ends.
        self._connections += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        task = asyncio.get_running_loop().create_task(self._release_when_closed(connection, address))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)
        return None

    async def _release_when_closed(self, connection: ServerConnection, address: str) -> None:
        try:
            await connection.wait_closed()
        finally:
            self._connections -= 1
            left = self._per_address.get(address, 1) - 1
            if left > 0:
                self._per_address[address] = left
            else:
                self._per_address.pop(address, None)
                if self.byte_budget is not None:
                    self.byte_budget.forget_settled()

    async def _send_error(self, ws: ServerConnection, text: str) -> None:
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS] + " ... (truncated)"
        try:
            await ws.send(text)  # a str is sent as a TEXT frame: openpi clients raise on it
        except websockets.ConnectionClosed:
            pass

    async def _handler(self, ws: MeteredConnection) -> None:
        await self._serve_connection(ws)

    async def _next_message(self, ws: ServerConnection, first: bool) -> str | bytes | None:
        """The next frame, or ``None`` after closing a connection that stayed silent too long."""
        timeout = self.first_request_timeout_s if first else self.idle_timeout_s
        try:
            async with asyncio.timeout(timeout):  # None: no timeout
                return await ws.recv()  # cancel-safe: a frame arriving at the deadline is not lost
        except TimeoutError:
            if first:
                reason = f"no first request within {timeout:g} s of connecting (--first-request-timeout)"
            else:
                reason = f"idle for {timeout:g} s (--idle-timeout); reconnect to continue"
            log.info("closing %s: %s", ws.remote_address, reason)
            await ws.close(CloseCode.POLICY_VIOLATION, reason)
            return None

    def _bytes_arrived(self, connection: MeteredConnection, nbytes: int) -> None:
        """Charge bytes read from ``connection``'s socket; over budget, stop reading it until paid."""
        if self.byte_budget is None:
            return
        wait = self.byte_budget.charge(connection.budget_address, nbytes)
        if wait > 0:
            log.debug("not reading %s for %.2f s (--max-mb-per-second)", connection.budget_address, wait)
            connection.hold_reading(wait)

    async def _throttle(self, ws: MeteredConnection, penalty_bytes: int) -> None:
        """Charge a refused request's penalty, then wait out the address's debt (its sockets are not read
        meanwhile). Called before serving a frame and after answering one."""
        if self.byte_budget is None:
            return
        if penalty_bytes:
            self.byte_budget.charge(ws.budget_address, penalty_bytes)
        wait = self.byte_budget.debt_s(ws.budget_address)
        if wait > 0:
            ws.hold_reading(wait)
            log.debug("throttling %s for %.2f s (--max-mb-per-second)", ws.budget_address, wait)
            await self._sleep(wait)

    async def _infer(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The reply to one prepared request, from the model call that serves it (maybe beside others)."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future  # cancelled (the client left): _drain skips it

    def _next_group(self) -> list[tuple[dict[str, Any], asyncio.Future]]:
        """The oldest waiting request and, in arrival order, up to ``max_batch - 1`` more that batch with it."""
        self._waiting = [(b, f) for b, f in self._waiting if not f.done()]
        if not self._waiting:
            return []
        signature = batch_signature(self._waiting[0][0])
        group, rest = [], []
        for item in self._waiting:
            if len(group) < self.max_batch and batch_signature(item[0]) == signature:
                group.append(item)
            else:
                rest.append(item)
        self._waiting = rest
        return group

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while group := self._next_group():
            try:
                results = await loop.run_in_executor(self._infer_pool, self.predict_many, [b for b, _ in group])
            except asyncio.CancelledError:  # the server is stopping
                for _, future in group:
                    future.cancel()
                raise
            except Exception as e:  # e.g. the pool was shut down: every request of the group gets the error
                results = [e] * len(group)
            for (_, future), result in zip(group, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _serve_connection(self, ws: MeteredConnection) -> None:
        loop = asyncio.get_running_loop()
        log.info("client connected: %s", ws.remote_address)
        prev_total_ms: float | None = None
        first = True
        try:
            await ws.send(packb(self.metadata))
            while (message := await self._next_message(ws, first)) is not None:
                first, size, refused, batch = False, len(message), True, None
                await self._throttle(ws, 0)  # a frame that arrived in debt waits until it is paid
                t0 = time.perf_counter()
                if isinstance(message, str):
                    await self._send_error(
                        ws, "damvla serve: bad request: text frames are not part of the protocol; "
                        "send each observation as one binary msgpack map"
                    )
                else:
                    try:
                        pool = self._large_pool if size > LARGE_FRAME_BYTES else self._prepare_pool
                        batch = await loop.run_in_executor(pool, self.prepare, message)
                        t1 = time.perf_counter()
                        reply = await self._infer(batch)
                    except RequestError as e:
                        await self._send_error(ws, str(e))
                    except Exception:
                        # The policy failed on a valid request: report it as text, as openpi does, and keep
                        # serving; the next request may well succeed.
                        refused = False
                        log.exception("inference failed")
                        await self._send_error(ws, self._inference_error())
                    else:
                        refused = False
                        reply["policy_timing"]["preprocess_ms"] = (t1 - t0) * 1e3
                        reply["server_timing"] = {"infer_ms": (time.perf_counter() - t0) * 1e3}
                        if prev_total_ms is not None:
                            reply["server_timing"]["prev_total_ms"] = prev_total_ms
                        await ws.send(packb(reply))
                        prev_total_ms = (time.perf_counter() - t0) * 1e3
                # The frame's bytes were charged as they arrived; a refused one costs the penalty on top. The
                # wait comes after the answer, with the frame dropped: a throttled connection holds at most
                # the one frame queued behind this one while it waits.
                message = batch = None  # noqa: F841
                await self._throttle(ws, size * (BAD_REQUEST_PENALTY - 1) if refused else 0)
        except websockets.ConnectionClosed:
            pass
        finally:
            log.info("client disconnected: %s", ws.remote_address)

    def _connection_factory(self) -> type[MeteredConnection]:
        """websockets' ``create_connection``: a :class:`MeteredConnection` that charges this server's budget."""
        return type("PolicyServerConnection", (MeteredConnection,), {"server_owner": self})

    async def serve(self) -> None:
        """Listen until :meth:`stop` is called (or the task is cancelled)."""
        self._stop = asyncio.Event()
        async with serve(
            self._handler,
            self.host,
            self.port,
            compression=None,  # openpi's choice: payloads are already-compact arrays, deflate costs latency
            max_size=self.max_message_bytes,
            max_queue=RECEIVE_QUEUE,
            close_timeout=CLOSE_TIMEOUT_S,
            process_request=self._process_request,
            create_connection=self._connection_factory(),
            logger=_ws_log,
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
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
            self._large_pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        """Stop listening; safe to call from any thread."""
        if self._stop is not None and getattr(self, "_loop", None) is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


def limit_heap_retention(mmap_threshold: int = 4 << 20) -> bool:
    """glibc only: give freed request frames back to the OS instead of keeping them in the heap.

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MiB), after
    which frame-sized buffers come from per-thread heaps that are rarely trimmed: a server that once
    received a few max-size frames keeps hundreds of MB. A fixed threshold keeps blocks of
    ``mmap_threshold`` bytes or more in their own mappings, unmapped when freed. Returns False where
    ``mallopt`` is unavailable (musl, macOS, Windows): nothing changes there.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold)))
    except (OSError, AttributeError):
        return False


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

