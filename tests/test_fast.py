"""FastPolicy and the tensorised DDIM loop give the reference policy's results (CPU, no CUDA graphs)."""

import pytest
import torch
from diffusers import DDIMScheduler

from conftest import make_batch
from damvla.config import DiffusionConfig
from damvla.diffusion import Diffusion
from damvla.model.fast import DDIMTables, FastPolicy, ddim_sample

TOL = 1e-4  # fp32; the fast path drops the attention mask and pads prompts differently


def _toy_eps(seed: int = 0):
    """A deterministic eps_fn that depends on x, t and the guidance half, like a real head."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(7, 7, generator=g) * 0.3

    def eps_fn(x, t, uncond):
        return torch.tanh(x @ w + t[:, None, None] / 50.0) + 0.2 * uncond[:, None, None].float()

    return eps_fn


def _with_random_readout(policy):
    # The DiT read-out is zero-initialised (predicts zero noise), which would make any loop look right.
    g = torch.Generator().manual_seed(1)
    for head in policy.heads.values():
        head.final.weight.data = torch.randn(head.final.weight.shape, generator=g) * 0.3
        head.final.bias.data = torch.randn(head.final.bias.shape, generator=g) * 0.1
    return policy.eval()


@pytest.mark.parametrize("scale", [1.5, 1.0])
@pytest.mark.parametrize("steps", [10, 7])
def test_tensorised_ddim_equals_diffusion_sample_for_fixed_noise(scale, steps):
    diffusion = Diffusion(DiffusionConfig(cfg_scale=scale, inference_steps=steps))
    noise = torch.randn(3, 16, 7, generator=torch.Generator().manual_seed(0)) * 1.5
    ref = diffusion.sample(_toy_eps(), noise)
    ours = ddim_sample(_toy_eps(), noise, DDIMTables.from_diffusion(diffusion), scale)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0), (ours - ref).abs().max()


def test_ddim_tables_follow_the_diffusers_scheduler():
    diffusion = Diffusion(DiffusionConfig())
    tables = DDIMTables.from_diffusion(diffusion)
    sched = DDIMScheduler(**diffusion._kw)
    sched.set_timesteps(10)
    assert tables.timesteps.tolist() == sched.timesteps.tolist()
    assert tables.clip == 1.0
    # The last step lands on alpha_prev = 1 (set_alpha_to_one): x becomes the clipped x0 estimate.
    assert tables.sqrt_alpha_prev[-1].item() == 1.0 and tables.sqrt_beta_prev[-1].item() == 0.0


def _force_mixed_routing(policy, batch):
    """Shift the router's bias so that half the batch goes to each head."""
    _, f_cog, f_rea = policy.encode(batch)
    logits = policy._router_logit(f_cog, f_rea).sort().values
    mid = len(logits) // 2
    policy.router.fc2.bias.data -= (logits[mid - 1] + logits[mid]) / 2


@pytest.mark.parametrize("routing", ["hard", "soft"])
def test_fast_policy_equals_policy_for_fixed_noise(tiny_policy, routing):
    policy = _with_random_readout(tiny_policy("damvla", inference__routing=routing))
    batch = make_batch(policy.config, b=4)
    _force_mixed_routing(policy, batch)
    noise = torch.randn(4, 16, 7, generator=torch.Generator().manual_seed(2))
    ref, ref_info = policy.predict_action_chunk(batch, noise=noise, return_info=True)
    out, info = FastPolicy(policy).predict_action_chunk(batch, noise=noise, return_info=True)
    assert sorted(info["head"].tolist()) == [0, 0, 1, 1]  # both heads exercised
    assert torch.equal(info["head"], ref_info["head"])
    assert torch.allclose(info["router_weight"], ref_info["router_weight"], atol=1e-5)
    assert torch.allclose(out, ref, atol=TOL), (out - ref).abs().max()


def test_fast_policy_equals_policy_single_head_cogact(tiny_policy):
    policy = _with_random_readout(tiny_policy("cogact"))
    batch = make_batch(policy.config, b=2)
    noise = torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(3))
    ref = policy.predict_action_chunk(batch, noise=noise)
    assert torch.allclose(FastPolicy(policy).predict_action_chunk(batch, noise=noise), ref, atol=TOL)


def test_static_prompt_padding_leaves_latents_unchanged(tiny_policy):
    # Reasoning layer == last layer takes the hook path (transformers' last hidden state is post-norm).
    for layer in (2, 4):
        policy = tiny_policy("damvla", language__reasoning_layer=layer).eval()
        batch = make_batch(policy.config, b=3)
        batch["task"] = ["go", "put the block in the drawer", "open"]
        feats, f_cog, f_rea = policy.encode(batch)
        for static in (True, False):
            fast = FastPolicy(policy, static_prompt=static)
            c, r = fast.language(fast.vision(batch).patches, batch["task"])
            assert torch.allclose(c, f_cog, atol=1e-5) and torch.allclose(r, f_rea, atol=1e-5)


def test_bf16_fast_policy_runs_and_keeps_ddim_state_fp32(tiny_policy):
    policy = _with_random_readout(tiny_policy("damvla"))
    batch = make_batch(policy.config, b=2)
    out = FastPolicy(policy, dtype=torch.bfloat16).predict_action_chunk(batch)
    assert out.dtype == torch.float32 and out.shape == (2, 16, 7) and torch.isfinite(out).all()
    assert policy.heads["arm"].final.weight.dtype == torch.bfloat16  # cast in place, as documented


def test_cuda_graph_on_cpu_is_a_clear_error(tiny_policy):
    with pytest.raises(ValueError, match="CUDA device"):
        FastPolicy(tiny_policy("damvla"), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_matches_eager_on_gpu(tiny_policy):
    policy = _with_random_readout(tiny_policy("damvla")).cuda()
    batch = make_batch(policy.config, b=2)
    noise = torch.randn(2, 16, 7, device="cuda")
    ref = FastPolicy(policy).predict_action_chunk(batch, noise=noise)
    graphed = FastPolicy(policy, cuda_graph=True)
    for _ in range(2):  # capture, then replay
        out = graphed.predict_action_chunk(batch, noise=noise)
        assert torch.allclose(out, ref, atol=TOL)
