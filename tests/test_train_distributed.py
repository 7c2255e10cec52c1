"""2-process training on CPU (gloo, torchrun): DDP matches one process with the same global batch;
FSDP2 runs, its checkpoint holds the gathered weights, and it resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from damvla.model.policy import DAMVLAPolicy
from damvla.training.checkpoint import find_checkpoint
from test_train_cli import FAST, train, write_dataset

COMMON = ["--preset", "tiny", "--num-workers", "0", "--warmup", "1", "--save-every", "3", *FAST]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dist") / "ds")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "damvla.cli", "train", *args]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        # float summation order differs (two half-batches + all-reduce); Adam's first steps are
        # ~lr-sized, so 1e-5 absolute is far below any real difference.
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_then_fsdp2_resume_on_two_processes_match_one_process_with_the_same_global_batch(
    dataset: Path, tmp_path: Path
) -> None:
    opts = ["--schedule", "constant", "--ema", "0.9"]  # constant LR: a 2-step run is the start of a 3-step one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train(dataset, tmp_path / "one", *opts, "--warmup", "1", "--save-every", "3", steps=3) == 0  # 1 x 4
    finally:
        torch.set_num_threads(n)
    ref = find_checkpoint(tmp_path / "one")

    # DDP, 2 processes x 2 samples, 2 steps ...
    out = tmp_path / "dist"
    proc = torchrun("--dataset", str(dataset), "--out", str(out), "--steps", "2", "--batch-size", "2", *opts, *COMMON)
    assert "effective global batch: 4 = 2 per device x 2 device(s) x 1 accumulation step(s)" in proc.stdout
    assert "(DDP)" in proc.stdout
    # ... then resumed under FSDP2 (LLM and ViT blocks sharded) for the third step.
    proc = torchrun("--resume", str(out), "--steps", "3", "--parallel", "fsdp")
    assert "(FSDP2)" in proc.stdout and "resuming at step 2" in proc.stdout
    ckpt = find_checkpoint(out)
    assert ckpt.name == "step-0000003"
    # The checkpoint holds whole (gathered) tensors: a shape-checked load; and the same weights as 1 process.
    policy = DAMVLAPolicy.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    close(load_file(str(ref / "model.safetensors")), load_file(str(ckpt / "model.safetensors")))  # EMA export
    live = [torch.load(c / "training_state.pt", weights_only=False)["model"] for c in (ref, ckpt)]
    close(*live)
