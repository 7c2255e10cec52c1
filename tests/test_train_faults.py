"""`damvla train` under bad input and faults: mismatches named before training, NaN loss, a kill
during a checkpoint write, a disk that fills up, a torn metrics.jsonl, resuming on other data."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from damvla.cli import main
from damvla.model.policy import DAMVLAPolicy
from damvla.training.checkpoint import STATE_FILE, find_checkpoint
from test_train_cli import FAST, train, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("faults") / "ds")


@pytest.mark.parametrize(
    ("make", "overrides", "expected"),
    [
        ("dim4", [], "action dimension mismatch: dataset"),
        ("ok", ["vision.camera=wrist"], "no camera 'observation.images.wrist' (config vision.camera='wrist')"),
        ("ok", ["gripper_index=2"], "gripper index mismatch"),
        ("no_stats", [], "stats.json"),
    ],
)
def test_dataset_config_mismatch_is_named_before_training(
    dataset: Path, tmp_path: Path, capsys, monkeypatch, make: str, overrides: list[str], expected: str
) -> None:
    import damvla.train

    if make == "dim4":
        ds = write_dataset(tmp_path / "ds4", lengths=(6, 6), action_dim=4)
    elif make == "no_stats":
        ds = tmp_path / "ds"
        shutil.copytree(dataset, ds)
        (ds / "meta" / "stats.json").unlink()
    else:
        ds = dataset
    built = []
    monkeypatch.setattr(damvla.train.Trainer, "fit", lambda self: built.append(self) or 0)
    assert train(ds, tmp_path / "run", *overrides) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert not built and not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(dataset: Path, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:  # fmt: skip
    calls = {"n": 0}
    forward = DAMVLAPolicy.forward

    def poisoned(self, batch, draws=None, num_valid=None):  # type: ignore[no-untyped-def]
        loss, logs = forward(self, batch, draws, num_valid)
        calls["n"] += 1
        if calls["n"] >= 3:  # step 3 diverges
            loss = loss * float("nan")
            logs["loss"] = float("nan")
        return loss, logs

    monkeypatch.setattr(DAMVLAPolicy, "forward", poisoned)
    out = tmp_path / "run"
    assert train(dataset, out, "--save-every", "2", steps=6) == 1
    err = capsys.readouterr().err
    assert "step 3: loss is nan" in err and "step-0000002" in err, err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002"]
    policy = DAMVLAPolicy.from_pretrained(find_checkpoint(out))
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert (out / "loss_curves.png").exists()  # the curves up to the failure are still drawn


KILLER = """
import os, signal, sys
import torch
import damvla.training.checkpoint as ck
from damvla.cli import main

torch.set_num_threads(1)
orig = ck.save_state
calls = []

def save_state(path, state):
    calls.append(path)
    if len(calls) == 2:  # the second checkpoint: half-written state, then the process is killed
        path.write_bytes(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    orig(path, state)

ck.save_state = save_state
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_leaves_previous_checkpoint_and_resume_works(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--dataset", str(dataset), "--out", str(out), "--steps", "4", "--batch-size", "4",
            "--num-workers", "0", "--save-every", "2", *FAST]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    assert [p.name for p in ckpts.glob(".tmp-step-0000004-*")], "the interrupted write should have left its temp folder"
    assert not (ckpts / "step-0000004").exists()
    DAMVLAPolicy.from_pretrained(find_checkpoint(out))

    assert main(["train", "--resume", str(out)]) == 0
    assert (ckpts / "latest").read_text().strip() == "step-0000004"
    assert not list(ckpts.glob(".tmp-*")), "stale temp folders are cleaned up"
    DAMVLAPolicy.from_pretrained(ckpts / "step-0000004")


def negate_arm_actions(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with the same episodes and lengths but other (negated) arm actions."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(src, dst)
    for f in sorted((dst / "data").rglob("*.parquet")):
        t = pq.read_table(f)
        a = np.stack(t["action"].to_numpy(zero_copy_only=False)).astype(np.float32)
        a[:, :-1] *= -1  # the gripper (last dim) is kept: only the arm's motion differs
        col = pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])
        pq.write_table(t.set_column(t.schema.get_field_index("action"), "action", col), f)
    return dst


