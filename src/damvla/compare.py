"""`damvla compare`: one table from several `damvla eval` runs (e.g. DAM-VLA against the CogACT
baseline), with the difference to a baseline and its 95% interval, the training curves and the router
accuracy. Written into a results page section by the command, never by hand.

    damvla compare --run damvla=eval/dam:runs/dam --run cogact=eval/cog:runs/cog --baseline cogact \\
        --title "..." --append-results docs/results.md --figures docs/figures [--keep-records docs/records/grip3]

Run folders and evaluation folders are large and live outside the repository, but a multi-seed table is
built over several sessions. ``--keep-records DIR`` copies what this command reads of each run (the
evaluation's results, episodes and initial states; the training metrics and the evaluated checkpoint's
configs, no weights) into ``DIR/<row>_<seed>/``, a few hundred kB to commit; ``--run NAME=DIR/<row>_<seed>``
reads such a record back in place of the two folders. A training folder is kept once: rows evaluating the
same run (an inference sweep), or a run already kept in another record, refer to that copy by a relative
path in their ``record.json`` (``train_record``, ``eval_record``) instead of holding one of their own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from damvla.evaluation import placement
from damvla.evaluation.report import append_section, section_id
from damvla.evaluation.stats import (
    difference_interval,
    format_difference,
    mcnemar_exact_p,
    paired_difference_interval,
    wilson_interval,
)
from damvla.training.config import TrainConfig
from damvla.training.logger import read_metrics


@dataclass
class Run:
    name: str
    eval_dir: Path
    train_dir: Path | None
    results: dict[str, Any]
    metrics: list[dict[str, Any]]
    episodes: list[dict[str, Any]]
    record_dir: Path | None = None  # the kept record this run was read from, if any


RECORD_FILE = "record.json"
EPISODES_GZ = "episodes.jsonl.gz"


def parse_run(spec: str) -> Run:
    """``NAME=EVAL_DIR[:TRAIN_DIR]``, or ``NAME=RECORD_DIR`` (a folder written by ``--keep-records``)."""
    if "=" not in spec:
        raise ValueError(f"--run {spec!r}: expected NAME=EVAL_DIR[:TRAIN_DIR]")
    name, rest = spec.split("=", 1)
    eval_s, _, train_s = rest.partition(":")
    eval_dir = Path(eval_s)
    record_dir = None
    if not train_s and (eval_dir / RECORD_FILE).is_file():
        record_dir = eval_dir
        eval_dir, train_dir_s = _record_parts(name, record_dir)
        train_s = "" if train_dir_s is None else str(train_dir_s)
    res = eval_dir / "results.json"
    if not res.is_file():
        raise FileNotFoundError(f"--run {name}: {res} does not exist (run `damvla eval` first)")
    results = json.loads(res.read_text())
    if results.get("complete") is False:
        done, planned = len(results.get("episodes") or []), results.get("episodes_planned", "?")
        raise ValueError(
            f"--run {name}: {res} is an interrupted evaluation ({done} of {planned} episodes); finish it with "
            "`damvla eval ... --resume` before comparing"
        )
    eps_file, eps_gz = eval_dir / "episodes.jsonl", eval_dir / EPISODES_GZ
    text = eps_file.read_text() if eps_file.is_file() else gzip.decompress(eps_gz.read_bytes()).decode() if eps_gz.is_file() else ""
    episodes = [json.loads(x) for x in text.splitlines() if x.strip()]
    train_dir = Path(train_s) if train_s else None
    metrics: list[dict[str, Any]] = []
    if train_dir is not None:
        mf = train_dir / "metrics.jsonl"
        if not mf.is_file():
            raise FileNotFoundError(f"--run {name}: {mf} does not exist (is {train_dir} a `damvla train` run?)")
        by_step = {}
        for row in read_metrics(mf):
            if "step" in row and "loss" in row:
                by_step[row["step"]] = row  # a resumed run re-logs steps: keep the last
        metrics = [by_step[s] for s in sorted(by_step)]
        # The run may have trained on after the evaluated checkpoint: curves and accuracies stop at it.
        folder = _evaluated_step_folder(results)
        if folder is not None:
            metrics = [row for row in metrics if row["step"] <= int(folder.removeprefix("step-"))]
    return Run(name, eval_dir, train_dir, results, metrics, episodes, record_dir)


def _record_parts(name: str, record_dir: Path) -> tuple[Path, Path | None]:
    """The evaluation and training folders of a kept record: its own ``eval/`` and ``train/``, or the
    other record's folders its ``record.json`` refers to."""
    info = json.loads((record_dir / RECORD_FILE).read_text())
    parts: list[Path | None] = []
    for key, own in (("eval_record", "eval"), ("train_record", "train")):
        if info.get(key):
            target = record_dir / info[key]
            if not target.is_dir():
                raise FileNotFoundError(
                    f"--run {name}: {record_dir / RECORD_FILE} refers to {info[key]!r} ({target}), which does not "
                    "exist: that record was moved or deleted; restore it, or keep this row's record again from its run folders"
                )
            parts.append(target)
        else:
            parts.append(record_dir / own if (record_dir / own).is_dir() else None)
    eval_dir, train_dir = parts
    if eval_dir is None:
        raise FileNotFoundError(f"--run {name}: {record_dir} is a record without an evaluation (no eval/ folder)")
    return eval_dir, train_dir


