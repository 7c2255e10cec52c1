"""`damvla eval`'s report files from a results dict (no simulator): links, checkpoint identity, rates,
the self-contained index.html, and the figures' labels."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import matplotlib.figure
import numpy as np

from damvla.evaluate import resolved_checkpoint
from damvla.evaluation.report import render_html, render_markdown, write_results
from damvla.evaluation.stats import EpisodeRecord, summarize

TASKS = ["reach-v3", "pick-place-v3"]


def results_doc(out: Path | None = None, **cfg_extra) -> dict:
    """A results.json as `damvla eval` writes it, for 2 tasks x 2 episodes; with ``out``, the first
    episode of each task has a real video and every episode a real router plot there."""
    from damvla.evaluation.plots import plot_router
    from damvla.evaluation.video import write_mp4

    records = [EpisodeRecord(t, s, n, None, 0.01, 0.02) for t in TASKS for s, n in ((True, 40), (False, 60))]
    summary = summarize(records, TASKS)
    episodes = []
    for i, r in enumerate(records):
        seed = 1_000_000 + i % 2
        ep = {"task": r.task, "seed": seed, "key": f"{r.task}/seed-{seed}", "success": r.success, "steps": r.steps,
              "error": None, "milestones": {"reached": True, "grasped": r.success}, "video": None, "plot": None}  # fmt: skip
        if out is not None:
            if i % 2 == 0:
                frames = np.zeros((4, 32, 32, 3), np.uint8)
                ep["video"] = str(write_mp4(out / "videos" / r.task / f"seed-{seed}.mp4", frames, 30).relative_to(out))
            w = np.linspace(0, 1, r.steps)
            ep["plot"] = str(plot_router(out / "plots" / r.task / f"seed-{seed}.png", ep["key"], w,
                                         (w > 0.5).astype(int), None).relative_to(out))  # fmt: skip
        episodes.append(ep)
    for t in TASKS:
        summary["tasks"][t]["milestones"] = {"reached": 2, "grasped": 1, "success": 1}
    summary["overall"]["milestones"] = {"reached": 4, "grasped": 2, "success": 2}
    cfg = {"policy": "checkpoint", "checkpoint": "/abs/runs/mine", "suite": "reach,pick-place", "tasks": TASKS,
           "episodes": 2, "initial_states": "initial_states.jsonl", "seed": 0, "max_steps": None,
           "camera": "corner4", "resolution": 64, "workers": 2, "device": "cpu", "execution": "chunk",
           "execute_steps": 4, **cfg_extra}  # fmt: skip
    return {"command": "damvla eval runs/mine --suite reach,pick-place --episodes 2 --out eval/x", "config": cfg,
            "tasks": summary["tasks"], "overall": summary["overall"],
            "timing": {"wall_seconds": 12.0, "env_steps": 200, "env_steps_per_s_wall": 16.7, "policy_calls": 9},
            "versions": {"damvla": "0.1.0", "torch": "2.13.0+cpu", "git_commit": "abc"}, "episodes": episodes}  # fmt: skip


def test_resolved_checkpoint_follows_latest_and_reads_the_step(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step-0030000").mkdir(parents=True)
    (ckpts / "step-0030000" / "config.json").write_text("{}")
    (ckpts / "latest").write_text("step-0030000\n")
    assert resolved_checkpoint(tmp_path / "run") == ((ckpts / "step-0030000").resolve(), 30000)
    assert resolved_checkpoint(ckpts / "step-0030000") == ((ckpts / "step-0030000").resolve(), 30000)
    (tmp_path / "released").mkdir()
    (tmp_path / "released" / "config.json").write_text("{}")
    assert resolved_checkpoint(tmp_path / "released") == ((tmp_path / "released").resolve(), None)
    # Training writes the step into metadata.json, so a copied checkpoint still knows it.
    (tmp_path / "released" / "metadata.json").write_text('{"step": 9000, "fps": 80}')
    assert resolved_checkpoint(tmp_path / "released") == ((tmp_path / "released").resolve(), 9000)


def test_report_names_the_checkpoint_folder_a_run_folder_resolved_to_and_its_step():
    doc = results_doc(checkpoint_folder="/abs/runs/mine/checkpoints/step-0030000", checkpoint_step=30000)
    md = render_markdown(doc, "t")
    assert "checkpoint `/abs/runs/mine` (folder `/abs/runs/mine/checkpoints/step-0030000`, step 30000)" in md
    assert "step-0030000" in render_html(doc, "t") and "step 30000" in render_html(doc, "t")
    # results.json of older runs has neither key: the line stays as it was
    assert "Policy: checkpoint `/abs/runs/mine`, execution chunk" in render_markdown(results_doc(), "t")


def test_wall_clock_and_in_env_step_rates_are_labelled_apart():
    md = render_markdown(results_doc(), "t")
    assert "17 env steps/s overall (wall clock over the whole run" in md
    assert "| env steps/s (in env.step) |" in md
    assert "the overall figure above is wall clock instead" in md


def test_report_md_links_videos_and_plots_by_relative_path(tmp_path):
    doc = results_doc(tmp_path)
    _, md_path = write_results(tmp_path, doc, "tiny")
    md = md_path.read_text()
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert "videos/reach-v3/seed-1000000.mp4" in links and "plots/pick-place-v3/seed-1000001.png" in links
    assert "index.html" in links
    for link in links:
        assert not Path(link).is_absolute() and (tmp_path / link).is_file(), link
    # A results page lives elsewhere: its section carries no links that would break there.
    assert "](videos/" not in render_markdown(doc, "tiny")


def test_index_html_is_self_contained_and_every_link_resolves(tmp_path):
    doc = results_doc(tmp_path)
    write_results(tmp_path, doc, "tiny <run>")
    page = (tmp_path / "index.html").read_text()
    assert "<title>tiny &lt;run&gt;</title>" in page  # escaped
    assert page.count("<video controls") == 2 and page.count("<img ") == 4
    srcs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert srcs and not [s for s in srcs if "://" in s or s.startswith("/")]  # no CDN, no absolute paths
    for s in srcs:
        assert (tmp_path / s).is_file(), s
    assert "<script" not in page and "<link" not in page  # CSS inline, nothing fetched
    assert '<table id="success">' in page
    assert re.search(r"<td>\[\d+\.\d%, \d+\.\d%\]</td>", page)
    assert '<table id="phases">' in page and "<td>reached</td>" not in page
    assert doc["command"] in page and "2.13.0+cpu" in page


def _saved_figure(monkeypatch) -> list:
    figs: list = []
    orig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (figs.append(self), orig(self, *a, **k))[1])
    return figs


def test_router_plot_y_label_says_w_at_least_half_selects_the_gripper_head(tmp_path, monkeypatch):
    from damvla.evaluation.plots import plot_router

    figs = _saved_figure(monkeypatch)
    w = np.linspace(0, 1, 20)
    plot_router(tmp_path / "p.png", "t", w, (w > 0.5).astype(int), None)
    ylabel = figs[0].axes[0].get_ylabel()
    assert "≥ 0.5" in ylabel and "gripper head" in ylabel


def test_loss_curves_have_a_legend_for_raw_and_smoothed_and_a_title(tmp_path, monkeypatch):
    from damvla.training.logger import plot_losses

    run = tmp_path / "my-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": {1 / s}, "lr": 0.001}}\n' for s in range(1, 30)))
    figs = _saved_figure(monkeypatch)
    assert plot_losses(run / "metrics.jsonl", run / "loss_curves.png") == run / "loss_curves.png"
    legend = figs[0].axes[0].get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert any(t.startswith("raw") for t in texts) and any(t.startswith("smoothed") for t in texts)
    assert figs[0]._suptitle is not None and "my-run" in figs[0]._suptitle.get_text()
    assert "step 29" in figs[0]._suptitle.get_text()
    # A validation record at the step of the last training record does not hide it (a 2-step run used to
    # crash here); a file of validation records alone has no training curve to draw.
    (run / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5, "lr": 0.001}\n{"step": 2, "val_loss": 0.4}\n')
    assert plot_losses(run / "metrics.jsonl", run / "loss_curves.png") == run / "loss_curves.png"
    assert [line.get_ydata()[0] for line in figs[-1].axes[0].get_lines()] == [0.5, 0.5]
    (run / "metrics.jsonl").write_text('{"step": 2, "val_loss": 0.4}\n')
    assert plot_losses(run / "metrics.jsonl", run / "loss_curves.png") is None


def test_html_report_shows_missing_numbers_as_a_dash():
    doc = results_doc()
    for s in doc["tasks"].values():
        s["env_steps_per_s"] = None
    assert "| - |" in render_markdown(doc, "t") and "<td>-</td>" in render_html(doc, "t")
