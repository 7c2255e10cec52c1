"""`damvla eval` under interruption (issue #13 findings 13-14): every finished episode is recorded as it
ends, Ctrl-C leaves a partial results.json marked incomplete and no traceback, --resume ends with the same
episodes as an uninterrupted run, and a rerun into a used --out is refused unless --overwrite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)

pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")

import damvla.envs.rollout as rollout_mod  # noqa: E402
from damvla.cli import main  # noqa: E402
from damvla.config import preset  # noqa: E402
from damvla.model.policy import DAMVLAPolicy  # noqa: E402
from damvla.normalize import ActionNormalizer  # noqa: E402
from test_eval_checkpoint import metadata  # noqa: E402

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.manual_seed(0)
    cfg = preset("tiny")
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim), metadata(), load_pretrained=False)
    return policy.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


def eval_argv(out: Path, policy: str, checkpoint: Path | None, *extra: str) -> list[str]:
    argv = ["eval", *([str(checkpoint)] if policy == "checkpoint" else []), "--policy", policy,
            "--suite", "reach,pick-place", "--episodes", "3", "--workers", "0", "--seed", "5",
            "--out", str(out), "--no-progress", "--threads", "1", "--videos", "1", "--plots", "1"]  # fmt: skip
    if policy == "checkpoint":
        # no router plots: each would replay the scripted expert to its end (100+ steps)
        argv += ["--max-steps", "6", "--execution", "chunk", "--execute-steps", "3", "--plots", "0"]
    else:  # 52 steps: the expert solves 2 of 3 reach and 1 of 3 pick-place episodes (37-57 steps needed)
        argv += ["--max-steps", "52", "--resolution", "64"]
    return argv + list(extra)


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Raise KeyboardInterrupt (what SIGINT raises) right after the n-th episode has been recorded."""
    real = rollout_mod.rollout

    def rollout(*args, progress=None, **kw):
        count = [0]

        def prog(res):
            progress(res)
            count[0] += 1
            if count[0] == n:
                raise KeyboardInterrupt

        return real(*args, progress=prog, **kw)

    monkeypatch.setattr(rollout_mod, "rollout", rollout)


def outcomes(res: dict) -> list[tuple]:
    return [(e["key"], e["success"], e["steps"], e["error"]) for e in res["episodes"]]


def counts(res: dict) -> dict:
    return {t: (s["successes"], s["episodes"], s["errors"]) for t, s in res["tasks"].items()}


@pytest.mark.parametrize("policy", ["expert", "checkpoint"])
def test_interrupted_then_resumed_eval_equals_an_uninterrupted_one(
    policy: str, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(eval_argv(tmp_path / "full", policy, ckpt)) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    assert full["complete"] is True and full["overall"]["episodes"] == 6
    if policy == "expert":
        assert counts(full) == {"reach-v3": (2, 3, 0), "pick-place-v3": (1, 3, 0)}
    capsys.readouterr()

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_after(m, 4)
        assert main(eval_argv(out, policy, ckpt)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted: 4 of 6 episodes finished" in err and "--resume" in err
    part = json.loads((out / "results.json").read_text())
    assert part["complete"] is False and part["episodes_planned"] == 6 and len(part["episodes"]) == 4
    assert sum(s["episodes"] for s in part["tasks"].values()) == 4
    journal = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert [j["key"] for j in journal] == [e["key"] for e in part["episodes"]]
    assert outcomes(part) == outcomes(full)[:4]  # what was recorded is what the full run got
    assert not (out / "report.md").exists()  # no report of a partial run

    # A resume with other options would mix episodes of two different evaluations: refused.
    assert main(eval_argv(out, policy, ckpt, "--resume", "--seed", "6")) == 1
    assert "--seed 6 (the interrupted run: 5)" in capsys.readouterr().err

    assert main(eval_argv(out, policy, ckpt, "--resume")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True
    assert counts(res) == counts(full)  # acceptance 3: same per-task counts
    assert outcomes(res) == outcomes(full)
    assert res["timing"]["episodes_run"] == 2 and res["timing"]["episodes_resumed"] == 4
    lines = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    full_lines = [json.loads(x) for x in (tmp_path / "full" / "episodes.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == [x["key"] for x in full_lines]  # episode order, not finishing order
    assert [x["log"]["gripper"] for x in lines] == [x["log"]["gripper"] for x in full_lines]
    print(policy, "uninterrupted", counts(full), "interrupted+resumed", counts(res))


def test_resume_drops_a_torn_last_journal_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        interrupt_after(m, 2)
        assert main(eval_argv(out, "expert", None, "--max-steps", "10")) == 130
    with (out / "episodes.jsonl").open("a") as f:
        f.write('{"task": "pick-place-v3", "seed": 10')  # killed mid-write
    assert main(eval_argv(out, "expert", None, "--max-steps", "10", "--resume")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is True and len(res["episodes"]) == 6
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 6


def test_rerun_into_a_used_out_is_refused_unless_overwrite_which_clears_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "e"
    assert main(eval_argv(out, "expert", None, "--max-steps", "10", "--videos", "3", "--plots", "3")) == 0
    assert len(list(out.glob("videos/*/*.mp4"))) == 6 and len(list(out.glob("plots/*/*.png"))) == 6
    capsys.readouterr()
    smaller = ["--max-steps", "10", "--episodes", "1", "--videos", "0", "--plots", "0"]
    assert main(eval_argv(out, "expert", None, *smaller)) == 1
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (6 episodes)" in err and "--overwrite" in err and "--resume" in err
    assert len(json.loads((out / "results.json").read_text())["episodes"]) == 6  # untouched

    (out / "notes.txt").write_text("mine")  # not eval's: left alone
    assert main(eval_argv(out, "expert", None, *smaller, "--overwrite")) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["episodes"]) == 2
    assert not (out / "videos").exists() and not (out / "plots").exists()  # nothing from the larger run
    assert len((out / "episodes.jsonl").read_text().splitlines()) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert main(eval_argv(out, "expert", None, *smaller, "--overwrite", "--resume")) == 1
    assert main(eval_argv(tmp_path / "new", "expert", None, "--resume")) == 1
    assert "holds no evaluation to continue" in capsys.readouterr().err


def test_ctrl_c_on_the_process_group_writes_a_partial_result_without_a_traceback(tmp_path: Path) -> None:
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it (workers included)."""
    out = tmp_path / "sig"
    argv = [sys.executable, "-m", "damvla.cli", "eval", "--policy", "random", "--suite", "reach",
            "--episodes", "40", "--max-steps", "200", "--workers", "1", "--videos", "0", "--plots", "0",
            "--out", str(out), "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "egl"}
    # A shell runs background jobs (nohup, `&` in a script, some CI runners) with SIGINT ignored, and Python
    # then never installs its KeyboardInterrupt handler: give the child the default, as a terminal would.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    journal = out / "episodes.jsonl"
    try:
        while proc.poll() is None and not (journal.is_file() and journal.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted:" in err and "--resume" in err
    res = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert res["complete"] is False and 2 <= len(res["episodes"]) == len(lines) < 40
    assert all(e["error"] is None for e in res["episodes"])  # no episode lost to a worker killed by Ctrl-C
