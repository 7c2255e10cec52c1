import pytest
import torch

from damvla.config import preset
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer


def make_batch(cfg, b=3, seed=0, pad_from=12):
    g = torch.Generator().manual_seed(seed)
    s, h, d = cfg.vision.image_size, cfg.horizon, cfg.action_dim
    pad = torch.zeros(b, h, dtype=torch.bool)
    pad[:, pad_from:] = True
    action = torch.rand(b, h, d, generator=g) * 2 - 1
    action[..., cfg.gripper_index] = (action[..., cfg.gripper_index] > 0).float()
    return {
        "observation.images.image": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
        "task": [f"pick up the block number {i}" for i in range(b)],
        "action": action,
        "action_is_pad": pad,
        "trajectory_weight": torch.rand(b, h, generator=g),
        "router_label": torch.randint(0, 2, (b,), generator=g),
    }


@pytest.fixture
def one_thread():
    """Small ops on 2 shared cores: one intra-op thread is several times faster and fully deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_policy():
    def build(ablation="damvla", **overrides):
        torch.manual_seed(0)
        cfg = preset("tiny", ablation)
        for k, v in overrides.items():
            section, _, field = k.partition("__")
            setattr(getattr(cfg, section), field, v) if field else setattr(cfg, section, v)
        return DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim))

    return build
