"""Soak `damvla serve` on loopback: well-behaved robots alone, then the same robots under the attacks of
issue #13, against one server for a bounded time.

    python benchmarks/soak_server.py [--seconds 120] [--clients 16] [--rate 1.0] [--checkpoint preset:tiny]
                                     [--json soak.json] [-- extra `damvla serve` flags]

The server runs as a `damvla serve` subprocess (CPU, default flags apart from ``--max-connections``, which
leaves room for the attackers next to the good clients). The first half of the time the good clients run
alone; in the second half an attacker process runs beside them:

- ``bomb``: two connections sending msgpack bombs just under the server's frame limit (8 MiB by default: 8 million empty
  lists), back to back, never waiting for the answer;
- ``idle``: silent connections (their websockets library answers pings), as many as one address may hold,
  from two addresses, re-opened whenever the server closes them;
- ``buffer``: four connections that send frames of 15/16 of the limit (7.5 MiB) without ever reading a reply;
- ``invalid``: 2,000-character prompts and 7-D states (the checkpoint records 8), 5 per second.

The bomb and buffer attackers write pre-built frames to raw sockets (a zero mask, so the attacker spends no
CPU on masking: on a loopback soak the attackers share the server's CPUs). Each good client connects once
from its own loopback address (127.0.0.10, .11, ...), sends a LIBERO-style request (two 224x224 images, an
8-D state, a prompt; four pre-built ones in turn) every ``1/rate`` seconds and waits for the reply. A prober
fetches ``/healthz`` every 250 ms. Reported per phase: good requests, failures, p50/p99 latency, the largest
``/healthz`` time and the server's CPU seconds; and the server's peak RSS (the kernel's VmHWM) and its RSS
5 s after the attackers stopped. On a machine whose CPUs other jobs take, latencies measure the scheduler,
while CPU seconds still tell what the attacks cost. Linux only (/proc, 127/8).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import websockets
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from damvla.serving.protocol import packb, unpackb  # noqa: E402

DEFAULT_FRAME_MB = 8.0  # damvla serve's --max-message-mb default


def frame_limit(serve_args: list[str]) -> int:
    """The server's frame limit in bytes: its --max-message-mb among ``serve_args``, else the default."""
    mb = DEFAULT_FRAME_MB
    for i, a in enumerate(serve_args):
        if a == "--max-message-mb" and i + 1 < len(serve_args):
            mb = float(serve_args[i + 1])
        elif a.startswith("--max-message-mb="):
            mb = float(a.split("=", 1)[1])
    return int(mb * 2**20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (its threads included)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def save_checkpoint(folder: Path) -> str:
    """A tiny random-weights checkpoint whose metadata records an 8-D state, as training would."""
    code = ("import sys; from damvla.config import preset; from damvla.model.policy import DAMVLAPolicy; "
            "from damvla.normalize import ActionNormalizer; c = preset('tiny'); "
            "DAMVLAPolicy(c, ActionNormalizer.identity(c.action_dim), "
            "{'features': {'observation.state': [8], 'action': [7]}, 'state_key': 'observation.state'}"
            ").save_pretrained(sys.argv[1])")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    return str(folder)


def good_request(rng: np.random.Generator) -> bytes:
    return packb({
        "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(8).astype(np.float32),
        "prompt": "put the black bowl on the plate",
    })


async def ws_connect(port: int, source: str):
    return await connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None, open_timeout=60,
                         local_addr=(source, 0))  # fmt: skip


# ---- the good clients and the probes ------------------------------------------------------------------
class Record:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {"alone": [], "attacked": []}
        self.batch_size: dict[str, list[int]] = {"alone": [], "attacked": []}  # rows of the call that served it
        self.errors: dict[str, list[str]] = {"alone": [], "attacked": []}
        self.healthz: dict[str, list[float]] = {"alone": [], "attacked": []}
        self.healthz_errors: dict[str, int] = {"alone": 0, "attacked": 0}
        self.rss_kb: dict[str, int] = {"alone": 0, "attacked": 0}
        self.cpu_s: dict[str, float] = {"alone": 0.0, "attacked": 0.0}
        self.phase = "alone"
        self.phase_start = {"alone": time.monotonic()}
        self.when: dict[str, list[float]] = {"alone": [], "attacked": []}  # seconds into the phase, per latency
        self.attacker_cpu_s = 0.0


