"""Evaluation statistics and report pages (pure Python, no simulator)."""

from __future__ import annotations

import math

import pytest

from damvla.evaluation.report import append_section, section_id
from damvla.evaluation.stats import EpisodeRecord, summarize, wilson_interval


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (9, 10), (10, 10), (0, 1), (37, 50)])
def test_wilson_interval_contains_the_rate_and_stays_in_unit_range(k, n):
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert hi - lo > 0  # never collapses to a point, unlike the Wald interval at 0/n or n/n


def test_wilson_interval_matches_the_textbook_value():
    lo, hi = wilson_interval(8, 10)  # e.g. Agresti & Coull 1998: 8/10 -> [0.490, 0.943]
    assert math.isclose(lo, 0.4902, abs_tol=1e-3) and math.isclose(hi, 0.9433, abs_tol=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(3, 2)


def test_summary_counts_errors_as_failures_and_averages_task_rates():
    eps = [
        EpisodeRecord("a", True, 10, policy_seconds=0.1, env_seconds=0.1),
        EpisodeRecord("a", True, 20, policy_seconds=0.1, env_seconds=0.1),
        EpisodeRecord("b", False, 5, error="RuntimeError: boom"),
        EpisodeRecord("b", True, 30),
    ]
    s = summarize(eps, ["a", "b"])
    a, b, ov = s["tasks"]["a"], s["tasks"]["b"], s["overall"]
    assert (a["successes"], a["episodes"], a["success_rate"], a["errors"]) == (2, 2, 1.0, 0)
    assert (b["successes"], b["episodes"], b["success_rate"], b["errors"]) == (1, 2, 0.5, 1)
    assert a["mean_steps_to_success"] == 15 and b["mean_steps_to_success"] == 30
    assert math.isclose(a["policy_ms_per_step"], 1000 * 0.2 / 30)
    assert ov["success_rate"] == 0.75 and ov["errors"] == 1 and ov["episodes"] == 4
    assert ov["wilson95"][0] <= 0.75 <= ov["wilson95"][1]


def test_results_page_section_is_replaced_in_place_and_other_text_kept(tmp_path):
    page = tmp_path / "results.md"
    append_section(page, "Expert on mt10", "## Expert on mt10\n\nfirst\n")
    append_section(page, "Random on mt10", "## Random on mt10\n\nrandom\n")
    append_section(page, "Expert on mt10", "## Expert on mt10\n\nsecond\n")
    text = page.read_text()
    assert text.startswith("# Results")
    assert text.count("damvla-eval:begin expert-on-mt10") == 1 and "first" not in text and "second" in text
    assert text.index("second") < text.index("random")  # replaced where it was, not moved to the end
    assert section_id("A b/c") == "a-b-c"
