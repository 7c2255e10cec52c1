"""Where in the workspace episodes fail: success and phase flags split by where an episode's object starts,
where its goal is and how far sideways the two lie apart, read from the initial states an evaluation ran
(Meta-World records ``obj_init_pos`` and ``goal_pos`` in each one).

A success rate averaged over the workspace can hide a policy that never solves one side of it: the grip3
policies trained on the corner4 camera reach objects that start at -x far less often than at +x, and none of
them places pick-place's puck at a goal high above the table (docs/results.md). Each coordinate that varies
within a task is split at the middle of the range its initial states cover, so the two halves are the two
sides of the sampled region.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from damvla.evaluation.stats import difference_interval, format_difference, wilson_interval

MIN_SPREAD_M = 0.01  # a coordinate that varies less than this within a task is not split


@dataclass
class Split:
    """Episode counts of one task on each side of ``threshold_m`` along one coordinate."""

    task: str
    coordinate: str
    threshold_m: float
    episodes: tuple[int, int]  # (below, at or above)
    successes: tuple[int, int]
    milestones: dict[str, tuple[int, int]]


def parse_initial_states(text: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The text of an evaluation's ``initial_states.jsonl``: ``(task, seed) -> data`` (states naming no task or
    seed are left out)."""
    out = {}
    for line in text.splitlines():
        if line.strip():
            s = json.loads(line)
            if "task" in s and "seed" in s:
                out[(s["task"], int(s["seed"]))] = s.get("data") or {}
    return out


def _coordinate(data: dict[str, Any], field: str, axis: int) -> float | None:
    v = data.get(field)
    return float(v[axis]) if isinstance(v, (list, tuple)) and len(v) > axis else None


def _sideways(data: dict[str, Any]) -> float | None:
    """How far sideways (along x) the goal lies from where the object starts: the object must be carried or
    pushed that far across the table. The grip3 policies fail push far more often when it is large."""
    g, o = _coordinate(data, "goal_pos", 0), _coordinate(data, "obj_init_pos", 0)
    return None if g is None or o is None else abs(g - o)


# (label, value of an initial state's data): the coordinates an episode is split by, where the task varies them.
COORDINATES: tuple[tuple[str, Callable[[dict[str, Any]], float | None]], ...] = (
    ("object x", lambda d: _coordinate(d, "obj_init_pos", 0)),
    ("goal z", lambda d: _coordinate(d, "goal_pos", 2)),
    ("goal-object x distance", _sideways),
)


def splits(episodes: list[dict[str, Any]], states: dict[tuple[str, int], dict[str, Any]]) -> list[Split]:
    """One ``Split`` per task and coordinate that varies within the task, in task order then ``COORDINATES``
    order. Episodes without a recorded coordinate are left out; ``[]`` when no state records any."""
    episodes = [e for e in episodes if "task" in e and "seed" in e]
    tasks = list(dict.fromkeys(e["task"] for e in episodes))
    names = list(dict.fromkeys(n for e in episodes for n in e.get("milestones") or {}))
    out = []
    for task in tasks:
        for label, value in COORDINATES:
            rows = []
            for e in episodes:
                if e["task"] != task:
                    continue
                x = value(states.get((task, int(e["seed"])), {}))
                if x is not None:
                    rows.append((x, e))
            if not rows:
                continue
            lo, hi = min(x for x, _ in rows), max(x for x, _ in rows)
            if hi - lo < MIN_SPREAD_M:
                continue
            threshold = (lo + hi) / 2  # the middle of the covered range: both sides hold episodes
            sides = ([e for x, e in rows if x < threshold], [e for x, e in rows if x >= threshold])
            out.append(Split(
                task, label, threshold,
                (len(sides[0]), len(sides[1])),
                (sum(bool(e["success"]) for e in sides[0]), sum(bool(e["success"]) for e in sides[1])),
                {n: (sum(bool((e.get("milestones") or {}).get(n)) for e in sides[0]),
                     sum(bool((e.get("milestones") or {}).get(n)) for e in sides[1])) for n in names},
            ))  # fmt: skip
    return out


def pooled(groups: list[list[Split]]) -> list[Split]:
    """Sum the counts of several runs' splits (the seeds of one row); the runs must split alike."""
    if not groups:
        return []
    keys = [(s.task, s.coordinate, s.threshold_m) for s in groups[0]]
    for g in groups[1:]:
        if [(s.task, s.coordinate, s.threshold_m) for s in g] != keys:
            raise ValueError("runs split their initial states differently (were they evaluated on different states?)")

    def add(pairs: list[tuple[int, int]]) -> tuple[int, int]:
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    out = []
    for i, s in enumerate(groups[0]):
        parts = [g[i] for g in groups]
        out.append(Split(
            s.task, s.coordinate, s.threshold_m,
            add([p.episodes for p in parts]), add([p.successes for p in parts]),
            {n: add([p.milestones[n] for p in parts]) for n in s.milestones},
        ))  # fmt: skip
    return out


TITLE = "Where in the workspace"
NOTE = (
    "episodes split by where the object starts (x), where the goal is (z) and how far sideways the goal lies "
    "from the object's start (|goal x - object x|), each at the middle of the range the initial states cover; "
    "difference = at or above minus below (percentage points, Newcombe 95% interval)"
)


def _cell(k: int, n: int) -> str:
    if not n:
        return "no episodes"
    lo, hi = wilson_interval(k, n)
    return f"{100 * k / n:.0f}% ({k}/{n}) [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(splits: list[Split]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of cells per split: task, split, success on each side, their difference, and each
    phase flag's counts on the two sides."""
    names = list(splits[0].milestones) if splits else []
    head = ["task", "split at", "success below", "success at or above", "difference"]
    head += [f"{n} below / at or above" for n in names]
    rows = []
    for s in splits:
        (n0, n1), (k0, k1) = s.episodes, s.successes
        diff = format_difference(*difference_interval(k1, n1, k0, n0)) if n0 and n1 else "n/a"
        flags = [f"{s.milestones[m][0]}/{n0} / {s.milestones[m][1]}/{n1}" for m in names]
        rows.append([s.task, f"{s.coordinate} = {round(100 * s.threshold_m)} cm", _cell(k0, n0), _cell(k1, n1), diff, *flags])
    return head, rows