def _is_kept_folder(path: Path) -> bool:
    """Whether ``path`` is the ``eval/`` or ``train/`` folder of a kept record."""
    return path.name in ("eval", "train") and (path.parent / RECORD_FILE).is_file()


def _evaluated_step_folder(results: dict[str, Any]) -> str | None:
    """The ``step-N`` folder name of the checkpoint an evaluation ran, from its recorded path."""
    m = re.search(r"step-\d+", str((results.get("config") or {}).get("checkpoint", "")))
    return m.group(0) if m else None


def _latest_checkpoint(train_dir: Path) -> Path | None:
    latest = train_dir / "checkpoints" / "latest"
    return train_dir / "checkpoints" / latest.read_text().strip() if latest.is_file() else None


def _evaluated_checkpoint(run: Run) -> Path | None:
    """The training run's checkpoint folder the evaluation used (else its latest)."""
    if run.train_dir is None:
        return None
    folder = _evaluated_step_folder(run.results)
    if folder is not None and (run.train_dir / "checkpoints" / folder).is_dir():
        return run.train_dir / "checkpoints" / folder
    return _latest_checkpoint(run.train_dir)


_CONFIG_FILES = ("train_config.json", "metadata.json", "config.json", "normalization.json")


def _copy_checkpoint_configs(ckpt: Path, train_record: Path) -> None:
    dest = train_record / "checkpoints" / ckpt.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in _CONFIG_FILES:
        if (ckpt / f).is_file():
            shutil.copy2(ckpt / f, dest / f)


