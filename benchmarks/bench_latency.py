"""Latency per action chunk for the tiny preset on the CPU, split into vision / language model / action head.

A thin wrapper over ``damvla bench latency`` (src/damvla/bench.py); extra arguments pass through:

    python benchmarks/bench_latency.py
    python benchmarks/bench_latency.py --runs 100 --dtype bf16
"""

from __future__ import annotations

import sys

from damvla.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "latency", "--preset", "tiny", "--device", "cpu", "--runs", "30", *sys.argv[1:]]))
