"""Evaluation outputs: ``results.json``, ``report.md`` and marked sections of a results page.

A results page (``docs/results.md``) is written only by ``damvla eval --append-results PAGE``: each run
owns the section between ``<!-- damvla-eval:begin ID -->`` and ``<!-- damvla-eval:end ID -->`` (ID from
the title), which a rerun with the same title replaces in place; everything else on the page is kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PAGE_HEADER = """# Results

Every section below is written by `damvla eval ... --append-results docs/results.md` (never by hand):
rerunning the command with the same `--title` replaces its section. Protocol: docs/evaluation.md.
"""


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def render_markdown(results: dict[str, Any], title: str, heading: str = "##") -> str:
    """The report of one run as markdown: a header block, the per-task table and the overall row."""
    cfg = results["config"]
    ov = results["overall"]
    lines = [f"{heading} {title}", ""]
    lines.append(f"Command: `{results['command']}`")
    lines.append("")
    policy = cfg["policy"] if cfg["policy"] != "checkpoint" else f"checkpoint `{cfg['checkpoint']}`"
    exe = cfg.get("execution")
    exe_txt = (
        ""
        if exe is None
        else f", execution {exe}" + (f" (n={cfg['execute_steps']})" if exe == "chunk" else "")
    )
    lines.append(
        f"Policy: {policy}{exe_txt}. Suite `{cfg['suite']}` ({len(cfg['tasks'])} tasks x {cfg['episodes']} "
        f"episodes), eval initial states `{cfg['initial_states']}`, noise seed {cfg['seed']}, max steps "
        f"{cfg['max_steps'] or 'task default'}, camera {cfg['camera']} at {cfg['resolution']} px, "
        f"{cfg['workers']} workers, device {cfg['device']}."
    )
    v = results.get("versions", {})
    lines.append(
        f"damvla {v.get('damvla', '?')} (commit {v.get('git_commit') or 'n/a'}{' dirty' if v.get('git_dirty') else ''}), "
        f"torch {v.get('torch', '?')}, mujoco {v.get('mujoco', '?')}, metaworld {v.get('metaworld', '?')}; "
        f"{results['timing']['wall_seconds']:.0f} s wall, {results['timing']['env_steps_per_s_wall']:.0f} env steps/s overall."
    )
    lines.append("")
    lines.append(
        "| task | success | Wilson 95% CI | mean steps to success | policy ms/step | env steps/s | errors |"
    )
    lines.append("|---|---|---|---|---|---|---|")

    def row(name: str, s: dict[str, Any]) -> str:
        lo, hi = s["wilson95"]
        return (
            f"| {name} | {_pct(s['success_rate'])} ({s['successes']}/{s['episodes']}) | "
            f"[{_pct(lo)}, {_pct(hi)}] | {_num(s['mean_steps_to_success'])} | "
            f"{_num(s['policy_ms_per_step'], '.2f')} | {_num(s['env_steps_per_s'], '.0f')} | {s['errors']} |"
        )

    for task, s in results["tasks"].items():
        lines.append(row(task, s))
    lines.append(row("**average**", ov))
    lines.append("")
    lines.append(
        "Average: unweighted mean of the task success rates; its interval is the Wilson interval of the "
        "pooled counts. Errored episodes count as failures."
    )
    if "milestones" in ov:
        names = list(ov["milestones"])
        lines += ["", "Phase flags: episodes in which the simulator's own per-step flag was ever set (Meta-World: "
                  "*reached* = `near_object`, the hand within 3 cm of the object; *grasped* = `grasp_success`, "
                  "the object held and lifted, which pushing tasks never need).", ""]  # fmt: skip
        lines.append("| task | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for task, s in [*results["tasks"].items(), ("**all**", ov)]:
            n = s["episodes"]
            lines.append(f"| {task} | " + " | ".join(f"{s['milestones'][k]}/{n}" for k in names) + " |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict[str, Any], title: str) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rj = out_dir / "results.json"
    rj.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    rm = out_dir / "report.md"
    rm.write_text(render_markdown(results, title, heading="#"))
    return rj, rm


def section_id(title: str) -> str:
    """A marker id from a title: lower case, runs of other characters -> '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError(f"--title {title!r} gives an empty section id")
    return slug


def append_section(page: str | Path, title: str, markdown: str) -> Path:
    """Insert or replace the marked section ``title`` of the markdown ``page`` (created if absent)."""
    path = Path(page)
    sid = section_id(title)
    begin, end = f"<!-- damvla-eval:begin {sid} -->", f"<!-- damvla-eval:end {sid} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else PAGE_HEADER
    i, j = text.find(begin), text.find(end)
    if (i < 0) != (j < 0) or (i >= 0 and j < i):
        raise ValueError(
            f"{path}: damaged markers for section {sid!r} (found one of begin/end only, or out of order)"
        )
    if i >= 0:
        rest = text[j + len(end) :].lstrip("\n")
        text = text[:i] + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
