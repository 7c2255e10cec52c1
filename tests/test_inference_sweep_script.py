"""scripts/inference_sweep.sh: settings are chosen on validation states that the test tables never use, the
final check pairs the chosen setting with the checkpoint's own on the test states, and finished evaluations
are not run again (a stand-in CLI records the calls instead of evaluating)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
if [ "$1" = eval ]; then
  out=$(echo "$*" | sed 's/.*--out \\([^ ]*\\).*/\\1/'); mkdir -p "$out"; echo '{"complete": true}' > "$out/results.json"
fi
"""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture
def sweep(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "inference_sweep.sh", repo / "scripts")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-0000010\n")
    fake = tmp_path / "damvla"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    work, calls = tmp_path / "work", tmp_path / "calls.txt"

    def run(*args: str, **env: str) -> list[str]:
        calls.write_text("")
        full = {**os.environ, "DAMVLA": str(fake), "WORK": str(work), "CALLS": str(calls), **env}
        subprocess.run(["bash", "scripts/inference_sweep.sh", *args], cwd=repo, env=full, check=True,
                       capture_output=True, text=True)  # fmt: skip
        return calls.read_text().splitlines()

    return run, run_dir, work


def test_the_sweep_runs_every_setting_on_validation_states_against_the_checkpoints_own(sweep) -> None:
    run, run_dir, work = sweep
    calls = run("ft", str(run_dir), "execute-2", "cfg-1.0", "ddim-20")
    evals, compare = calls[:-1], calls[-1]
    assert [c.split()[0] for c in evals] == ["eval"] * 4 and compare.startswith("compare")
    assert all("--state-offset 50 " in c and "--episodes 30 " in c for c in evals)
    assert "--execute-steps" not in evals[0] and "--cfg-scale" not in evals[0]  # the baseline: the checkpoint's own
    assert evals[1].endswith("--execution chunk --execute-steps 2") and evals[2].endswith("--cfg-scale 1.0")
    assert evals[3].endswith("--inference-steps 20")
    assert f"--run checkpoint={work}/sweeps/ft/checkpoint:{run_dir}" in compare and "--baseline checkpoint" in compare
    assert "--keep-records docs/records/inference-ft " in compare or compare.endswith("docs/records/inference-ft")
    assert "eval-pool indices 50-79" in compare
    # a second call finds the evaluations complete and only rewrites the table
    assert [c.split()[0] for c in run("ft", str(run_dir), "execute-2", "cfg-1.0", "ddim-20")] == ["compare"]


def test_the_final_check_pairs_the_chosen_setting_with_the_checkpoint_on_the_test_states(sweep) -> None:
    run, run_dir, work = sweep
    calls = run("ft", str(run_dir), FINAL="execute-2")
    assert [c.split()[0] for c in calls] == ["eval", "eval", "compare"]
    assert all("--state-offset 0 " in c and "--episodes 50 " in c and "--videos 1 " in c for c in calls[:2])
    assert "--execute-steps" not in calls[0] and calls[1].endswith("--execute-steps 2")
    assert "--keep-records docs/records/inference-ft-test" in calls[2]
    # an existing evaluation of the checkpoint's own settings stands in for the first one
    base = work / "given"
    base.mkdir()
    (base / "results.json").write_text(json.dumps({"complete": True}))
    calls = run("ft2", str(run_dir), FINAL="cfg-1", TEST_BASELINE=str(base))
    assert [c.split()[0] for c in calls] == ["eval", "compare"] and f"--run checkpoint={base}:{run_dir}" in calls[1]


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("ft", "RUN", "execute-0"), {}),  # not a setting
        (("ft", "RUN", "fast"), {}),
        (("ft", "RUN"), {"OFFSET": "10"}),  # validation states overlapping the test states
        (("ft", "RUN"), {"FINAL": "checkpoint"}),
        (("ft", "NOT_A_RUN"), {}),
    ],
)
def test_refuses_unknown_settings_test_state_overlap_and_a_missing_run(sweep, args, env) -> None:
    run, run_dir, _ = sweep
    args = tuple(str(run_dir) if a == "RUN" else a for a in args)
    with pytest.raises(subprocess.CalledProcessError) as err:
        run(*args, **env)
    assert err.value.returncode == 2
    assert not list((run_dir.parent / "work").rglob("results.json"))  # refused before any evaluation