def test_resume_on_a_dataset_with_other_contents_is_refused_unless_allowed(dataset: Path, tmp_path: Path,
                                                                          capsys) -> None:  # fmt: skip
    other = negate_arm_actions(dataset, tmp_path / "other")
    out = tmp_path / "run"
    assert train(dataset, out, steps=2) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--dataset", str(other), "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert f"dataset {other} differs in content from the run's dataset {dataset}" in err, err
    assert "--allow-dataset-change" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000002"

    assert main(["train", "--resume", str(out), "--dataset", str(other), "--steps", "3", "--allow-dataset-change"]) == 0
    assert "--allow-dataset-change: the run continues on" in capsys.readouterr().out
    # From here on the run is on the new data: resuming on it needs no flag.
    assert main(["train", "--resume", str(out), "--dataset", str(other), "--steps", "4"]) == 0


def test_resume_of_a_run_saved_without_a_dataset_fingerprint_notes_it(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(dataset, out, steps=2) == 0
    state_file = find_checkpoint(out) / STATE_FILE
    state = torch.load(state_file, weights_only=False)
    del state["dataset_fingerprint"]  # as written before checkpoints recorded it
    torch.save(state, state_file)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert "records no dataset fingerprint" in capsys.readouterr().out
    assert "dataset_fingerprint" in torch.load(find_checkpoint(out) / STATE_FILE, weights_only=False)


def test_torn_last_metrics_line_is_dropped_on_resume(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(dataset, out, steps=2) == 0
    metrics = out / "metrics.jsonl"
    n = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.5 "lr"')  # the process died mid-write
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert f"note: {metrics}: line {n + 1} is cut short" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_corrupt_metrics_line_in_the_middle_is_an_error_naming_file_and_line(dataset: Path, tmp_path: Path,
                                                                            capsys) -> None:  # fmt: skip
    out = tmp_path / "run"
    assert train(dataset, out, steps=2) == 0
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0][:10], *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 1
    err = capsys.readouterr().err
    assert f"{metrics}: line 1 is not a JSON record" in err, err


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"),
     RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")],
    ids=["enospc", "torch_zip_writer"],
)  # fmt: skip
def test_disk_full_during_a_checkpoint_is_named_and_leaves_no_temp_folder(dataset: Path, tmp_path: Path, capsys,
                                                                         monkeypatch, failure: Exception) -> None:  # fmt: skip
    import damvla.training.checkpoint as ck

    orig = ck.save_state
    calls = []

    def save_state(path: Path, state: dict) -> None:
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: the disk is full half-way through
            path.write_bytes(b"partial")
            raise failure
        orig(path, state)

    monkeypatch.setattr(ck, "save_state", save_state)
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    assert train(dataset, out, "--save-every", "2", steps=4) == 1
    err = capsys.readouterr().err
    prev_mb = sum(p.stat().st_size for p in (ckpts / "step-0000002").rglob("*") if p.is_file()) / 2**20
    assert f"no space left on {ckpts}: the checkpoint needs ~{prev_mb:.0f} MB" in err, err
    assert not list(ckpts.glob(".tmp-*")), "the failed write's temp folder is removed"
    assert (ckpts / "latest").read_text().strip() == "step-0000002"


def test_stale_temp_checkpoint_folder_is_removed_at_start(dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import damvla.train

    out = tmp_path / "run"
    stale = out / "checkpoints" / ".tmp-step-0000002-99999"
    stale.mkdir(parents=True)
    (stale / STATE_FILE).write_bytes(b"partial")
    monkeypatch.setattr(damvla.train.Trainer, "fit", lambda self: 0)  # the clean-up happens before training
    assert train(dataset, out) == 0
    assert not stale.exists()
    assert f"note: removed {stale}" in capsys.readouterr().out
