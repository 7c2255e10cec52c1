"""`damvla train` under bad input and faults: mismatches named before training, NaN loss, a kill
during a checkpoint write."""

from __future__ import annotations

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
from damvla.training.checkpoint import find_checkpoint
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