async def good_client(i: int, port: int, rate: float, stop: float, rec: Record) -> None:
    rng = np.random.default_rng(i)
    requests = [good_request(rng) for _ in range(4)]
    ws = None
    next_t = time.monotonic() + rng.uniform(0, 1 / rate)  # spread the clients over the period
    n = 0
    while time.monotonic() < stop:
        await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        next_t += 1 / rate
        phase = rec.phase
        msg = requests[n % len(requests)]
        n += 1
        t0 = time.perf_counter()
        try:
            if ws is None:
                ws = await ws_connect(port, f"127.0.0.{10 + i}")
                unpackb(await ws.recv(), limits=None)
            await ws.send(msg)
            reply = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(reply, str):
                rec.errors[phase].append(reply[:200])
                continue
            answer = unpackb(reply, limits=None)
            assert answer["actions"].shape[0] > 0
            rec.latency[phase].append((time.perf_counter() - t0) * 1e3)
            rec.when[phase].append(time.monotonic() - rec.phase_start[phase])
            rec.batch_size[phase].append(int(answer["policy_timing"].get("batch_size", 1)))
        except Exception as e:  # noqa: BLE001 - every failure of a good client is a finding
            rec.errors[phase].append(f"{type(e).__name__}: {e}"[:200])
            ws = None
    if ws is not None:
        await ws.close()


async def healthz_prober(port: int, stop: float, rec: Record) -> None:
    while time.monotonic() < stop:
        phase = rec.phase
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 10)
            await reader.read()
            writer.close()
            if b" 200 " not in status:
                rec.healthz_errors[phase] += 1
            rec.healthz[phase].append((time.perf_counter() - t0) * 1e3)
        except Exception:  # noqa: BLE001
            rec.healthz_errors[phase] += 1
        await asyncio.sleep(0.25)


async def rss_monitor(pid: int, stop: float, rec: Record) -> None:
    while time.monotonic() < stop:
        rec.rss_kb[rec.phase] = max(rec.rss_kb[rec.phase], status_kb(pid, "VmRSS"))
        await asyncio.sleep(0.1)


# ---- the attackers (their own process, so they never share a GIL with the good clients) ---------------
def bomb_frame(limit: int) -> bytes:
    per_list, lists = 100_000, (limit - 64) // 100_005
    inner = b"\xdd" + struct.pack(">I", per_list) + b"\x90" * per_list
    return b"\x81\xa1x" + b"\xdd" + struct.pack(">I", lists) + inner * lists


def raw_frame(payload: bytes) -> bytes:
    """One binary websocket frame as a client must send it: masked, here with the all-zero mask."""
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else (b"\xfe" + struct.pack(">H", n) if n < 65536 else
                                              b"\xff" + struct.pack(">Q", n))  # fmt: skip
    return b"\x82" + size + b"\x00\x00\x00\x00" + payload


