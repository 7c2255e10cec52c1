"""`damvla bench latency`: milliseconds per action chunk, split into vision, language model and action head.

    damvla bench latency --preset tiny --runs 50
    damvla bench latency --preset paper --device cuda --dtype bf16 --compile --cuda-graph

Weights are random (built from the preset's config; nothing is downloaded): latency does not depend on
their values. The stages are those of ``damvla.model.fast.FastPolicy``: vision = image checks + both
encoders; language model = prompt + projector + LLM; action head = router + the chosen head's 10 DDIM
steps with classifier-free guidance + un-normalisation. On CUDA, stage boundaries are CUDA events and
one synchronize per run, so the split does not add host syncs. The reference
``DAMVLAPolicy.predict_action_chunk`` is timed too, as a check on the total.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from damvla.config import PRESETS, PolicyConfig, preset
from damvla.keys import image_key

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
STAGES = ("vision", "language model", "action head (+router)")
INSTRUCTION = "pick up the cup"  # short enough for every preset's max_prompt_tokens with the byte tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    lat = sub.add_parser("latency", help="ms per action chunk: vision / language model / action head")
    lat.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    lat.add_argument("--ablation", default=None, help="a named row of the paper's Table VI (e.g. cogact)")
    lat.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    lat.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--compile", action="store_true", help="torch.compile the vision tower and the LLM")
    lat.add_argument("--cuda-graph", action="store_true", help="capture each head's DDIM loop as a CUDA graph")
    lat.add_argument("--routing", choices=("hard", "soft"), default=None, help="override inference.routing")
    lat.add_argument("--runs", type=int, default=20, help="timed runs (medians are reported)")
    lat.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation, graph capture)")
    lat.add_argument("--dynamic-prompt", action="store_true", help="pad prompts to the batch's longest, not max_prompt_tokens")
    lat.add_argument("--no-reference", action="store_true", help="skip timing DAMVLAPolicy.predict_action_chunk")
    lat.add_argument("--force", action="store_true", help="run the paper preset on CPU anyway (~35 GB RAM, slow)")


@dataclass
class LatencyResult:
    """Median milliseconds per action chunk."""

    stages: dict[str, float]  # STAGES -> ms
    total: float
    reference: float | None  # DAMVLAPolicy.predict_action_chunk, None if not timed

    def lines(self) -> list[str]:
        out = [f"  {name:<28} {ms:9.2f} ms" for name, ms in self.stages.items()]
        out.append(f"  {'total':<28} {self.total:9.2f} ms")
        if self.reference is not None:
            out.append(f"  {'reference predict_action_chunk':<28} {self.reference:9.2f} ms")
        return out


def bench_config(name: str, ablation: str | None = None, routing: str | None = None) -> PolicyConfig:
    """A preset made runnable with random weights: the byte tokenizer (the paper preset names a LLaMA
    tokenizer folder that a random-weight benchmark does not have)."""
    cfg = preset(name, ablation)
    cfg.language.tokenizer = "byte"
    cfg.language.pretrained_path = None
    cfg.vision.dinov2.pretrained_path = None
    if cfg.vision.siglip is not None:
        cfg.vision.siglip.pretrained_path = None
    if routing is not None:
        cfg.inference.routing = routing
    return cfg.validate()


def make_inputs(cfg: PolicyConfig, batch: int, device: torch.device | str, seed: int = 0) -> dict[str, Any]:
    """A random uint8 observation batch with one instruction per sample."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, generator=g)
    # every camera the policy reads gets the same frames: the cost, not the content, is measured
    out: dict[str, Any] = {image_key(c): images.to(device) for c in cfg.vision.cameras}
    return out | {"task": [INSTRUCTION] * batch}


class _Clock:
    """Stage timestamps: CUDA events on GPU (no syncs between stages), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def time_call(fn: Callable[[], Any], device: torch.device, runs: int, warmup: int) -> float:
    """Median ms of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        clock = _Clock(device)
        clock.mark()
        fn()
        clock.mark()
        times.append(clock.intervals_ms()[0])
    return statistics.median(times)


