"""scripts/grip3_table.sh: each piece resumes what an earlier session left, and the table is rebuilt from
the kept records plus the new seed (a stand-in CLI records the calls instead of training)."""

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
case $1 in
  collect) out=$(echo "$*" | sed 's/.*--out \\([^ ]*\\).*/\\1/'); mkdir -p "$out/meta"; echo '{}' > "$out/meta/info.json" ;;
  train) mkdir -p "$WORK/runs/x/checkpoints" ;;
  eval) ;;
esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_each_piece_resumes_and_the_table_reads_every_record(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "grip3_table.sh", repo / "scripts")
    records = repo / "docs" / "records" / "grip3"
    for name in ("cogact_s0", "damvla_s0", "damvla_s1"):
        (records / name).mkdir(parents=True)
        (records / name / "record.json").write_text("{}")
    fake = tmp_path / "damvla"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    work, calls = tmp_path / "work", tmp_path / "calls.txt"
    env = {**os.environ, "DAMVLA": str(fake), "WORK": str(work), "CALLS": str(calls)}

    def run(*args: str) -> list[str]:
        calls.write_text("")
        subprocess.run(["bash", "scripts/grip3_table.sh", *args], cwd=repo, env=env, check=True)
        return calls.read_text().splitlines()

    first = run("damvla", "1")
    assert [c.split()[0] for c in first] == ["collect", "train", "eval", "compare"]
    assert "--seed 1" in first[1] and "--resume" not in first[2]
    compare = first[3]
    # the kept records, except damvla_s1, which the new run folders replace
    assert "cogact/s0=docs/records/grip3/cogact_s0" in compare and "damvla/s0=docs/records/grip3/damvla_s0" in compare
    assert f"damvla/s1={work}/runs/eval_v2_damvla_s1:{work}/runs/v2_damvla_s1" in compare
    assert "records/grip3/damvla_s1" not in compare and "--keep-records docs/records/grip3" in compare

    # a later session: training resumes from its checkpoint, the interrupted evaluation from its journal
    run_dir, eval_dir = work / "runs" / "v2_damvla_s1", work / "runs" / "eval_v2_damvla_s1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-0001000")
    eval_dir.mkdir(parents=True)
    (eval_dir / "run.json").write_text("{}")
    (eval_dir / "results.json").write_text(json.dumps({"complete": False}, indent=2))
    second = run("damvla", "1")
    assert [c.split()[0] for c in second] == ["train", "eval", "compare"]
    assert second[0].startswith(f"train --resume {run_dir}") and "--resume" in second[1]
    # a finished evaluation is not run again
    (eval_dir / "results.json").write_text(json.dumps({"complete": True}, indent=2))
    assert [c.split()[0] for c in run("damvla", "1")] == ["train", "compare"]
    # --table: the records alone
    table = run("--table")
    assert len(table) == 1 and table[0].count("--run ") == 3

    nostate = run("damvla-nostate", "0")
    assert nostate[0].endswith("state_dim=0") and "damvla-nostate/s0=" in nostate[-1]
    assert first[1].endswith("state_dim=4")
    armq = run("damvla-armq", "0")
    assert armq[0].endswith("state_dim=4 vision.arm_queries=4") and "damvla-armq/s0=" in armq[-1]
    envstate = run("damvla-envstate", "0")  # its own data, collected with the environment state
    assert envstate[0].startswith("collect") and envstate[0].endswith("--environment-state")
    assert f"--out {work}/data/grip3_52_envstate" in envstate[0] and envstate[1].endswith("state_dim=4 env_state_dim=39")
    armq_env = run("damvla-armq-envstate", "0")  # the environment-state data, the arm head's own queries
    assert armq_env[0].endswith("state_dim=4 env_state_dim=39 vision.arm_queries=4") and "--ablation" not in armq_env[0]
    assert f"--dataset {work}/data/grip3_52_envstate " in armq_env[0] and "damvla-armq-envstate/s0=" in armq_env[-1]
    cogdit = run("damvla-cogdit-envstate", "0")  # DAM-VLA's two heads built as CogACT's DiT
    assert cogdit[0].endswith("env_state_dim=39 dit.condition=cogact diffusion.clip_sample=false")
    assert f"--dataset {work}/data/grip3_52_envstate " in cogdit[0] and "--ablation" not in cogdit[0]
    assert "damvla-cogdit-envstate/s0=" in cogdit[-1]
    aug = run("damvla-aug-envstate", "0")  # training flags of its own, before the policy overrides
    assert "--threads 1 --aug-shift 0.06 --aug-views 3 state_dim=4 env_state_dim=39" in aug[0]
    assert "--aug" not in first[1] and "damvla-aug-envstate/s0=" in aug[-1]
    cog_aug = run("cogact-aug-envstate", "0")  # CogACT trained the same way: the same flags, the single head
    assert "--ablation cogact" in cog_aug[0] and "--aug-shift 0.06 --aug-views 3 state_dim=4 env_state_dim=39" in cog_aug[0]
    with pytest.raises(subprocess.CalledProcessError):
        run("octo", "0")

    # another data recipe: its own data, run folders, records and table; no CogACT row, no --baseline
    env["VARIANT"] = "release"
    release = run("damvla", "0")
    assert [c.split()[0] for c in release] == ["collect", "train", "eval", "compare"]
    assert "--suite pick-place-v3" in release[0] and release[0].endswith("--release")
    assert f"--out {work}/data/pick-place_release_52" in release[0]
    assert f"--dataset {work}/data/pick-place_release_52 --out {work}/runs/v2rel_damvla_s0" in release[1]
    assert "--suite pick-place-v3" in release[2] and f"--out {work}/runs/eval_v2rel_damvla_s0" in release[2]
    assert "--keep-records docs/records/release" in release[3] and "--baseline" not in release[3]
    assert "records/grip3" not in release[3]
    (repo / "docs" / "records" / "release" / "cogact_s0").mkdir(parents=True)
    (repo / "docs" / "records" / "release" / "cogact_s0" / "record.json").write_text("{}")
    assert "--baseline cogact" in run("--table")[0]
    env["VARIANT"] = "demos200"
    assert "--episodes 200" in run("damvla", "0")[0]
    assert "--camera corner4" in release[0]
    env["VARIANT"] = "workspace"
    workspace = run("cogact", "1")
    assert "--camera workspace" in workspace[0] and f"--out {work}/data/grip3_ws_52" in workspace[0]
    assert f"--out {work}/runs/eval_v2ws_cogact_s1" in workspace[2]
    env["VARIANT"] = "front"
    front = run("damvla", "0")
    assert "--camera front" in front[0] and f"--out {work}/data/grip3_front_52" in front[0]
    assert "--keep-records docs/records/front" in front[3]
    env["VARIANT"] = "dart"
    assert "--noise 0.3" in run("damvla", "0")[0]
    env["VARIANT"] = "front2"  # two cameras: collected together, read by every row
    two = run("damvla-envstate", "0")
    assert "--camera front" in two[0] and two[0].endswith("--extra-cameras corner4 --environment-state")
    assert f"--out {work}/data/grip3_front_corner4_52_envstate" in two[0]
    assert two[1].endswith('env_state_dim=39 vision.extra_cameras=["corner4"]')
    # CogACT with the same auxiliary target reads the same data; it is the baseline where plain CogACT was not run
    (repo / "docs" / "records" / "front2" / "damvla-envstate_s1").mkdir(parents=True)
    (repo / "docs" / "records" / "front2" / "damvla-envstate_s1" / "record.json").write_text("{}")
    single = run("cogact-envstate", "0")
    assert single[0].startswith("train") and "--ablation cogact" in single[0]  # the data is there already
    assert single[0].endswith('env_state_dim=39 vision.extra_cameras=["corner4"]')
    assert "--baseline cogact-envstate" in single[-1] and "damvla-envstate/s1=" in single[-1]
    # a longer recipe where only CogACT with shifts was run: that row is the baseline
    env["STEPS"] = "12000"
    shifted = run("cogact-aug-envstate", "1")
    assert "--baseline cogact-aug-envstate" in shifted[-1] and "--keep-records docs/records/front2-s12000" in shifted[-1]
    del env["STEPS"]
    env["THREADS"], env["WORKERS"] = "2", "2"
    threaded = run("cogact", "0")
    assert "--threads 2" in threaded[-3] and "--workers 2" in threaded[-2]
    del env["THREADS"], env["WORKERS"]
    env["VARIANT"], env["STEPS"] = "grip3", "18000"
    longer = run("cogact", "2")
    assert [c.split()[0] for c in longer] == ["train", "eval", "compare"]  # the grip3 data is there already
    assert f"--out {work}/runs/v2s18000_cogact_s2 --steps 18000" in longer[0]
    assert "--keep-records docs/records/grip3-s18000" in longer[2] and "18000 training steps" in longer[2]
    # continuing a trained checkpoint: its weights and architecture, a lower lr, run folders and records of its own
    ckpt = repo / "checkpoints" / "released"
    ckpt.mkdir(parents=True)
    env["VARIANT"], env["STEPS"], env["FINETUNE"] = "front2", "4500", "checkpoints/released"
    with pytest.raises(subprocess.CalledProcessError):  # not a checkpoint folder (no model.safetensors)
        run("damvla-envstate", "0")
    (ckpt / "model.safetensors").write_text("")
    tuned = run("damvla-envstate", "0")
    assert [c.split()[0] for c in tuned] == ["train", "eval", "compare"]
    assert tuned[0].startswith("train --init checkpoints/released --dataset")
    assert "--preset" not in tuned[0] and "--lr 1e-4 --warmup 100" in tuned[0]
    assert f"--out {work}/runs/v2front2fts4500_damvla-envstate_s0 --steps 4500" in tuned[0]
    assert "--keep-records docs/records/front2-ft-s4500" in tuned[2]
    assert "fine-tuned at lr 1e-4 from the trained checkpoint its command names" in tuned[2]
    with pytest.raises(subprocess.CalledProcessError):  # the checkpoint is a DAM-VLA: no CogACT ablation on top
        run("cogact", "0")
    del env["FINETUNE"]
    env["STEPS"] = "lots"
    with pytest.raises(subprocess.CalledProcessError):
        run("damvla", "0")
    del env["STEPS"]
    env["VARIANT"] = "mt50"
    with pytest.raises(subprocess.CalledProcessError):
        run("damvla", "0")