class UpgradeRefused(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


async def raw_connect(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())  # fmt: skip
    status = await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    if b" 101 " not in status:
        writer.close()
        words = status.split()
        raise UpgradeRefused(words[1].decode(errors="replace") if len(words) > 1 else "?")
    return reader, writer


def refused(counts: dict, status: object) -> None:
    """An attacker's connection refused at the upgrade: 503 (connection limits) or 429 (byte budget)."""
    counts[f"refused_http_{status}"] = counts.get(f"refused_http_{status}", 0) + 1


async def attack_frames(port: int, source: str, frame: bytes, counts: dict, name: str) -> None:
    """Send ``frame`` back to back on a raw connection; count the error replies that come back."""
    while True:
        try:
            reader, writer = await raw_connect(port, source)
        except UpgradeRefused as e:
            refused(counts, e.status)
            await asyncio.sleep(1.0)
            continue
        except OSError:
            await asyncio.sleep(0.5)
            continue

        async def count_replies(r: asyncio.StreamReader) -> None:
            while chunk := await r.read(1 << 16):
                counts[f"{name}_refused"] += chunk.count(b"bad request")

        counter = asyncio.create_task(count_replies(reader)) if name == "bomb" else None
        try:
            while True:
                writer.write(frame)
                await writer.drain()  # TCP back-pressure: the server reads one frame at a time
                counts[f"{name}_frames_sent"] += 1
        except OSError:
            counts[f"{name}_closed"] += 1
        finally:
            if counter is not None:
                counter.cancel()
            writer.close()
        await asyncio.sleep(0.5)


async def attack_idle(port: int, source: str, counts: dict) -> None:
    while True:
        try:
            ws = await ws_connect(port, source)
            await ws.recv()
            counts["idle_opened"] += 1
            await ws.wait_closed()  # answers pings, sends nothing
            counts["idle_closed_by_server"] += 1
        except websockets.InvalidStatus as e:
            refused(counts, e.response.status_code)
            await asyncio.sleep(1.0)
        except (OSError, websockets.ConnectionClosed):
            await asyncio.sleep(0.5)


async def attack_invalid(port: int, source: str, counts: dict) -> None:
    rng = np.random.default_rng(99)
    long_prompt = {**unpackb(good_request(rng)), "prompt": "pick up the bowl " * 118}  # 2,006 characters
    long_prompt["prompt"] = long_prompt["prompt"][:2000]
    bad_state = {**unpackb(good_request(rng)), "observation/state": np.zeros(7, np.float32)}
    frames = [packb(long_prompt), packb(bad_state)]
    while True:
        try:
            ws = await ws_connect(port, source)
            await ws.recv()
            while True:
                for frame in frames:
                    await ws.send(frame)
                    reply = await ws.recv()
                    counts["invalid_refused" if isinstance(reply, str) else "invalid_accepted"] += 1
                    await asyncio.sleep(0.2)
        except websockets.InvalidStatus as e:
            refused(counts, e.response.status_code)
            await asyncio.sleep(1.0)
        except (OSError, websockets.ConnectionClosed):
            await asyncio.sleep(0.5)


ATTACKS = ("bomb", "idle", "buffer", "invalid")


def attacker_main(port: int, per_address: int, result: mp.Queue, attacks: tuple[str, ...], limit: int) -> None:
    counts: dict[str, int] = {k: 0 for k in (
        "bomb_frames_sent", "bomb_refused", "bomb_closed", "idle_opened", "idle_closed_by_server",
        "buffer_frames_sent", "buffer_closed", "invalid_refused", "invalid_accepted")}
    bomb = raw_frame(bomb_frame(limit))
    buffer = raw_frame(packb({"pad": bytes(limit // 16 * 15)}))

    async def run() -> None:
        tasks = []
        if "bomb" in attacks:
            tasks += [attack_frames(port, "127.0.0.200", bomb, counts, "bomb") for _ in range(2)]
        if "idle" in attacks:
            tasks += [attack_idle(port, f"127.0.0.{201 + a}", counts) for a in range(2) for _ in range(per_address)]
        if "buffer" in attacks:
            tasks += [attack_frames(port, "127.0.0.203", buffer, counts, "buffer") for _ in range(4)]
        if "invalid" in attacks:
            tasks.append(attack_invalid(port, "127.0.0.204", counts))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        running = [asyncio.create_task(t) for t in tasks]
        await stop.wait()
        for t in running:
            t.cancel()

    asyncio.run(run())
    result.put(counts)


# ---- the run -------------------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


async def soak(args: argparse.Namespace, port: int, pid: int) -> tuple[Record, dict]:
    rec = Record()
    start = rec.phase_start["alone"] = time.monotonic()
    half, stop = start + args.seconds / 2, start + args.seconds
    tasks = [asyncio.create_task(good_client(i, port, args.rate, stop, rec)) for i in range(args.clients)]
    tasks += [asyncio.create_task(healthz_prober(port, stop, rec)), asyncio.create_task(rss_monitor(pid, stop, rec))]
    cpu0 = cpu_seconds(pid)
    await asyncio.sleep(max(0.0, half - time.monotonic()))
    cpu1 = cpu_seconds(pid)
    rec.cpu_s["alone"] = cpu1 - cpu0
    rec.phase_start["attacked"] = time.monotonic()
    rec.phase = "attacked"
    result = mp.get_context("spawn").Queue()
    attacker = mp.get_context("spawn").Process(target=attacker_main, args=(port, args.per_address, result, args.attacks,
                                                                             frame_limit(args.serve_args)))
    attacker.start()
    await asyncio.gather(*tasks)
    rec.cpu_s["attacked"] = cpu_seconds(pid) - cpu1
    rec.attacker_cpu_s = cpu_seconds(attacker.pid)  # the attackers share the machine's CPUs on loopback
    os.kill(attacker.pid, signal.SIGTERM)
    counts = await asyncio.to_thread(result.get, True, 30)
    attacker.join(10)
    return rec, counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=120.0, help="total time; the attacks run in the second half")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second per good client")
    p.add_argument("--checkpoint", default=None,
                   help="what to serve (default: a tiny random-weights checkpoint recording an 8-D state)")
    p.add_argument("--per-address", type=int, default=8, help="the server's --max-connections-per-address")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help=f"comma-separated subset of {','.join(ATTACKS)} for the second half (default: all)")
    p.add_argument("serve_args", nargs="*", help="extra `damvla serve` flags (after --)")
    args = p.parse_args()
    args.attacks = tuple(a for a in args.attacks.split(",") if a)
    if unknown := set(args.attacks) - set(ATTACKS):
        p.error(f"--attacks: unknown {sorted(unknown)}; choose from {', '.join(ATTACKS)}")

    tmp = tempfile.TemporaryDirectory(prefix="damvla-soak-")
    label = args.checkpoint
    if args.checkpoint is None:
        args.checkpoint, label = save_checkpoint(Path(tmp.name) / "tiny"), "tiny, random weights, 8-D state"
    port = free_port()
    cmd = [sys.executable, "-m", "damvla.cli", "serve", args.checkpoint, "--port", str(port), "--device", "cpu",
           "--max-connections", str(args.clients + 3 * args.per_address),
           "--max-connections-per-address", str(args.per_address), *args.serve_args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    log = open(Path(args.json or "soak").with_suffix(".server.log"), "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}; see {log.name}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    if b" 200 " in s.recv(100):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 900 s")
            time.sleep(0.5)
        rss_ready = status_kb(server.pid, "VmRSS")
        rec, counts = asyncio.run(soak(args, port, server.pid))
        peak_kb = status_kb(server.pid, "VmHWM")
        time.sleep(5)  # the attackers are gone: is their memory given back?
        rss_after = status_kb(server.pid, "VmRSS")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    out = {
        "seconds": args.seconds, "clients": args.clients, "rate_hz": args.rate, "checkpoint": label,
        "cpus": os.cpu_count(), "serve_args": args.serve_args, "server_rss_ready_mb": rss_ready / 1024, "server_peak_rss_mb": peak_kb / 1024,
        "server_rss_5s_after_attacks_mb": rss_after / 1024,
        "attacks_run": list(args.attacks), "frame_limit_mb": frame_limit(args.serve_args) / 2**20, "attacker_cpu_s": rec.attacker_cpu_s, "attacks": counts, "phases": {},
    }
    for phase in ("alone", "attacked"):
        lat, hz = rec.latency[phase], rec.healthz[phase]
        out["phases"][phase] = {
            "good_requests": len(lat), "good_failures": len(rec.errors[phase]),
            "failure_examples": sorted(set(rec.errors[phase]))[:5],
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat, default=None),
            "healthz_probes": len(hz), "healthz_failures": rec.healthz_errors[phase],
            "healthz_p99_ms": percentile(hz, 99), "healthz_max_ms": max(hz, default=None),
            "peak_rss_mb": rec.rss_kb[phase] / 1024,
            "mean_batch_size": float(np.mean(rec.batch_size[phase])) if rec.batch_size[phase] else None,
            "server_cpu_s": rec.cpu_s[phase], "wall_s": args.seconds / 2,
            # when the tail happened: a burst shows as many slow replies at one moment
            "slowest": [{"at_s": round(t, 2), "ms": round(ms, 1)} for ms, t in
                        sorted(zip(lat, rec.when[phase]), reverse=True)[:2 * max(1, len(lat) // 100)]],
        }
    a, b = out["phases"]["alone"], out["phases"]["attacked"]
    out["acceptance"] = {
        "p99_within_2x": bool(a["p99_ms"] and b["p99_ms"] and b["p99_ms"] <= 2 * a["p99_ms"]),
        "no_good_request_failed": a["good_failures"] == 0 and b["good_failures"] == 0,
        "peak_rss_under_1.5GB": out["server_peak_rss_mb"] < 1.5 * 1024,
        "healthz_under_100ms": all(p["healthz_max_ms"] is not None and p["healthz_max_ms"] < 100
                                   and p["healthz_failures"] == 0 for p in (a, b)),  # fmt: skip
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
