"""Success statistics: Wilson score intervals and per-task / overall summaries (pure Python + numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, ``(lo, hi)`` within [0, 1].

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point at
    0/n or n/n, which matters at the 10-50 episodes per task benchmarks use. ``n == 0`` gives (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    # At p = 0 or 1 the exact bound is 0 or 1; float round-off would leave the rate just outside.
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)


@dataclass
class EpisodeRecord:
    """What the summary needs of one episode (``steps``: env steps taken; ``error``: None if it ran)."""

    task: str
    success: bool
    steps: int
    error: str | None = None
    policy_seconds: float = 0.0  # this episode's share of the batched policy calls
    env_seconds: float = 0.0  # time inside env.step (simulation + rendering)


def format_difference(d: float, lo: float, hi: float) -> str:
    """``+4 [-0.3, +9]``: percentage points, whole numbers, except a value that would round to a signed zero
    (``-0``) gets one decimal, so an interval that just reaches below 0 says by how much."""

    def pp(x: float) -> str:
        text = f"{100 * x:+.0f}"
        return f"{100 * x:+.1f}" if text in ("+0", "-0") and abs(100 * x) >= 0.05 else text

    return f"{pp(d)} [{pp(lo)}, {pp(hi)}]"


def difference_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid-score 95% interval (from the two Wilson intervals)."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def paired_difference_interval(both: int, only1: int, only2: int, neither: int) -> tuple[float, float, float]:
    """p1 - p2 of two policies run on the same episodes (the same initial states), with Newcombe's (1998)
    score interval for paired proportions (the Wilson intervals of both rates, joined through their
    continuity-corrected phi correlation). Two policies on the same states mostly succeed and fail together;
    the unpaired interval ignores that and is wider than the evidence allows."""
    counts = (both, only1, only2, neither)
    if min(counts) < 0 or sum(counts) == 0:
        raise ValueError(f"paired_difference_interval: need counts >= 0, not all 0, got {counts}")
    n = sum(counts)
    k1, k2 = both + only1, both + only2
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson_interval(k1, n)
    l2, u2 = wilson_interval(k2, n)
    margins = (both + only1) * (only2 + neither) * (both + only2) * (only1 + neither)
    cross = both * neither - only1 * only2
    # Newcombe's correction: a positive association is shrunk by n/2, so the interval errs on the wide side
    corrected = cross - n / 2 if cross > n / 2 else (cross if cross < 0 else 0.0)
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    d = p1 - p2
    down = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    up = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return d, max(-1.0, d - down), min(1.0, d + up)


def mcnemar_exact_p(only1: int, only2: int) -> float:
    """Two-sided exact McNemar test: the chance of a split of the discordant episodes at least this uneven
    if either policy were equally likely to be the one that succeeds."""
    if only1 < 0 or only2 < 0:
        raise ValueError(f"mcnemar_exact_p: need counts >= 0, got {only1}, {only2}")
    n, k = only1 + only2, min(only1, only2)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _rate(x: float, n: float) -> float | None:
    return x / n if n > 0 else None


def summarize_task(episodes: Sequence[EpisodeRecord]) -> dict[str, Any]:
    """Summary of one task's episodes. Errored episodes count as failures (conservative) and are
    also counted in ``errors``."""
    n = len(episodes)
    succ = [e for e in episodes if e.success]
    lo, hi = wilson_interval(len(succ), n)
    steps = sum(e.steps for e in episodes)
    policy_s = sum(e.policy_seconds for e in episodes)
    env_s = sum(e.env_seconds for e in episodes)
    return {
        "success_rate": len(succ) / n if n else 0.0,
        "successes": len(succ),
        "episodes": n,
        "errors": sum(e.error is not None for e in episodes),
        "wilson95": [lo, hi],
        "mean_steps_to_success": (sum(e.steps for e in succ) / len(succ)) if succ else None,
        "steps": steps,
        "policy_ms_per_step": None if steps == 0 else 1000.0 * policy_s / steps,
        "env_steps_per_s": _rate(steps, env_s),
    }


def summarize(episodes: Sequence[EpisodeRecord], tasks: Sequence[str]) -> dict[str, Any]:
    """``{"tasks": {task: summary}, "overall": {...}}``, tasks in the given order.

    ``overall.success_rate`` is the unweighted mean of the per-task rates (the MT10/MT50 convention);
    its ``wilson95`` is the interval of the pooled counts, which equals that mean when every task has
    the same number of episodes (the ``damvla eval`` protocol).
    """
    per_task = {t: summarize_task([e for e in episodes if e.task == t]) for t in tasks}
    n = sum(s["episodes"] for s in per_task.values())
    k = sum(s["successes"] for s in per_task.values())
    lo, hi = wilson_interval(k, n)
    steps = sum(e.steps for e in episodes)
    succ = [e for e in episodes if e.success]
    rates = [s["success_rate"] for s in per_task.values() if s["episodes"]]
    overall = {
        "success_rate": sum(rates) / len(rates) if rates else 0.0,
        "successes": k,
        "episodes": n,
        "errors": sum(s["errors"] for s in per_task.values()),
        "wilson95": [lo, hi],
        "mean_steps_to_success": (sum(e.steps for e in succ) / len(succ)) if succ else None,
        "steps": steps,
        "policy_ms_per_step": None
        if steps == 0
        else 1000.0 * sum(e.policy_seconds for e in episodes) / steps,
        "env_steps_per_s": _rate(steps, sum(e.env_seconds for e in episodes)),
    }
    return {"tasks": per_task, "overall": overall}
