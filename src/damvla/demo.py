"""`make demo`: the main job end to end on a CPU, in a few minutes.

1. collect a few scripted-expert demonstrations in Meta-World (LeRobot v3.0);
2. train the cpu preset on them briefly (frozen pretrained DINOv2-S, its features cached once per frame),
   to show the loss falling (curves as PNG);
3. evaluate the released checkpoint closed-loop on its tasks (videos with the router weight drawn on the
   frames, router-vs-phase plots, success with Wilson intervals);
4. write a report folder and print its path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from damvla.evaluation.report import render_markdown

REPO = Path(__file__).resolve().parents[2]
RELEASED = REPO / "checkpoints" / "damvla-cpu-grip3"
DEMO_TASKS = "pick-place-v3,push-v3"  # demonstrations collected and trained on in step 2


def _stage(i: int, n: int, text: str) -> float:
    print(f"\n=== [{i}/{n}] {text}", flush=True)
    return time.time()


def _run(argv: list[str]) -> None:
    from damvla.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"damvla demo: `damvla {' '.join(argv)}` failed with exit code {code}")


def _loss_summary(run_dir: Path) -> tuple[float, float, int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if len(rows) < 2:
        raise SystemExit(f"damvla demo: {run_dir / 'metrics.jsonl'} holds fewer than 2 logged losses")
    k = max(1, len(rows) // 5)
    first = sum(r["loss"] for r in rows[:k]) / k
    last = sum(r["loss"] for r in rows[-k:]) / k
    return first, last, int(rows[-1].get("step", len(rows)))


def _average(results: dict) -> str:
    avg = results.get("average") or results.get("overall") or {}
    rate = avg.get("success_rate")
    return "average success: n/a" if rate is None else f"average success {100 * rate:.1f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m damvla.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="report folder (default demo_output)")
    p.add_argument("--checkpoint", type=Path, default=RELEASED, help="checkpoint evaluated in step 3")
    p.add_argument("--demos", type=int, default=4, help="demonstrations per task in step 1")
    p.add_argument("--train-steps", type=int, default=80, help="optimiser steps in step 2")
    p.add_argument("--eval-episodes", type=int, default=10, help="closed-loop episodes per task in step 3")
    p.add_argument("--max-steps", type=int, default=300,
                   help="time limit per episode in step 3 (default 300, as in docs/results.md's cpu comparison)")
    p.add_argument("--eval-tasks", default=None, help="tasks for step 3 (default: the checkpoint's own)")
    args = p.parse_args(argv)

    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"damvla demo: no released checkpoint at {args.checkpoint} (config.json missing)")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_all = time.time()

    t = _stage(1, 4, f"collecting {args.demos} scripted-expert demonstrations per task ({DEMO_TASKS})")
    data = out / "data"
    _run(["collect", "metaworld", "--suite", DEMO_TASKS, "--episodes", str(args.demos), "--out", str(data)])
    print(f"    done in {time.time() - t:.0f} s -> {data}")

    t = _stage(2, 4, f"training the cpu DAM-VLA preset for {args.train_steps} steps on the CPU")
    run_dir = out / "train"
    _run([
        "train", "--preset", "cpu", "--dataset", str(data), "--out", str(run_dir),
        "--steps", str(args.train_steps), "--batch-size", "16", "--lr", "1e-3", "--warmup", "10",
        "--schedule", "constant", "--save-every", str(args.train_steps), "--log-every", "5",
        "--feature-cache", str(out / "feature_cache"), "state_dim=4",
    ])
    first, last, steps = _loss_summary(run_dir)
    print(f"    loss {first:.3f} -> {last:.3f} over {steps} steps ({time.time() - t:.0f} s)")

    released = json.loads((args.checkpoint / "metadata.json").read_text())
    trained = released.get("damvla", {}).get("recipe", {}).get("tasks") or DEMO_TASKS.split(",")
    tasks = args.eval_tasks or ",".join(trained)
    t = _stage(3, 4, f"closed-loop evaluation of the released checkpoint on {tasks}")
    eval_dir = out / "eval"
    _run([
        "eval", str(args.checkpoint), "--suite", tasks, "--episodes", str(args.eval_episodes),
        "--out", str(eval_dir), "--videos", "1", "--workers", "2", "--threads", "1", "--max-steps", str(args.max_steps),
        "--title", "released checkpoint (make demo)",
    ])
    results = json.loads((eval_dir / "results.json").read_text())
    print(f"    done in {time.time() - t:.0f} s; {_average(results)}")

    _stage(4, 4, "writing the report")
    report = _write_report(out, args, data, run_dir, eval_dir, (first, last, steps), time.time() - t_all)
    print(f"\ndamvla demo finished in {time.time() - t_all:.0f} s. Report: {report}")
    return 0


SHOWN_PLOTS = 6  # router plots drawn inline in the report; the rest are named by count and folder


def _plot_label(path: Path) -> str:
    """``plots/<task>/<seed>.png`` -> ``<task> <seed>`` (the seed alone repeats across tasks)."""
    return f"{path.parent.name} {path.stem}" if path.parent.name != "plots" else path.stem


def _write_report(
    out: Path, args: argparse.Namespace, data: Path, run_dir: Path, eval_dir: Path,
    loss: tuple[float, float, int], seconds: float,
) -> Path:
    videos = sorted(eval_dir.glob("videos/**/*.mp4"))
    plots = sorted(eval_dir.glob("plots/**/*.png"))
    summary = json.loads((data / "meta" / "info.json").read_text())
    lines = [
        "# damvla demo report",
        "",
        f"Made by `make demo` in {seconds:.0f} s on this machine (CPU).",
        "",
        "## 1. Demonstrations",
        f"`damvla collect metaworld --suite {DEMO_TASKS} --episodes {args.demos}`: "
        f"{summary['total_episodes']} episodes, {summary['total_frames']} frames in `{data.relative_to(out)}` "
        "(LeRobot v3.0).",
        "",
        "## 2. A short training run (cpu preset: frozen pretrained DINOv2-S, cached features)",
        f"Loss {loss[0]:.3f} (first fifth of the logged steps) -> {loss[1]:.3f} (last fifth) over {loss[2]} steps.",
        "",
        f"![loss curves]({(run_dir / 'loss_curves.png').relative_to(out)})",
        "",
        f"## 3. The released checkpoint, closed loop (`{args.checkpoint.name}`)",
        "",
        # eval's own report.md links relative to its folder; render the text without links for this page.
        render_markdown(json.loads((eval_dir / "results.json").read_text()), "").split("\n", 1)[1].strip(),
        "",
        "Videos (router weight and gripper command under each frame):",
        *[f"- [{v.relative_to(out)}]({v.relative_to(out)})" for v in videos],
        "",
        "Router weight against the phase labels (executed gripper commands; scripted expert from the same start):",
        *[f"![{_plot_label(pl)}]({pl.relative_to(out)})" for pl in plots[:SHOWN_PLOTS]],
        *([f"\n{len(plots) - SHOWN_PLOTS} more router plots in `{(eval_dir / 'plots').relative_to(out)}/`."]
          if len(plots) > SHOWN_PLOTS else []),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