def measure_latency(
    cfg: PolicyConfig,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
    compile: bool = False,
    cuda_graph: bool = False,
    runs: int = 20,
    warmup: int = 3,
    static_prompt: bool = True,
    reference: bool = True,
) -> LatencyResult:
    """Build a random-weight policy from ``cfg`` and time its action-chunk prediction by stage."""
    from damvla.model.fast import FastPolicy
    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch.cuda.is_available() is False (no GPU, or a CPU build of torch)")
    if cuda_graph and dev.type != "cuda":
        raise ValueError("--cuda-graph needs --device cuda: CUDA graphs cannot be captured on the CPU")
    if batch < 1 or runs < 1 or warmup < 0:
        raise ValueError(f"--batch and --runs must be >= 1 and --warmup >= 0 (got {batch}, {runs}, {warmup})")
    torch.manual_seed(0)
    # Build directly on the target device: random init of the paper preset on the CPU alone takes minutes.
    with dev:
        policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), load_pretrained=False)
    fast = FastPolicy(policy, dtype=dtype, compile=compile, cuda_graph=cuda_graph, static_prompt=static_prompt)
    inputs = make_inputs(cfg, batch, dev)
    noise = torch.randn(batch, cfg.horizon, cfg.action_dim, device=dev)

    def staged(clock: _Clock) -> None:
        clock.mark()
        feats = fast.vision(inputs)
        clock.mark()
        f_cog, f_rea = fast.language(feats.patches, inputs["task"])
        clock.mark()
        fast.act(feats, f_cog, f_rea, noise)
        clock.mark()

    for _ in range(warmup):
        staged(_Clock(dev))
    per_stage: list[list[float]] = [[] for _ in STAGES]
    totals: list[float] = []
    for _ in range(runs):
        clock = _Clock(dev)
        staged(clock)
        ms = clock.intervals_ms()
        for acc, v in zip(per_stage, ms):
            acc.append(v)
        totals.append(sum(ms))
    ref = None
    if reference:
        ref = time_call(lambda: policy.predict_action_chunk(inputs, noise=noise), dev, runs, warmup)
    return LatencyResult(
        stages={name: statistics.median(v) for name, v in zip(STAGES, per_stage)},
        total=statistics.median(totals),
        reference=ref,
    )


def run(args: argparse.Namespace) -> int:
    if args.bench != "latency":  # argparse already restricts this; kept for new benches
        raise ValueError(f"unknown benchmark {args.bench!r}")
    if args.cuda_graph and args.device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda: CUDA graphs cannot be captured on the CPU")
    if args.preset == "paper" and args.device == "cpu":
        msg = (
            "the paper preset (~8.5B parameters: LLaMA-2-7B + DINOv2-L + SigLIP-so400m + two DiT-B) needs a GPU "
            "for meaningful latency; on the CPU it needs ~35 GB of RAM in fp32 and seconds to minutes per chunk"
        )
        if not args.force:
            raise ValueError(msg + ". Use --device cuda, or --force to run it here anyway")
        print(f"damvla bench latency: warning: {msg}", file=sys.stderr)
    cfg = bench_config(args.preset, args.ablation, args.routing)
    res = measure_latency(
        cfg, device=args.device, dtype=DTYPES[args.dtype], batch=args.batch, compile=args.compile,
        cuda_graph=args.cuda_graph, runs=args.runs, warmup=args.warmup, static_prompt=not args.dynamic_prompt,
        reference=not args.no_reference,
    )
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"damvla bench latency: preset {cfg.name}, ablation {args.ablation or 'damvla'}, "
        f"routing {cfg.inference.routing}, {where}, {args.dtype}, batch {args.batch}, "
        f"compile {'on' if args.compile else 'off'}, cuda-graph {'on' if args.cuda_graph else 'off'}, "
        f"torch {torch.__version__}; median of {args.runs} runs per action chunk"
    )
    for line in res.lines():
        print(line)
    return 0
