"""`damvla serve CHECKPOINT`: serve a policy over openpi's websocket protocol (docs/serving.md)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("damvla.serve")

DEFAULT_PORT = 8000  # openpi's
DEFAULT_MAX_BATCH = 8  # the server's default (damvla.serving.server, which imports torch: not at parse time)


def port_number(text: str) -> int:
    """argparse type of ``--port``: an integer in 0..65535 (0: the OS picks a free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 0..65535")
    return port


def check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` once and release it, so a taken port or an unknown host fails in a moment
    instead of after the model has loaded; raises ``ValueError`` naming both. Port 0 always binds."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    for family, type_, proto, _, addr in infos:  # the server binds every address the host resolves to
        with socket.socket(family, type_, proto) as sock:
            # As asyncio's server does: a port left in TIME_WAIT by a previous run is free to bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
            except OSError as e:
                hint = " (another server is listening there?); pick another --port, or --port 0" if (
                    e.errno == errno.EADDRINUSE) else ""  # fmt: skip
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False  # "" binds every interface
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_open_bind(host: str, api_key: str | None, allow_no_key: bool) -> None:
    """Refuse to listen beyond loopback without a key, unless the user said so (docs/serving.md)."""
    if api_key or allow_no_key or is_loopback(host):
        return
    raise ValueError(
        f"--host {host!r} listens beyond this machine, without an API key: anyone who can reach the port "
        "could drive the robot. Set DAMVLA_API_KEY (clients send 'Authorization: Api-Key <key>'), or pass "
        "--allow-no-key to serve without one on a network you trust"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder (config.json + model.safetensors ...), a training run folder (its latest "
        "checkpoint), or preset:NAME for randomly initialised weights (protocol smoke tests only)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 for all)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"TCP port, 0..65535 (default {DEFAULT_PORT}, openpi's; 0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DAMVLA_API_KEY"),
        help="require 'Authorization: Api-Key KEY' from clients (default: $DAMVLA_API_KEY; prefer the "
        "variable: a key on the command line is visible to other users in the process list)",
    )
    parser.add_argument("--max-message-mb", type=float, default=8.0,
                        help="largest request frame in MiB; a larger one closes the connection (default 8: four raw "
                        "640x480 cameras fit; raise it for more, or send images at the model's size)")  # fmt: skip
    parser.add_argument(
        "--obs-map", default=None, help="observation map as inline JSON or a JSON file (docs/serving.md)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: cuda if available)")
    parser.add_argument(
        "--allow-no-key", action="store_true",
        help="listen beyond loopback (--host 0.0.0.0 ...) without an API key, as openpi's server does; "
        "without this flag such a bind is refused",
    )
    parser.add_argument("--max-connections", type=int, default=16,
                        help="open connections allowed at once; more are refused with HTTP 503 (default 16)")
    parser.add_argument("--max-connections-per-address", type=int, default=8,
                        help="of those, from one client address; behind a reverse proxy every client has the "
                        "proxy's address (default 8)")  # fmt: skip
    parser.add_argument("--max-mb-per-second", type=float, default=32.0, metavar="MIB",
                        help="average request MiB/s one client address may send (bursts of one largest frame "
                        "pass at once), counted as the bytes arrive; beyond it the server stops reading from that "
                        "address and answers its new connections 429 until the average is back within the rate, so "
                        "TCP back-pressure slows the sender; 0: no limit (default 32)")  # fmt: skip
    parser.add_argument("--first-request-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="close a connection that sends no request this long after connecting; 0: never "
                        "(default 30)")  # fmt: skip
    parser.add_argument("--idle-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="close a connection that sends no request this long after its last reply; 0: never "
                        "(default 300)")  # fmt: skip
    parser.add_argument(
        "--send-tracebacks", action="store_true",
        help="put the full traceback of an inference error in the reply, as openpi does (default: the "
        "exception's type and message; the server log always has the traceback)",
    )
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                        help="requests that arrive while the model is busy are served by its next call, up to N "
                        "at once; nothing waits to fill a batch; 1: one request per call, as openpi "
                        f"(default {DEFAULT_MAX_BATCH})")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads for inference (default: all cores but one on --device cpu, so "
                        "that receiving and decoding requests keep a core; torch's default otherwise)")  # fmt: skip
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference at startup")


def inference_threads(requested: int | None, policy: Any) -> int | None:
    """torch's CPU threads for serving: ``--threads``, else every core but one when the model runs on the CPU
    (torch takes them all, and then the event loop and the request decoders queue behind its threads, which
    is what a robot's latency tail is made of). ``None``: leave torch's choice (a GPU model)."""
    if requested is not None:
        return requested
    device = next(iter(policy.parameters()), None)
    if device is not None and device.device.type != "cpu":
        return None
    return max(1, (os.cpu_count() or 1) - 1)


def _load_policy(checkpoint: str, device: str):  # -> DAMVLAPolicy (torch imported lazily)
    import torch

    from damvla.evaluate import check_device, resolved_checkpoint
    from damvla.model.policy import DAMVLAPolicy

    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if checkpoint.startswith("preset:"):
        from damvla.config import preset
        from damvla.normalize import ActionNormalizer

        cfg = preset(checkpoint.removeprefix("preset:"))
        log.warning("serving RANDOM weights of preset %r: the actions are meaningless", cfg.name)
        # identity stats: actions come back in normalised units, which is all a smoke test needs
        policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), {"checkpoint": checkpoint})
    else:
        # A run folder resolves to its latest checkpoint: say which one is served.
        folder, step = resolved_checkpoint(checkpoint)
        log.info("checkpoint %s -> %s (step %s)", checkpoint, folder, "unknown" if step is None else step)
        policy = DAMVLAPolicy.from_pretrained(folder)
    return policy.to(device).eval()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from damvla.serving.observation import ObservationMap
    from damvla.serving.protocol import packb
    from damvla.serving.server import PolicyServer, limit_heap_retention, warmup_observation

    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb={args.max_message_mb}: must be positive")
    for flag in ("max_connections", "max_connections_per_address", "max_batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be at least 1")
    for flag in ("first_request_timeout", "idle_timeout", "max_mb_per_second"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 0 (0: no limit)")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads}: must be at least 1")
    check_open_bind(args.host, args.api_key, args.allow_no_key)
    check_bindable(args.host, args.port)  # seconds before the model has loaded, not after
    policy = _load_policy(args.checkpoint, args.device)
    threads = inference_threads(args.threads, policy)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        log.info("inference on %d CPU thread(s) (--threads)", threads)
    obs_map = ObservationMap.load(args.obs_map, policy.config.vision.cameras)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_message_bytes=int(args.max_message_mb * 2**20),
        obs_map=obs_map,
        send_tracebacks=args.send_tracebacks,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        first_request_timeout_s=args.first_request_timeout,
        idle_timeout_s=args.idle_timeout,
        max_bytes_per_second=args.max_mb_per_second * 2**20,
        max_batch=args.max_batch,
    )
    if not server.api_key and not is_loopback(args.host):
        log.warning("listening on %s without an API key (--allow-no-key): anyone who can reach this port can "
                    "drive the policy", args.host)  # fmt: skip
    limit_heap_retention()  # after the model load: its large blocks are unaffected
    if not args.no_warmup:
        # The first call pays for CUDA context / kernel selection; pay it before a robot is waiting.
        t0 = time.perf_counter()
        server.predict(server.prepare(packb(warmup_observation(server))))
        log.info("warm-up inference: %.0f ms", (time.perf_counter() - t0) * 1e3)
    server.serve_forever()
    return 0
