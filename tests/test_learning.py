"""End to end: fitting one small fixed batch on CPU must drive the diffusion loss down."""

import pytest
import torch

from conftest import make_batch
from damvla.config import preset
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer


def _diffusion_loss(policy, batch, draws=64):
    """Mean over many noise/timestep draws (one forward with R = draws), no condition dropout."""
    policy.eval()
    r = policy.config.diffusion.repeated_steps
    policy.config.diffusion.repeated_steps = draws
    torch.manual_seed(123)  # the same draws before and after training
    with torch.no_grad():
        _, logs = policy(batch)
    policy.config.diffusion.repeated_steps = r
    policy.train()
    return logs.get("loss_action", logs.get("loss_arm", 0.0) + logs.get("loss_gripper", 0.0))


@pytest.mark.parametrize("ablation", ["damvla", "cogact"])
def test_fitting_a_fixed_batch_drops_the_diffusion_loss_5x(ablation):
    torch.manual_seed(0)
    cfg = preset("tiny", ablation)
    policy = DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))
    batch = make_batch(cfg, b=4, seed=1)
    before = _diffusion_loss(policy, batch)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(300):
        loss, _ = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _diffusion_loss(policy, batch)
    assert after < before / 5, f"{ablation}: diffusion loss {before:.4f} -> {after:.4f}"
