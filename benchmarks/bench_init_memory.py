"""Peak host memory per rank when 2 processes (gloo, CPU) start training from a checkpoint (issue #12).

    python benchmarks/bench_init_memory.py [--llm-hidden 1024 --llm-layers 4] [--parallel ddp fsdp]

A scaled-down paper-shaped model (LLaMA-like LLM with the 32064-token vocabulary, small DINOv2 + SigLIP,
two DiT-S heads) is saved once as a damvla checkpoint; then, for each way of building the model, two
fresh worker processes (``torchrun``'s environment, gloo) build it, load the checkpoint and wrap it
(DDP or FSDP2), and report the peak anonymous memory they added after importing torch and damvla
(sampled every 5 ms: what building and loading cost) and their peak RSS (``VmHWM``, which also counts the
memory-mapped checkpoint's page-cache pages). Ways of building:

- ``fresh``: today's fresh start, ``DAMVLAPolicy(cfg)`` randomly initialised on every rank (no weights read);
- ``load``: today's only way to load a whole damvla checkpoint (the ``--resume`` path): the model built
  without initialisation, ``load_file`` of model.safetensors, ``load_into``;
- ``init``: ``damvla train --init``'s path (``training.model.policy_from_checkpoint``): parameters on the
  meta device, sharded before allocation under FSDP2, the file read one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def bench_config(args: argparse.Namespace):  # -> PolicyConfig
    from damvla.config import DIT_SIZES, preset

    cfg = preset("small")
    lang = cfg.language
    lang.hidden_size, lang.num_layers, lang.intermediate_size = args.llm_hidden, args.llm_layers, args.llm_hidden * 11 // 4
    lang.num_heads = lang.num_kv_heads = args.llm_hidden // 64
    lang.vocab_size = 32064
    cfg.dit = DIT_SIZES["S"]
    return cfg.validate()


def worker(args: argparse.Namespace) -> None:
    import torch

    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer
    from damvla.training.distributed import init_distributed, shutdown_distributed, wrap_model
    from damvla.training.model import apply_freeze, policy_from_checkpoint

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    cfg = bench_config(args)
    norm = ActionNormalizer.identity(cfg.action_dim)
    floor, floor_anon = rss_kib("VmRSS"), rss_kib("RssAnon")
    # Anonymous memory is what building and loading cost; RSS (VmHWM) also counts the pages of the memory-
    # mapped checkpoint file, which the page cache shares between the ranks and the kernel can drop.
    peak_anon, done = [floor_anon], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak_anon.append(rss_kib("RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint)
    if args.mode == "fresh":
        policy = DAMVLAPolicy(cfg, norm, load_pretrained=False)
        apply_freeze(policy, "full")
        model = wrap_model(policy, ctx, args.parallel, False)
    elif args.mode == "load":
        from safetensors.torch import load_file

        from damvla.model.weights import load_into, skip_init

        with skip_init():
            policy = DAMVLAPolicy(cfg, norm, load_pretrained=False)
        state = load_file(str(ckpt / "model.safetensors"))
        load_into(policy, state, str(ckpt))
        del state
        apply_freeze(policy, "full")
        model = wrap_model(policy, ctx, args.parallel, False)
    else:
        fsdp = args.parallel == "fsdp"

        def shard(p: torch.nn.Module) -> torch.nn.Module:
            apply_freeze(p, "full")
            return wrap_model(p, ctx, "fsdp", False)

        policy, model = policy_from_checkpoint(ckpt, cfg, norm, {}, shard if fsdp else None, ctx.device)
        if model is None:
            apply_freeze(policy, "full")
            model = wrap_model(policy, ctx, args.parallel, False)
    ctx.barrier()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak_anon.append(rss_kib("RssAnon"))
    # A checksum of one weight the checkpoint sets, so every mode provably loaded (or built) a model.
    w = policy.language.llm.norm.weight
    local = w.to_local() if hasattr(w, "to_local") else w
    print(json.dumps({"rank": ctx.rank, "mode": args.mode, "parallel": args.parallel, "floor_kib": floor,
                      "peak_kib": rss_kib("VmHWM"), "floor_anon_kib": floor_anon, "peak_anon_kib": max(peak_anon), "seconds": round(seconds, 1),
                      "norm_weight_sum": float(local.detach().double().sum())}), flush=True)  # fmt: skip
    del model
    shutdown_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, mode: str, parallel: str, ckpt: Path) -> list[subprocess.Popen]:
    """Start the two workers of one configuration (every configuration runs at once: on a busy machine the
    wall time is what limits a benchmark; each process's peak RSS is its own)."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--parallel", parallel, "--checkpoint", str(ckpt),
               "--llm-hidden", str(args.llm_hidden), "--llm-layers", str(args.llm_layers)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    return procs


def collect(procs: list[subprocess.Popen], what: str) -> list[dict]:
    rows = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"{what}: a worker failed (exit {p.returncode})")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=("fresh", "load", "init"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"])
    ap.add_argument("--modes", nargs="+", default=["fresh", "load", "init"])
    ap.add_argument("--llm-hidden", type=int, default=1024)
    ap.add_argument("--llm-layers", type=int, default=4)
    args = ap.parse_args()
    if args.worker:
        args.parallel = args.parallel[0]
        worker(args)
        return 0
    import torch

    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    cfg = bench_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)
        n = sum(p.numel() for p in policy.parameters())
        with torch.no_grad():
            policy.language.llm.norm.weight.normal_()  # a weight whose loaded value the workers report
        want = float(policy.language.llm.norm.weight.detach().double().sum())
        ckpt = policy.save_pretrained(Path(tmp) / "ckpt")
        del policy
        print(f"model: {n / 1e6:.1f}M parameters, {4 * n / 2**20:.0f} MiB fp32; 2 gloo ranks on {os.cpu_count()} cores")
        print("| parallel | build | rank | peak anonymous memory added (MiB) | peak RSS incl. mapped file (MiB) | seconds |")
        print("|---|---|---|---|---|---|")
        runs = {(par, mode): launch(args, mode, par, ckpt) for par in args.parallel for mode in args.modes}
        for (par, mode), procs in runs.items():
            rows = collect(procs, f"{mode}/{par}")
            for r in rows:
                print(f"| {par} | {mode} | {r['rank']} | {(r['peak_anon_kib'] - r['floor_anon_kib']) / 1024:.0f} | "
                      f"{r['peak_kib'] / 1024:.0f} | {r['seconds']} |", flush=True)  # fmt: skip
            # every rank's part of one loaded weight, summed, against the file: the load put the right bytes in
            got = sum(r["norm_weight_sum"] for r in rows) / (1 if par == "fsdp" else len(rows))
            if mode != "fresh" and abs(got - want) > 1e-3 * max(1.0, abs(want)):
                raise SystemExit(f"{mode}/{par}: language.llm.norm.weight sums to {got}, the checkpoint holds {want}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
