"""The auxiliary environment-state target (``env_state_dim``): datasets carry ``observation.environment_state``,
the policy regresses it from f_cog during training only, and the trainer normalises it by the dataset's stats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from damvla.cli import main
from damvla.config import apply_overrides, preset
from damvla.data.lerobot import LeRobotWriter
from damvla.model.policy import ENV_STATE_KEY, DAMVLAPolicy
from damvla.training.data import build_dataset, draw_training

CAM = "observation.images.image"
FAST = ["dit.depth=1", "language.num_layers=2", "vision.dinov2.num_layers=2", "vision.siglip.num_layers=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_dataset(root: Path, env_dim: int | None = 3, lengths: tuple[int, ...] = (12, 9, 10), side: int = 16) -> Path:
    feats = {
        CAM: {"dtype": "image", "shape": [side, side, 3]},
        "observation.state": {"dtype": "float32", "shape": [2]},
        "action": {"dtype": "float32", "shape": [7]},
    }
    if env_dim:
        feats[ENV_STATE_KEY] = {"dtype": "float32", "shape": [env_dim]}
    info = {"damvla": {"gripper_index": 6, "gripper_threshold": 0.5, "gripper_open": 1.0}}
    w = LeRobotWriter(root, fps=10, features=feats, image_mode="image", extra_info=info)
    for e, t in enumerate(lengths):
        rng = np.random.default_rng(e)
        a = rng.normal(size=(t, 7)).astype(np.float32)
        a[:, -1] = (np.arange(t) < t // 2).astype(np.float32)
        ep = {CAM: rng.integers(0, 256, (t, side, side, 3), dtype=np.uint8),
              "observation.state": np.zeros((t, 2), np.float32), "action": a}  # fmt: skip
        if env_dim:
            # a goal that differs per episode, then a constant padding dimension (std 0)
            env = np.zeros((t, env_dim), np.float32)
            env[:, 0] = 0.1 * e + np.linspace(0, 0.05, t)
            env[:, 1] = -0.2 * e
            ep[ENV_STATE_KEY] = env
        w.add_episode(ep, task=f"pick block {e}")
    return w.finalize()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("env") / "ds")


def config(*extra: str):
    return apply_overrides(preset("tiny"), FAST + ["env_state_dim=3", *extra])


def batch_and_draws(ds, cfg, rows=(0, 5, 13, 22)):
    b = default_collate([ds[i] for i in rows])
    draws = draw_training(torch.arange(len(rows)), cfg.diffusion.repeated_steps, cfg.horizon, cfg.action_dim,
                          cfg.diffusion.train_steps, 0.0)  # fmt: skip
    return b, draws


def test_samples_carry_the_environment_state_and_the_loss_adds_its_weighted_regression(dataset: Path) -> None:
    cfg = config()
    ds = build_dataset(str(dataset), cfg)
    assert ds[13][ENV_STATE_KEY].shape == (3,)
    assert torch.allclose(ds[13][ENV_STATE_KEY][1], torch.tensor(-0.2))  # episode 1's goal
    torch.manual_seed(0)
    policy = DAMVLAPolicy(cfg, ds.normalizer, ds.metadata)
    policy.set_env_state_stats([0.1, -0.2, 0.0], [0.1, 0.2, 0.0])  # std 0 is floored, not a division by 0
    b, draws = batch_and_draws(ds, cfg)
    loss, logs = policy(b, draws)
    assert np.isfinite(logs["loss_env_state"]) and logs["loss_env_state"] > 0
    aux_free = logs["loss"] - cfg.env_state_weight * logs["loss_env_state"]
    assert aux_free == pytest.approx(logs["loss_arm"] + logs["loss_gripper"] + cfg.weighting.router_loss_weight * logs["loss_router"], rel=1e-5)

    # The regression trains the VLM: the language model gets a gradient from the auxiliary loss alone.
    policy.zero_grad()
    feats, f_cog, _ = policy.encode(b)
    policy.env_state_loss(f_cog, b).backward()
    llm_grad = sum(float(p.grad.abs().sum()) for p in policy.language.parameters() if p.grad is not None)
    assert llm_grad > 0
    # ... and it is exactly the normalised target's mean squared error.
    target = (b[ENV_STATE_KEY] - policy.env_state_mean) / policy.env_state_std
    with torch.no_grad():
        want = torch.mean((policy.env_state_head(f_cog) - target) ** 2)
        assert float(policy.env_state_loss(f_cog, b)) == pytest.approx(float(want), rel=1e-6)
        assert float(policy.env_state_std[2]) == pytest.approx(1e-3)

    # Inference never reads it: a batch without the environment state predicts actions.
    policy.eval()
    obs = {k: v for k, v in b.items() if k != ENV_STATE_KEY}
    assert policy.predict_action_chunk(obs).shape == (4, cfg.horizon, cfg.action_dim)
    # Training does: without it the forward names the key.
    policy.train()
    with pytest.raises(ValueError, match=ENV_STATE_KEY):
        policy(obs, draws)


def test_a_dataset_without_the_environment_state_is_refused_with_how_to_get_it(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "plain", env_dim=None)
    with pytest.raises(ValueError, match="--environment-state"):
        build_dataset(str(root), config())
    with pytest.raises(ValueError, match="env_state_dim=5"):
        build_dataset(str(write_dataset(tmp_path / "wide", env_dim=3)), config("env_state_dim=5"))
    # Off (the default), the column is not read and samples do not carry it.
    assert ENV_STATE_KEY not in build_dataset(str(root), apply_overrides(preset("tiny"), FAST))[0]


def test_train_normalises_the_target_by_the_dataset_stats_and_logs_its_loss(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--dataset", str(dataset), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--num-workers", "0", "--warmup", "1", "--log-every", "1", "--val-episodes", "1",
                 "--val-every", "3", "--lr", "1e-9", *FAST, "env_state_dim=3", "env_state_weight=1000"]) == 0  # fmt: skip
    stats = json.loads((dataset / "meta" / "stats.json").read_text())[ENV_STATE_KEY]
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    weights = load_file(str(ckpt / "model.safetensors"))
    np.testing.assert_allclose(weights["env_state_mean"].numpy(), stats["mean"], rtol=1e-6)
    np.testing.assert_allclose(weights["env_state_std"].numpy(), np.maximum(stats["std"], 1e-3), rtol=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_env_state" in r for r in rows)
    # validation keeps val_loss the action (+ router) loss, comparable to a run without the target: with the
    # target weighted 1000 (and a learning rate that leaves the weights as they start) it stays O(1)
    val = [r for r in rows if "val_loss" in r][-1]
    assert 0 < val["val_loss"] < 5 and 1000 * val["val_loss_env_state"] > 50
    policy = DAMVLAPolicy.from_pretrained(ckpt)
    assert policy.config.env_state_weight == 1000 and policy.env_state_head is not None
