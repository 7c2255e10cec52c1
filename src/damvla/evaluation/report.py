"""Evaluation outputs: ``results.json``, ``report.md``, ``index.html`` and marked sections of a results page.

A results page (``docs/results.md``) is written only by ``damvla eval --append-results PAGE``: each run
owns the section between ``<!-- damvla-eval:begin ID -->`` and ``<!-- damvla-eval:end ID -->`` (ID from
the title), which a rerun with the same title replaces in place; everything else on the page is kept.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

from damvla.evaluation import placement

PAGE_HEADER = """# Results

Every section below is written by `damvla eval ... --append-results docs/results.md` (never by hand):
rerunning the command with the same `--title` replaces its section. Protocol: docs/evaluation.md.
"""


GOAL_DISTANCE_NOTE = (
    "How close failed episodes came: over the failed episodes, the median of the object's closest and final "
    "distance to its goal, in cm, as the simulator measures it for success, and per axis the median of the "
    "object's position minus the goal's at the closest step (where the simulator reports the object's position; "
    "z < 0: below the goal)"
)


HAND_OBJECT_NOTE = (
    "Where the hand went in episodes that never reached the object: over those episodes (Meta-World: "
    "*reached* never set), the median of the hand's closest distance to the object, in cm, and per axis the "
    "median of the hand's position minus the object's at that step (a large value on one axis: the hand "
    "went somewhere else; small values: it stopped short)"
)


def _hand_object_rows(results: dict[str, Any], overall: str) -> list[list[str]]:
    """(task, unreached, closest, offset at the closest) cells per task and overall."""
    rows = []
    for task, s in [*results["tasks"].items(), (overall, results["overall"])]:
        h = s.get("hand_object_unreached") or {}
        offset = h.get("median_offset_min_cm")
        cells = [h.get("unreached", 0), h.get("median_min_cm"),
                 None if offset is None else "(" + ", ".join(f"{v:+.1f}" for v in offset) + ")"]  # fmt: skip
        rows.append([task, *("-" if c is None else str(c) for c in cells)])
    return rows


def _goal_distance_rows(results: dict[str, Any], overall: str) -> list[list[str]]:
    """(task, failed, closest, final, offset at the closest) cells per task and overall, '-' where no failure
    reported one."""
    rows = []
    for task, s in [*results["tasks"].items(), (overall, results["overall"])]:
        g = s.get("goal_distance_failed") or {}
        offset = g.get("median_offset_min_cm")
        cells = [g.get("failed", 0), g.get("median_min_cm"), g.get("median_final_cm"),
                 None if offset is None else "(" + ", ".join(f"{v:+.1f}" for v in offset) + ")"]  # fmt: skip
        rows.append([task, *("-" if c is None else str(c) for c in cells)])
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


# The two throughputs differ by design; each is labelled where it is shown so a reader sees why.
WALL_RATE_NOTE = "wall clock over the whole run: simulation, rendering and policy, all workers together"
ENV_RATE_NOTE = (
    "*env steps/s (in env.step)*: steps per second of time spent inside `env.step` (simulation and "
    "rendering, no policy), per worker; the overall figure above is wall clock instead, so the two differ"
)


def checkpoint_text(cfg: dict[str, Any]) -> str:
    """``checkpoint `X` (folder `Y`, step N)``: what was asked for and the folder it resolved to."""
    text = f"checkpoint `{cfg['checkpoint']}`"
    folder, step = cfg.get("checkpoint_folder"), cfg.get("checkpoint_step")
    extra = []
    if folder and folder != cfg["checkpoint"]:
        extra.append(f"folder `{folder}`")
    if step is not None:
        extra.append(f"step {step}")
    return text + (f" ({', '.join(extra)})" if extra else "")


def _media(results: dict[str, Any], key: str) -> list[tuple[str, str]]:
    """``(episode key, relative path)`` of every episode that has a ``video`` / ``plot``, in run order."""
    return [(e["key"], e[key]) for e in results.get("episodes", []) if e.get(key)]


def render_markdown(results: dict[str, Any], title: str, heading: str = "##", links: bool = False) -> str:
    """The report of one run as markdown: a header block, the per-task table and the overall row.

    ``links``: also list the videos and plots as links relative to the output folder (``report.md``
    inside it; a results page elsewhere would get broken links, so it is off by default)."""
    cfg = results["config"]
    ov = results["overall"]
    lines = [f"{heading} {title}", ""]
    lines.append(f"Command: `{results['command']}`")
    lines.append("")
    policy = cfg["policy"] if cfg["policy"] != "checkpoint" else checkpoint_text(cfg)
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
        f"{results['timing']['wall_seconds']:.0f} s wall, {results['timing']['env_steps_per_s_wall']:.0f} env steps/s "
        f"overall ({WALL_RATE_NOTE})."
    )
    if cfg.get("simulator") == "simpler":
        from damvla.evaluation.simpler import report_notes

        lines += ["", *report_notes(cfg)]
    lines.append("")
    lines.append(
        "| task | success | Wilson 95% CI | mean steps to success | policy ms/step | env steps/s (in env.step) | errors |"
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
        "pooled counts. Errored episodes count as failures. " + ENV_RATE_NOTE + "."
    )
    simpler = cfg.get("simulator") == "simpler"
    if simpler and "milestones" not in ov:
        lines += ["", "Phase flags: none (SIMPLER reports no per-step progress flags for these tasks)."]
    if "milestones" in ov:
        names = list(ov["milestones"])
        what = (
            "SIMPLER: the boolean entries of its `episode_stats`, e.g. grasped, lifted, moved the correct object"
            if simpler
            else "Meta-World: *reached* = `near_object`, the hand within 3 cm of the object; *grasped* = "
            "`grasp_success`, the object held and lifted, which pushing tasks never need"
        )
        lines += ["", f"Phase flags: episodes in which the simulator's own per-step flag was ever set ({what}).", ""]
        lines.append("| task | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for task, s in [*results["tasks"].items(), ("**all**", ov)]:
            n = s["episodes"]
            lines.append(f"| {task} | " + " | ".join(f"{s['milestones'][k]}/{n}" for k in names) + " |")
    if "goal_distance_failed" in ov:
        lines += ["", GOAL_DISTANCE_NOTE + " (`obj_to_target` in Meta-World).", "",
                  "| task | failed | closest | final | object - goal at the closest (x, y, z) |", "|---|---|---|---|---|"]  # fmt: skip
        lines += ["| " + " | ".join(cells) + " |" for cells in _goal_distance_rows(results, "**all**")]
    if "hand_object_unreached" in ov:
        lines += ["", HAND_OBJECT_NOTE + ".", "", "| task | never reached | closest | hand - object at the closest (x, y, z) |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += ["| " + " | ".join(cells) + " |" for cells in _hand_object_rows(results, "**all**")]
    if results.get("placement"):
        head, rows = placement.table([placement.Split(**d) for d in results["placement"]])
        lines += ["", f"{placement.TITLE}: {placement.NOTE}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    if links:
        for key, label in (("video", "Videos"), ("plot", "Router plots")):
            media = _media(results, key)
            if media:
                lines += ["", f"{label}: " + ", ".join(f"[{k}]({quote(p)})" for k, p in media)]
    return "\n".join(lines) + "\n"


HTML_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.overall { font-weight: bold; background: #f6f6f6; }
.note { color: #555; font-size: 90%; }
.media { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 85%; color: #555; }
video { width: 320px; background: #000; }
img { max-width: 100%; }
"""


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def render_html(results: dict[str, Any], title: str) -> str:
    """The report of one run as one self-contained HTML page (inline CSS, no scripts, no network):
    the success table with Wilson intervals, the phase flags, the videos (``<video controls>``) and the
    router plots by relative path, and the exact command and versions."""
    cfg, ov, timing = results["config"], results["overall"], results["timing"]
    policy = cfg["policy"] if cfg["policy"] != "checkpoint" else checkpoint_text(cfg)
    policy = re.sub(r"`([^`]*)`", r"<code>\1</code>", _h(policy))  # escaped first, then `x` -> <code>
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_h(title)}</title>",
        f"<style>{HTML_STYLE}</style></head><body>",
        f"<h1>{_h(title)}</h1>",
        f"<p>Policy: {policy}. Suite <code>{_h(cfg['suite'])}</code> ({len(cfg['tasks'])} tasks &times; "
        f"{_h(cfg['episodes'])} episodes), noise seed {_h(cfg['seed'])}, max steps "
        f"{_h(cfg['max_steps'] or 'task default')}, camera {_h(cfg['camera'])} at {_h(cfg['resolution'])} px, "
        f"device {_h(cfg['device'])}. {timing['wall_seconds']:.0f} s wall, "
        f"{timing['env_steps_per_s_wall']:.0f} env steps/s overall ({_h(WALL_RATE_NOTE)}).</p>",
        '<table id="success"><thead><tr><th>task</th><th>success</th><th>Wilson 95% CI</th>'
        "<th>mean steps to success</th><th>policy ms/step</th><th>env steps/s (in env.step)</th>"
        "<th>errors</th></tr></thead><tbody>",
    ]

    def row(name: str, s: dict[str, Any], cls: str = "") -> str:
        lo, hi = s["wilson95"]
        cells = [name, f"{_pct(s['success_rate'])} ({s['successes']}/{s['episodes']})", f"[{_pct(lo)}, {_pct(hi)}]",
                 _num(s["mean_steps_to_success"]), _num(s["policy_ms_per_step"], ".2f"),
                 _num(s["env_steps_per_s"], ".0f"), s["errors"]]  # fmt: skip
        attr = f' class="{cls}"' if cls else ""
        return f"<tr{attr}>" + "".join(f"<td>{_h(c)}</td>" for c in cells) + "</tr>"

    out += [row(t, s) for t, s in results["tasks"].items()]
    out.append(row("average", ov, "overall"))
    out.append("</tbody></table>")
    out.append(
        '<p class="note">Average: unweighted mean of the task success rates; its interval is the Wilson '
        "interval of the pooled counts. Errored episodes count as failures. "
        + _h(ENV_RATE_NOTE.replace("*", "").replace("`", ""))
        + ".</p>"
    )
    simpler = cfg.get("simulator") == "simpler"
    if simpler:
        from damvla.evaluation.simpler import report_notes

        out += [f'<p class="note">{_h(line.replace("`", ""))}</p>' for line in report_notes(cfg)]
        if "milestones" not in ov:
            out.append('<p class="note">Phase flags: none (SIMPLER reports no per-step progress flags for these tasks).</p>')
    if "milestones" in ov:
        names = list(ov["milestones"])
        out.append("<h2>Phase flags</h2>")
        out.append(
            '<p class="note">Episodes in which the simulator\'s own per-step flag was ever set ('
            + ("SIMPLER: the boolean entries of its <code>episode_stats</code>)." if simpler else "Meta-World: "
               "<i>reached</i> = <code>near_object</code>, the hand within 3 cm of the object; <i>grasped</i> = "
               "<code>grasp_success</code>, the object held and lifted, which pushing tasks never need).")
            + "</p>"
        )  # fmt: skip
        out.append('<table id="phases"><thead><tr><th>task</th>' + "".join(f"<th>{_h(n)}</th>" for n in names)
                   + "</tr></thead><tbody>")  # fmt: skip
        for task, s in [*results["tasks"].items(), ("all", ov)]:
            n = s["episodes"]
            cls = ' class="overall"' if task == "all" and s is ov else ""
            out.append(f"<tr{cls}><td>{_h(task)}</td>"
                       + "".join(f"<td>{s['milestones'][k]}/{n}</td>" for k in names) + "</tr>")  # fmt: skip
        out.append("</tbody></table>")
    if "goal_distance_failed" in ov:
        out.append(f'<h2>How close failed episodes came</h2><p class="note">{_h(GOAL_DISTANCE_NOTE)}.</p>')
        out.append('<table id="goal-distance"><thead><tr><th>task</th><th>failed</th><th>closest</th>'
                   "<th>final</th><th>object &minus; goal at the closest (x, y, z)</th></tr></thead><tbody>")  # fmt: skip
        out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in cells) + "</tr>" for cells in _goal_distance_rows(results, "all")]
        out.append("</tbody></table>")
    if "hand_object_unreached" in ov:
        out.append(f'<h2>Where the hand went</h2><p class="note">{_h(HAND_OBJECT_NOTE)}.</p>')
        out.append('<table id="hand-object"><thead><tr><th>task</th><th>never reached</th><th>closest</th>'
                   "<th>hand &minus; object at the closest (x, y, z)</th></tr></thead><tbody>")  # fmt: skip
        out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in cells) + "</tr>" for cells in _hand_object_rows(results, "all")]
        out.append("</tbody></table>")
    if results.get("placement"):
        head, rows = placement.table([placement.Split(**d) for d in results["placement"]])
        out.append(f'<h2>{_h(placement.TITLE)}</h2><p class="note">{_h(placement.NOTE)}.</p>')
        out.append('<table id="placement"><thead><tr>' + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>")
        out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in r) + "</tr>" for r in rows]
        out.append("</tbody></table>")
    videos = _media(results, "video")
    if videos:
        out.append('<h2>Videos</h2><p class="note">Router weight, head and gripper drawn under each frame.</p>')
        out.append('<div class="media">')
        out += [f'<figure><video controls preload="metadata" src="{_h(quote(p))}"></video>'
                f"<figcaption>{_h(k)}</figcaption></figure>" for k, p in videos]  # fmt: skip
        out.append("</div>")
    plots = _media(results, "plot")
    if plots:
        out.append('<h2>Router plots</h2><p class="note">Router weight w per step (w &ge; 0.5 selects the '
                   "gripper head) against the routing labels of the executed and of the expert's gripper "
                   "commands.</p>")  # fmt: skip
        out += [f'<figure><img src="{_h(quote(p))}" alt="{_h(k)}" loading="lazy">'
                f"<figcaption>{_h(k)}</figcaption></figure>" for k, p in plots]  # fmt: skip
    out.append("<h2>Command and versions</h2>")
    out.append(f"<pre><code>{_h(results['command'])}</code></pre>")
    vers = results.get("versions") or {}
    if vers:
        out.append('<table id="versions"><tbody>')
        out += [f"<tr><td>{_h(k)}</td><td>{_h(v)}</td></tr>" for k, v in vers.items()]
        out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_results(out_dir: Path, results: dict[str, Any], title: str) -> tuple[Path, Path]:
    """Write ``results.json``, ``report.md`` and ``index.html`` into ``out_dir``; returns the first two."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rj = out_dir / "results.json"
    rj.write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    rm = out_dir / "report.md"
    rm.write_text(render_markdown(results, title, heading="#", links=True)
                  + "\nThe same report with the videos inline: [index.html](index.html).\n")  # fmt: skip
    (out_dir / "index.html").write_text(render_html(results, title))
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
