"""Time ``damvla collect metaworld`` end to end and the per-frame / per-step costs behind it.

    .venv/bin/python benchmarks/bench_collect.py                      # pick-place-v3, 50 episodes, 2 workers
    .venv/bin/python benchmarks/bench_collect.py --suite mt10 --episodes 5 --release

Prints the wall time of the whole command (a fresh subprocess, as a user runs it: interpreter start,
worker spawn, rollouts, video encoding, finalize) and the dataset's size on disk; then the cost of one
128x128 render and one physics step, measured in this process on one core.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def per_frame_costs(
    task: str, camera: str | None, resolution: int, n: int = 200
) -> tuple[float, float, float]:
    """(render ms, physics ms, full env.step ms incl. render) averaged over ``n`` calls."""

    from damvla.envs.metaworld import DEFAULT_CAMERA, MetaWorldEnv, MetaWorldExpert

    env = MetaWorldEnv(task, camera or DEFAULT_CAMERA, resolution)
    expert = MetaWorldExpert(task)
    obs = env.reset(env.sample_initial_state(0))
    for _ in range(10):
        env.render()
    t = time.perf_counter()
    for _ in range(n):
        env.render()
    render_ms = (time.perf_counter() - t) / n * 1e3
    t = time.perf_counter()
    for _ in range(n):
        obs, *_ = env.step(expert.act(obs))
    step_ms = (time.perf_counter() - t) / n * 1e3
    env.close()
    blind = MetaWorldEnv(task, render=False)
    obs = blind.reset(blind.sample_initial_state(0))
    t = time.perf_counter()
    for _ in range(n):
        obs, *_ = blind.step(expert.act(obs))
    physics_ms = (time.perf_counter() - t) / n * 1e3
    blind.close()
    return render_ms, physics_ms, step_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", default="pick-place-v3")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--camera", default=None)
    p.add_argument("--release", action="store_true")
    p.add_argument("--keep", default=None, help="write the dataset here and keep it (default: a temp dir)")
    args = p.parse_args()

    tmp = None
    if args.keep:
        out = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_collect_")
        out = Path(tmp) / "ds"
    cmd = [sys.executable, "-m", "damvla.cli", "collect", "metaworld", "--suite", args.suite,
           "--episodes", str(args.episodes), "--workers", str(args.workers), "--resolution",
           str(args.resolution), "--out", str(out), "--no-progress"]  # fmt: skip
    if args.camera:
        cmd += ["--camera", args.camera]
    if args.release:
        cmd.append("--release")
    try:
        t = time.perf_counter()
        rc = subprocess.run(cmd, env={**os.environ}).returncode
        wall = time.perf_counter() - t
        if rc != 0:
            print(f"bench_collect: collect failed with exit code {rc}", file=sys.stderr)
            return rc
        size = dir_size(out)
        print(f"collect {args.suite} x {args.episodes} episodes, {args.workers} workers, {args.resolution}px: "
              f"{wall:.1f} s wall, {size / 2**20:.2f} MiB on disk ({out})")  # fmt: skip
        first = args.suite.split(",")[0]
        if first in ("mt10", "mt50", "grip"):
            first = "pick-place-v3"
        render_ms, physics_ms, step_ms = per_frame_costs(first, args.camera, args.resolution)
        print(f"per frame ({first}, 1 core): render {render_ms:.2f} ms, physics step {physics_ms:.2f} ms, "
              f"env.step incl. render + expert {step_ms:.2f} ms")  # fmt: skip
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
