"""`damvla serve CHECKPOINT`: serve a policy over openpi's websocket protocol (docs/serving.md)."""

from __future__ import annotations

import argparse
import logging
import os
import time

log = logging.getLogger("damvla.serve")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint",
        help="checkpoint folder (config.json + model.safetensors ...), or preset:NAME for randomly "
        "initialised weights (protocol smoke tests only)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DAMVLA_API_KEY"),
        help="require 'Authorization: Api-Key KEY' from clients (default: $DAMVLA_API_KEY; prefer the "
        "variable: a key on the command line is visible to other users in the process list)",
    )
    parser.add_argument("--max-message-mb", type=float, default=32.0, help="largest request frame in MiB")
    parser.add_argument(
        "--obs-map", default=None, help="observation map as inline JSON or a JSON file (docs/serving.md)"
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--max-connections", type=int, default=16,
                        help="open connections allowed at once; more are refused with HTTP 503 (default 16)")
    parser.add_argument(
        "--send-tracebacks", action="store_true",
        help="put the full traceback of an inference error in the reply, as openpi does (default: the "
        "exception's type and message; the server log always has the traceback)",
    )
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference at startup")


def _load_policy(checkpoint: str, device: str):  # -> DAMVLAPolicy (torch imported lazily)
    import torch

    from damvla.model.policy import DAMVLAPolicy

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
        policy = DAMVLAPolicy.from_pretrained(checkpoint)
    return policy.to(device).eval()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from damvla.serving.observation import ObservationMap
    from damvla.serving.protocol import packb
    from damvla.serving.server import PolicyServer, warmup_observation

    if args.max_message_mb <= 0:
        raise ValueError(f"--max-message-mb={args.max_message_mb}: must be positive")
    policy = _load_policy(args.checkpoint, args.device)
    obs_map = ObservationMap.load(args.obs_map, policy.config.vision.camera)
    server = PolicyServer(
        policy,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_message_bytes=int(args.max_message_mb * 2**20),
        obs_map=obs_map,
        send_tracebacks=args.send_tracebacks,
        max_connections=args.max_connections,
    )
    if args.host not in LOOPBACK and not server.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can drive the policy",
                    args.host)
    if not args.no_warmup:
        # The first call pays for CUDA context / kernel selection; pay it before a robot is waiting.
        t0 = time.perf_counter()
        server.predict(server.prepare(packb(warmup_observation(server))))
        log.info("warm-up inference: %.0f ms", (time.perf_counter() - t0) * 1e3)
    server.serve_forever()
    return 0
