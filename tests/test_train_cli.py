"""`damvla train` end to end on a tiny synthetic dataset: outputs, exact resume, accumulation invariance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from damvla.cli import main
from damvla.data.dataset import PolicyDataset
from damvla.data.lerobot import LeRobotWriter
from damvla.model.policy import DAMVLAPolicy
from damvla.training.checkpoint import STATE_FILE, find_checkpoint
from damvla.training.config import RunConfig

CAM = "observation.images.image"
# The tiny preset, shrunk further for speed (the code paths are the same).
FAST = ["dit.depth=1", "language.num_layers=2", "vision.dinov2.num_layers=2", "vision.siglip.num_layers=2"]


def write_dataset(root: Path, lengths: tuple[int, ...] = (12, 9, 10), action_dim: int = 7, side: int = 16) -> Path:
    """Random frames, Gaussian actions with a binary gripper (last dim) that closes halfway through."""
    feats = {
        CAM: {"dtype": "image", "shape": [side, side, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [action_dim]},
    }
    info = {"damvla": {"gripper_index": action_dim - 1, "gripper_threshold": 0.5, "gripper_open": 1.0}}
    w = LeRobotWriter(root, fps=10, features=feats, image_mode="image", extra_info=info)
    for e, t in enumerate(lengths):
        rng = np.random.default_rng(e)
        a = rng.normal(size=(t, action_dim)).astype(np.float32)
        a[:, -1] = (np.arange(t) < t // 2).astype(np.float32)
        frames = rng.integers(0, 256, (t, side, side, 3), dtype=np.uint8)
        w.add_episode({CAM: frames, "observation.state": np.zeros((t, 2), np.float32), "action": a}, task=f"pick block {e}")
    return w.finalize()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("train") / "ds")


def train(dataset: Path, out: Path, *extra: str, steps: int = 4) -> int:
    return main(["train", "--preset", "tiny", "--dataset", str(dataset), "--out", str(out), "--steps", str(steps),
                 "--batch-size", "4", "--num-workers", "0", "--warmup", "2", "--log-every", "1", *extra, *FAST])  # fmt: skip


def interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the next run die (KeyboardInterrupt) once ``step`` steps are done, like a killed job."""
    import damvla.train

    orig = damvla.train.Trainer.train_step

    def train_step(self, micro):  # type: ignore[no-untyped-def]
        if self.step == step:
            monkeypatch.setattr(damvla.train.Trainer, "train_step", orig)
            raise KeyboardInterrupt
        return orig(self, micro)

    monkeypatch.setattr(damvla.train.Trainer, "train_step", train_step)