def keep_record(run: Run, root: Path, kept_trains: dict[Path, Path] | None = None) -> Path:
    """Copy the small files ``parse_run`` reads of ``run`` into ``root/<row>_<seed>/`` (replacing it).

    A training folder is copied once: ``kept_trains`` maps each training folder already kept (by this
    command) to its copy, and a run whose training folder is there, or is itself a kept record's, refers
    to that copy instead; likewise an evaluation that is already a kept record's."""
    kept_trains = {} if kept_trains is None else kept_trains
    dest = root / run.name.replace("/", "_")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info: dict[str, Any] = {"name": run.name, "eval_dir": str(run.eval_dir),
                            "train_dir": None if run.train_dir is None else str(run.train_dir)}  # fmt: skip
    if _is_kept_folder(run.eval_dir) and run.eval_dir.resolve().parent != dest.resolve():
        info["eval_record"] = _rel(run.eval_dir, dest)
    else:
        (tmp / "eval").mkdir()
        shutil.copy2(run.eval_dir / "results.json", tmp / "eval" / "results.json")
        if (run.eval_dir / "initial_states.jsonl").is_file():
            shutil.copy2(run.eval_dir / "initial_states.jsonl", tmp / "eval" / "initial_states.jsonl")
        if run.episodes:  # per-step logs: the bulk of a record, so compressed (mtime 0: same bytes every time)
            text = "".join(json.dumps(ep) + "\n" for ep in run.episodes).encode()
            (tmp / "eval" / EPISODES_GZ).write_bytes(gzip.compress(text, mtime=0))
    ckpt = _evaluated_checkpoint(run)
    if run.train_dir is not None:
        source = run.train_dir.resolve()
        shared = kept_trains.get(source)
        if shared is None and _is_kept_folder(run.train_dir) and source.parent != dest.resolve():
            shared = run.train_dir
        if shared is not None and ckpt is not None and not (shared / "checkpoints" / ckpt.name).is_dir():
            if source in kept_trains:  # kept by this command: it takes the configs of this row's checkpoint too
                _copy_checkpoint_configs(ckpt, shared)
            else:  # another record's copy lacks them: this row keeps its own
                shared = None
        if shared is not None:
            info["train_record"] = _rel(shared, dest)
        else:
            (tmp / "train").mkdir()
            shutil.copy2(run.train_dir / "metrics.jsonl", tmp / "train" / "metrics.jsonl")
            if ckpt is not None:
                _copy_checkpoint_configs(ckpt, tmp / "train")
                (tmp / "train" / "checkpoints" / "latest").write_text(ckpt.name + "\n")
            kept_trains[source] = dest / "train"
    info["checkpoint"] = None if ckpt is None else ckpt.name
    (tmp / RECORD_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def closed_loop_router_agreement(episodes: list[dict[str, Any]]) -> float | None:
    """Fraction of executed steps where the router's choice (w >= 0.5) equals the phase label computed
    from the gripper commands the policy itself executed (``router_label`` in episodes.jsonl: flips,
    asymmetric Gaussian >= 0.5); None for a policy without a router."""
    hit = total = 0
    for ep in episodes:
        w = (ep.get("log") or {}).get("router_weight") or []
        label = ep.get("router_label") or []
        for wi, li in zip(w, label):
            if wi is None or (isinstance(wi, float) and math.isnan(wi)):
                continue
            hit += (wi >= 0.5) == bool(li)
            total += 1
    return hit / total if total else None


def _train_command(train_dir: Path, steps: int | None = None) -> str | None:
    ckpt = _latest_checkpoint(train_dir)
    if ckpt is None:
        return None
    cfg = json.loads((ckpt / "train_config.json").read_text())["train"]
    # --init takes the architecture from its checkpoint, so neither --preset nor --ablation goes with it.
    start = ["--init", cfg["init"]] if cfg.get("init") else ["--preset", cfg["preset"]]
    args = ["damvla", "train", *start, "--dataset", cfg["dataset"], "--out", cfg["out"],
            "--steps", str(steps or cfg["steps"]), "--batch-size", str(cfg["batch_size"]), "--lr", str(cfg["lr"]),
            "--warmup", str(cfg["warmup"]), "--schedule", cfg["schedule"], "--seed", str(cfg["seed"])]
    if cfg.get("ablation") and not cfg.get("init"):
        args += ["--ablation", cfg["ablation"]]
    for key, flag in (("ema", "--ema"), ("val_episodes", "--val-episodes"), ("threads", "--threads")):
        if cfg.get(key):
            args += [flag, str(cfg[key])]
    # Options that change the result, where the run set them away from their defaults.
    defaults = TrainConfig()
    for key, flag in (("grad_accum", "--grad-accum"), ("weight_decay", "--weight-decay"), ("grad_clip", "--grad-clip"),
                      ("freeze", "--freeze"), ("lora", "--lora"), ("aug_shift", "--aug-shift"),
                      ("aug_color", "--aug-color"), ("aug_views", "--aug-views")):  # fmt: skip
        if key in cfg and cfg[key] != getattr(defaults, key):
            args += [flag, str(cfg[key])]
    return shlex.join(args + list(cfg.get("overrides", [])))


def _collect_command(train_dir: Path) -> str | None:
    """The `damvla collect` command that made the run's dataset, from the dataset's own recipe."""
    ckpt = _latest_checkpoint(train_dir)
    if ckpt is None:
        return None
    meta = json.loads((ckpt / "metadata.json").read_text())
    recipe = (meta.get("damvla") or {}).get("recipe") or {}
    if recipe.get("simulator") != "metaworld_v3":
        return None
    args = ["damvla", "collect", "metaworld", "--suite", recipe["suite"], "--episodes", str(recipe["episodes_per_task"]),
            "--out", meta.get("source", "DATA"), "--camera", recipe["camera"], "--resolution", str(recipe["resolution"])]
    if recipe.get("release"):
        args.append("--release")
    # Options that change which episodes are kept, or how they were driven (DART, DAgger, aggregation).
    for key, flag in (("max_steps", "--max-steps"), ("seed_offset", "--seed-offset"), ("noise", "--noise"),
                      ("policy", "--policy"), ("beta", "--beta"), ("from", "--from")):  # fmt: skip
        if recipe.get(key):
            args += [flag, str(recipe[key])]
    if recipe.get("max_tries") and recipe["max_tries"] != 2 * int(recipe["episodes_per_task"]) + 10:
        args += ["--max-tries", str(recipe["max_tries"])]
    if recipe.get("environment_state"):
        args.append("--environment-state")
    if recipe.get("extra_cameras"):
        args += ["--extra-cameras", ",".join(recipe["extra_cameras"])]
    return shlex.join(args)


def _pct(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f}% ({k}/{n}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def plot_training(runs: list[Run], path: Path) -> Path | None:
    runs = [r for r in runs if r.metrics]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for r in runs:
        steps = [m["step"] for m in r.metrics]
        diff = [m.get("loss_action", m.get("loss_arm", 0.0) + m.get("loss_gripper", 0.0)) for m in r.metrics]
        a.plot(steps, diff, label=r.name)
        if any("router_acc" in m for m in r.metrics):
            b.plot(steps, [m.get("router_acc", float("nan")) for m in r.metrics], label=r.name)
    a.set(xlabel="step", ylabel="diffusion loss (train)", yscale="log", title="training loss")
    b.set(xlabel="step", ylabel="router accuracy (train batch)", title="router accuracy", ylim=(0, 1))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(runs: list[Run], baseline: str | None, title: str, figure: Path | None, page_dir: Path) -> str:
    tasks = list(runs[0].results["tasks"])
    for r in runs[1:]:
        if list(r.results["tasks"]) != tasks:
            raise ValueError(f"--run {r.name}: tasks {list(r.results['tasks'])} differ from {runs[0].name}'s {tasks}")
    states = {r.name: (r.eval_dir / "initial_states.jsonl").read_text() if (r.eval_dir / "initial_states.jsonl").is_file() else None
              for r in runs}
    same_states = len({s for s in states.values()}) == 1
    lines = [f"## {title}", ""]
    if not same_states:
        lines += ["**Warning: the runs were evaluated on different initial states.**", ""]
    head = "| run | train steps | " + " | ".join(tasks) + " | average | router acc (train, last 5 logs) | router = executed phase (closed loop) |"
    lines += [head, "|" + "---|" * (len(tasks) + 5)]
    for r in runs:
        steps = r.metrics[-1]["step"] if r.metrics else "?"
        cells = [_pct(r.results["tasks"][t]["successes"], r.results["tasks"][t]["episodes"]) for t in tasks]
        ov = r.results["overall"]
        accs = [m["router_acc"] for m in r.metrics[-5:] if "router_acc" in m]
        acc = f"{100 * sum(accs) / len(accs):.1f}%" if accs else "no router"
        agree = closed_loop_router_agreement(r.episodes)
        agree_s = f"{100 * agree:.1f}%" if agree is not None else "no router"
        lines.append(f"| {r.name} | {steps} | " + " | ".join(cells) + f" | {_pct(ov['successes'], ov['episodes'])} | {acc} | {agree_s} |")
    groups = seed_groups(runs)
    if groups:
        lines += pooled_table(groups, tasks, baseline)
    if baseline is not None and (groups is None or baseline not in groups):
        base = next((r for r in runs if r.name == baseline), None)
        if base is None:
            raise ValueError(f"--baseline {baseline!r} is not one of the runs {[r.name for r in runs]}")
        lines += ["", f"Difference to `{baseline}` (percentage points, Newcombe 95% interval):", ""]
        lines += ["| run | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 2)]
        for r in runs:
            if r is base:
                continue
            cells = []
            for t in tasks + ["__all__"]:
                a = r.results["overall"] if t == "__all__" else r.results["tasks"][t]
                b = base.results["overall"] if t == "__all__" else base.results["tasks"][t]
                d, lo, hi = difference_interval(a["successes"], a["episodes"], b["successes"], b["episodes"])
                cells.append(format_difference(d, lo, hi))
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    if all("milestones" in r.results["overall"] for r in runs):
        names = list(runs[0].results["overall"]["milestones"])
        lines += ["", "Where episodes fail: episodes in which each phase flag of the simulator was ever set "
                  "(see each eval report for the flags' meaning).", ""]  # fmt: skip
        lines += ["| run | phase | " + " | ".join(tasks) + " | all |", "|" + "---|" * (len(tasks) + 3)]
        for r in runs:
            for name in names:
                cells = [r.results["tasks"][t]["milestones"].get(name, 0) for t in tasks]
                counts = [f"{k}/{r.results['tasks'][t]['episodes']}" for k, t in zip(cells, tasks)]
                ov = r.results["overall"]
                lines.append(f"| {r.name} | {name} | " + " | ".join(counts)
                             + f" | {ov['milestones'].get(name, 0)}/{ov['episodes']} |")  # fmt: skip
    if baseline is not None and same_states:
        lines += paired_table(runs, groups, baseline, tasks)
    lines += placement_table(runs, groups, states)
    if figure is not None:
        lines += ["", f"![training curves]({_rel(figure, page_dir)})", "",
                  "Training losses of runs with different ablation switches carry different weights (chunk weight "
                  "gamma^j, trajectory weights), so their scales are not comparable; success rates are."]
    lines += ["", "Reproduce each row (data recipe, training, evaluation):", ""]
    for r in runs:
        lines.append(f"- **{r.name}**")
        if r.train_dir is not None:
            steps = r.metrics[-1]["step"] if r.metrics else None
            for cmd in (_collect_command(r.train_dir), _train_command(r.train_dir, steps)):
                if cmd:
                    lines.append(f"  - `{cmd}`")
        lines.append(f"  - `{r.results['command']}`")
    lines += ["", "Success cells: rate (successes/episodes) [Wilson 95% interval]. `router = executed phase`: share of executed "
              "steps where the router's head choice equals the phase label of the gripper commands the policy executed "
              "(flips, asymmetric Gaussian >= 0.5); the per-episode plots in each eval folder also show the scripted "
              "expert's labels replayed from the same initial state."]
    return "\n".join(lines)


def seed_groups(runs: list[Run]) -> dict[str, list[Run]] | None:
    """Runs named ``ROW/SEED`` (e.g. ``damvla/s0``) grouped by row; None when no name has a ``/``."""
    if not any("/" in r.name for r in runs):
        return None
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.name.split("/", 1)[0], []).append(r)
    return groups


def _pooled(rs: list[Run], task: str | None) -> tuple[int, int]:
    cells = [r.results["overall"] if task is None else r.results["tasks"][task] for r in rs]
    return sum(c["successes"] for c in cells), sum(c["episodes"] for c in cells)


def pooled_table(groups: dict[str, list[Run]], tasks: list[str], baseline: str | None) -> list[str]:
    """Each row pooled over its seeds, the spread of the seeds' averages, and the difference to the baseline
    row on the pooled counts."""
    lines = ["", "Pooled over training seeds (success counts summed over the seeds; the interval treats episodes "
             "as independent, so it leaves out seed-to-seed variance, which the spread column shows):", ""]  # fmt: skip
    lines += ["| row | seeds | " + " | ".join(tasks) + " | average | seed averages |", "|" + "---|" * (len(tasks) + 4)]
    for name, rs in groups.items():
        cells = [_pct(*_pooled(rs, t)) for t in tasks]
        per_seed = ", ".join(f"{100 * r.results['overall']['successes'] / r.results['overall']['episodes']:.0f}%" for r in rs)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {_pct(*_pooled(rs, None))} | {per_seed} |")
    if baseline is not None and baseline in groups:
        lines += ["", f"Difference to `{baseline}` on the pooled counts (percentage points, Newcombe 95% interval):", ""]
        lines += ["| row | " + " | ".join(tasks) + " | average |", "|" + "---|" * (len(tasks) + 2)]
        for name, rs in groups.items():
            if name == baseline:
                continue
            cells = []
            for t in tasks + [None]:
                d, lo, hi = difference_interval(*_pooled(rs, t), *_pooled(groups[baseline], t))
                cells.append(format_difference(d, lo, hi))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if all("milestones" in r.results["overall"] for rs in groups.values() for r in rs):
            names = list(next(iter(groups.values()))[0].results["overall"]["milestones"])
            lines += ["", f"Phase flags pooled over seeds, difference to `{baseline}` (Newcombe 95% interval):", ""]
            lines += ["| row | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
            for name, rs in groups.items():
                if name == baseline:
                    continue
                cells = []
                for m in names:
                    k1 = sum(r.results["overall"]["milestones"].get(m, 0) for r in rs)
                    n1 = sum(r.results["overall"]["episodes"] for r in rs)
                    k2 = sum(r.results["overall"]["milestones"].get(m, 0) for r in groups[baseline])
                    n2 = sum(r.results["overall"]["episodes"] for r in groups[baseline])
                    d, lo, hi = difference_interval(k1, n1, k2, n2)
                    cells.append(f"{k1}/{n1} vs {k2}/{n2}: {format_difference(d, lo, hi)}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _seed(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else ""


def _paired_counts(pairs: list[tuple[Run, Run]]) -> dict[str | None, tuple[int, int, int, int]]:
    """Per task, and overall under None: (both, only the row, only the baseline, neither) over the episodes the
    two runs of each pair share."""
    counts: dict[str | None, list[int]] = {}
    for r, b in pairs:
        base = {(e.get("task"), e.get("key")): bool(e.get("success")) for e in b.episodes}
        for e in r.episodes:
            other = base.get((e.get("task"), e.get("key")))
            if e.get("key") is None or other is None:
                continue
            mine = bool(e["success"])
            cell = 3 - 2 * mine - other  # both 0, only the row 1, only the baseline 2, neither 3
            for task in (e.get("task"), None):
                counts.setdefault(task, [0, 0, 0, 0])[cell] += 1
    return {task: (c[0], c[1], c[2], c[3]) for task, c in counts.items()}


def paired_table(runs: list[Run], groups: dict[str, list[Run]] | None, baseline: str, tasks: list[str]) -> list[str]:
    """Each row against the baseline episode by episode: the runs share their initial states, so the
    difference has a paired interval (narrower than the unpaired one when both succeed on the same states).
    Seeded rows pair each seed with the baseline's run of the same seed; unmatched seeds are left out."""
    if groups is not None and baseline in groups:
        base_runs = {_seed(r.name): r for r in groups[baseline]}
        rows = {name: rs for name, rs in groups.items() if name != baseline}
    else:
        base = next((r for r in runs if r.name == baseline), None)
        if base is None:
            return []
        base_runs = {"": base}
        rows = {r.name: [r] for r in runs if r is not base}
    lines: list[str] = []
    for name, rs in rows.items():
        pairs = [(r, base_runs.get(_seed(r.name), base_runs.get(""))) for r in rs]
        pairs = [(r, b) for r, b in pairs if b is not None and r is not b]
        counts = _paired_counts(pairs)
        if None not in counts:
            continue
        overall = counts[None]
        if not lines:
            lines += ["", f"Paired with `{baseline}` on the same initial states (each episode against the baseline's "
                      "episode from the same state, seed with seed; percentage points, Newcombe's paired 95% "
                      "interval; exact McNemar p on the episodes only one of the two solved; like the pooled interval, it "
                      "leaves out seed-to-seed variance):", ""]  # fmt: skip
            lines += ["| row | seeds paired | episodes | both | only row | only baseline | neither | "
                      + " | ".join(tasks) + " | average | McNemar p |", "|" + "---|" * (len(tasks) + 9)]  # fmt: skip
        cells = [format_difference(*paired_difference_interval(*counts.get(t, (0, 0, 0, 0)))) for t in tasks]
        both, only1, only2, neither = overall
        seeds = ", ".join(_seed(r.name) or "one run" for r, _ in pairs)  # unseeded names: a run each, not a seed
        lines.append(f"| {name} | {seeds} | {sum(overall)} | {both} | {only1} | {only2} | {neither} | "
                     + " | ".join(cells) + f" | {format_difference(*paired_difference_interval(*overall))} | "
                     f"{mcnemar_exact_p(only1, only2):.3g} |")  # fmt: skip
    return lines


def placement_table(runs: list[Run], groups: dict[str, list[Run]] | None, states: dict[str, str | None]) -> list[str]:
    """Success and phase flags split by where the object starts and where the goal is
    (``damvla.evaluation.placement``), each row pooled over its seeds; [] when the initial states record no
    positions (SIMPLER) or a run's initial states are missing. ``states``: run name -> its initial_states.jsonl text."""
    if any(states[r.name] is None for r in runs):
        return []
    per_run = {r.name: placement.splits(r.episodes, placement.parse_initial_states(states[r.name])) for r in runs}
    rows = {name: [per_run[r.name] for r in rs] for name, rs in groups.items()} if groups else {n: [s] for n, s in per_run.items()}
    try:
        pooled = {name: placement.pooled(g) for name, g in rows.items()}
    except ValueError:  # seeds of a row evaluated on different initial states: their halves differ
        return ["", f"{placement.TITLE}: not shown, the seeds of a row were evaluated on different initial states."]
    if not any(pooled.values()):
        return []
    lines = ["", f"{placement.TITLE}: {placement.NOTE}" + (", each row pooled over its seeds." if groups else "."), ""]
    for name, splits in pooled.items():
        head, cells = placement.table(splits)
        if lines[-1] == "":
            lines += ["| row | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
        lines += [f"| {name} | " + " | ".join(c) + " |" for c in cells]
    return lines


def _rel(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` with forward slashes: a markdown link or a record key on any OS."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", action="append", required=True, metavar="NAME=EVAL_DIR[:TRAIN_DIR]",
                   help="an evaluated run, optionally with its training run folder (repeat)")
    p.add_argument("--baseline", default=None, help="run name the others are compared against")
    p.add_argument("--title", required=True, help="section title in the results page")
    p.add_argument("--append-results", type=Path, default=None, help="results page to write the section into")
    p.add_argument("--figures", type=Path, default=Path("docs/figures"), help="folder for the training-curve PNG")
    p.add_argument("--keep-records", type=Path, default=None, metavar="DIR",
                   help="copy each run's results, episodes, metrics and configs (no weights) into DIR/<row>_<seed>/, "
                        "which --run NAME=DIR/<row>_<seed> reads back: commit them to add seeds in a later session")


def run(args: argparse.Namespace) -> int:
    runs = [parse_run(s) for s in args.run]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"--run names must be unique, got {names}")
    if args.keep_records is not None:
        kept_trains: dict[Path, Path] = {}
        for r in runs:
            if r.record_dir is not None and r.record_dir.resolve().parent == args.keep_records.resolve():
                if r.train_dir is not None:  # a later row of the same training run refers to this record's copy
                    kept_trains.setdefault(r.train_dir.resolve(), r.train_dir)
                continue  # already a record there
            print(f"kept record of {r.name} in {keep_record(r, args.keep_records, kept_trains)}")
    figure = plot_training(runs, args.figures / f"{section_id(args.title)}.png")
    page_dir = args.append_results.parent if args.append_results else Path.cwd()
    md = render(runs, args.baseline, args.title, figure, page_dir)
    print(md)
    if args.append_results:
        append_section(args.append_results, args.title, md)
        print(f"\nwrote section {section_id(args.title)!r} into {args.append_results}")
    return 0