def params(ckpt: Path, live: bool = False) -> dict[str, torch.Tensor]:
    """Exported weights of a checkpoint, or the live ones (training_state.pt) when they differ."""
    if live:
        state = torch.load(ckpt / STATE_FILE, weights_only=False)
        if state["model"] is not None:
            return state["model"]
    return load_file(str(ckpt / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def test_train_tiny_writes_loadable_checkpoint_png_tensorboard_and_metrics(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(dataset, out, "--save-every", "2", "--keep-last", "1", steps=4) == 0
    printed = capsys.readouterr().out
    assert "effective global batch: 4 = 4 per device x 1 device(s) x 1 accumulation step(s)" in printed
    assert "run: preset tiny" in printed and "trainable parameters" in printed

    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000004"]  # keep-last 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    ckpt = find_checkpoint(out)
    policy = DAMVLAPolicy.from_pretrained(ckpt)
    assert policy.config.dit.depth == 1 and policy.metadata["camera_key"] == CAM and policy.metadata["step"] == 4
    run = RunConfig.load(ckpt / "train_config.json")
    assert run.train.steps == 4 and run.policy == policy.config and run.train.overrides == FAST

    ds = PolicyDataset(dataset, horizon=policy.config.horizon, image_size=policy.config.vision.image_size)
    batch = torch.utils.data.default_collate([ds[0], ds[5]])
    actions = policy.predict_action_chunk(batch)
    assert actions.shape == (2, policy.config.horizon, 7) and torch.isfinite(actions).all()

    assert (out / "loss_curves.png").stat().st_size > 1000
    assert any((out / "tb").iterdir())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "loss_arm", "loss_gripper", "loss_router", "router_acc", "lr", "grad_norm", "samples_per_s"):
        assert all(np.isfinite(r[key]) for r in rows), key


def test_resume_continues_exactly_like_an_uninterrupted_run(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    # 31 samples / batch 4 = 7 steps per epoch: 20 steps cross two epoch boundaries.
    assert train(dataset, tmp_path / "straight", "--save-every", "10", steps=20) == 0
    interrupt_after(monkeypatch, 12)  # killed 2 steps after the step-10 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "split", "--save-every", "10", steps=20)
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    a = find_checkpoint(tmp_path / "straight")
    b = find_checkpoint(tmp_path / "split")
    assert a.name == b.name == "step-0000020"
    assert_identical(params(a), params(b))
    # the metrics file of the resumed run continues the same curve
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))


def test_resume_is_exact_with_ema_lora_accumulation_workers_and_augmentation(dataset: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:  # fmt: skip
    opts = ["--ema", "0.9", "--lora", "4", "--freeze", "vision", "--grad-accum", "2", "--batch-size", "2",
            "--save-every", "3", "--aug-shift", "0.1", "--aug-color", "0.2"]  # fmt: skip
    assert train(dataset, tmp_path / "straight", *opts, steps=6) == 0
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "split", *opts, "--num-workers", "2", steps=6)
    assert main(["train", "--resume", str(tmp_path / "split" / "checkpoints" / "step-0000003"), "--num-workers", "2"]) == 0
    a, b = find_checkpoint(tmp_path / "straight"), find_checkpoint(tmp_path / "split")
    assert_identical(params(a, live=True), params(b, live=True))  # live weights incl. LoRA adapters
    assert_identical(params(a), params(b))  # exported: EMA, LoRA merged
    exported, live = params(a), params(a, live=True)
    assert not any("lora_" in k for k in exported) and any("lora_" in k for k in live)
    # vision frozen: exported vision weights are the initial ones in both, LoRA merged into the LLM
    k = "language.llm.layers.0.self_attn.q_proj.weight"
    assert k in exported and not torch.equal(exported[k], live[k.replace(".weight", ".base_layer.weight")])
    DAMVLAPolicy.from_pretrained(a)  # loads without LoRA modules


def test_gradient_accumulation_matches_one_big_batch(dataset: Path, tmp_path: Path) -> None:
    # with augmentation on: each sample's shift and colour come from its own seed, not its batch position
    aug = ["--aug-shift", "0.1", "--aug-color", "0.2"]
    assert train(dataset, tmp_path / "big", "--batch-size", "4", *aug, steps=2) == 0
    assert train(dataset, tmp_path / "accum", "--batch-size", "1", "--grad-accum", "4", *aug, steps=2) == 0
    a, b = params(find_checkpoint(tmp_path / "big")), params(find_checkpoint(tmp_path / "accum"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_resume_refuses_to_change_the_run(dataset: Path, tmp_path: Path, capsys) -> None:
    assert train(dataset, tmp_path / "run", "--save-every", "2", steps=2) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--lr", "1.0"]) == 1
    assert "['lr'] differ from the run being resumed" in capsys.readouterr().err
    assert train(dataset, tmp_path / "run", steps=2) == 1  # same --out again without --resume
    assert "already holds checkpoints" in capsys.readouterr().err


def test_short_run_warns_that_it_ends_inside_warmup_and_prints_no_json_dump(dataset: Path, tmp_path: Path, capsys) -> None:
    assert train(dataset, tmp_path / "run", "--warmup", "10", steps=3) == 0
    out = capsys.readouterr().out
    assert "ends inside the learning-rate warm-up" in out
    assert '"policy": {' not in out  # the config is summarised, the whole of it is in train_config.json


def test_a_task_too_long_for_the_prompt_is_refused_before_training(dataset: Path, tmp_path: Path, capsys) -> None:
    # "In: What action should the robot take to pick block 0?\nOut: " is 60 bytes.
    assert train(dataset, tmp_path / "run", "language.max_prompt_tokens=40") == 1
    err = capsys.readouterr().err
    assert "3 task(s) make prompts longer than language.max_prompt_tokens=40" in err
    assert "pass the override language.max_prompt_tokens=60" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bad_train_argument_is_refused_before_torch_is_imported() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom damvla.cli import main\ntry:\n    main(['train', '--steps', 'many'])\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "exit 2 False" in out.stdout, out.stdout + out.stderr
    assert "invalid int value" in out.stderr
