import json

import pytest
import torch

from conftest import make_batch
from damvla.config import preset
from damvla.model.loss import dual_scale_weights
from damvla.model.policy import DAMVLAPolicy
from damvla.normalize import ActionNormalizer


def _param_prefixes(policy):
    return {n.split(".")[0] + "." + n.split(".")[1] for n, _ in policy.named_parameters() if n.startswith("heads.")}


def test_dam_off_builds_one_head_and_no_router(tiny_policy):
    dam = tiny_policy("damvla")
    base = tiny_policy("cogact")
    assert _param_prefixes(dam) == {"heads.arm", "heads.gripper"} and dam.router is not None
    assert _param_prefixes(base) == {"heads.action"} and base.router is None
    assert not any(n.startswith("router.") for n, _ in base.named_parameters())


def test_vt_gives_arm_the_class_token_and_gripper_the_registers(tiny_policy):
    p = tiny_policy("damvla")
    r = p.config.vision.dinov2.num_register_tokens
    assert p.heads["arm"].num_visual == 1 and p.heads["gripper"].num_visual == r
    off = tiny_policy("no_vt")
    assert off.heads["arm"].visual_proj is None and off.heads["gripper"].visual_proj is None


def test_dl_switch_decides_which_latent_the_router_reads(tiny_policy):
    for ablation, latent_index in (("damvla", 2), ("no_dl", 1)):
        p = tiny_policy(ablation)
        batch = make_batch(p.config)
        seen = {}
        p.router.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
        feats, f_cog, f_rea = p.encode(batch)
        p(batch)
        expected = (None, f_cog, f_rea)[latent_index]
        assert torch.allclose(seen["x"], expected)
        assert not torch.allclose(f_cog, f_rea)


def test_acw_and_tw_switches_change_only_their_scale():
    cfg = preset("tiny")
    traj = torch.rand(2, 16)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    full = dual_scale_weights(traj, pad, 2, cfg.ablation, cfg.weighting)
    gamma = cfg.weighting.chunk_gamma ** torch.arange(16.0)
    assert torch.allclose(full[..., 1], traj * gamma)
    assert torch.allclose(full[..., 0], (1 - traj) * gamma)
    no_acw = dual_scale_weights(traj, pad, 2, preset("tiny", "no_vt").ablation.__class__(acw=False), cfg.weighting)
    assert torch.allclose(no_acw[..., 1], traj)
    from damvla.config import AblationConfig

    no_tw = dual_scale_weights(traj, pad, 2, AblationConfig(tw=False), cfg.weighting)
    assert torch.allclose(no_tw[..., 0], gamma.expand(2, 16)) and torch.allclose(no_tw[..., 1], gamma.expand(2, 16))


def test_padded_steps_weigh_exactly_zero():
    cfg = preset("tiny")
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[:, 10:] = True
    for ab in ("damvla", "cogact", "vt_acw_tw"):
        c = preset("tiny", ab)
        w = dual_scale_weights(torch.rand(2, 16), pad, c.num_heads, c.ablation, cfg.weighting)
        assert torch.all(w[:, 10:] == 0) and torch.all(w[:, :10] > 0)


def test_padded_predictions_get_no_gradient(tiny_policy):
    p = tiny_policy("damvla")
    batch = make_batch(p.config, pad_from=9)
    outs = []
    for head in p.heads.values():
        def keep(m, i, o):
            o.retain_grad()
            outs.append(o)

        head.register_forward_hook(keep)
    loss, _ = p(batch)
    loss.backward()
    for o in outs:
        assert torch.all(o.grad[:, 9:] == 0)
        assert o.grad[:, :9].abs().sum() > 0


def test_cogact_baseline_loss_is_the_plain_masked_eps_mse(tiny_policy):
    p = tiny_policy("cogact")
    batch = make_batch(p.config, pad_from=11)
    caught = {}
    orig = p.diffusion.add_noise

    def spy(x0, generator=None):
        out = orig(x0, generator)
        caught["eps"] = out[1]
        return out

    p.diffusion.add_noise = spy
    p.heads["action"].register_forward_hook(lambda m, i, o: caught.update(pred=o))
    loss, logs = p(batch)
    r = p.config.diffusion.repeated_steps
    valid = ~batch["action_is_pad"].repeat(r, 1)
    err = (caught["pred"] - caught["eps"]).pow(2).mean(-1)
    assert loss.item() == pytest.approx(err[valid].mean().item(), rel=1e-5)
    assert set(logs) == {"loss_action", "loss"}


def test_repeated_diffusion_steps_reach_the_loss(tiny_policy):
    for r in (1, 4):
        p = tiny_policy("damvla", diffusion__repeated_steps=r)
        batch = make_batch(p.config, b=3)
        sizes = []
        p.heads["arm"].register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
        vlm_calls = []
        p.language.register_forward_hook(lambda m, i, o: vlm_calls.append(1))
        p(batch)
        assert sizes == [3 * r] and len(vlm_calls) == 1


def test_loss_terms_are_reported_separately(tiny_policy):
    p = tiny_policy("damvla")
    loss, logs = p(make_batch(p.config))
    for k in ("loss_arm", "loss_gripper", "loss_router", "router_acc", "loss"):
        assert k in logs
    lam = p.config.weighting.router_loss_weight
    assert logs["loss"] == pytest.approx(logs["loss_arm"] + logs["loss_gripper"] + lam * logs["loss_router"], rel=1e-5)


def test_hard_routing_runs_only_the_chosen_head_and_soft_runs_both(tiny_policy):
    p = tiny_policy("damvla").eval()
    torch.nn.init.constant_(p.router.fc2.bias, 50.0)  # every sample routed to the gripper head
    calls = {"arm": 0, "gripper": 0}
    for name, head in p.heads.items():
        head.register_forward_hook(lambda m, i, o, n=name: calls.__setitem__(n, calls[n] + 1))
    batch = make_batch(p.config, b=2)
    _, info = p.predict_action_chunk(batch, return_info=True)
    assert info["head"].tolist() == [1, 1] and torch.all(info["router_weight"] > 0.99)
    assert calls["arm"] == 0 and calls["gripper"] == p.config.diffusion.inference_steps
    p.config.inference.routing = "soft"
    calls.update(arm=0, gripper=0)
    p.predict_action_chunk(batch)
    assert calls["arm"] == calls["gripper"] == p.config.diffusion.inference_steps


def test_predicted_actions_are_unnormalised_with_a_binary_gripper(tiny_policy):
    p = tiny_policy("damvla").eval()
    norm = ActionNormalizer(q01=[-2.0] * 6 + [0.0], q99=[2.0] * 6 + [1.0], normalize=[True] * 6 + [False])
    p.normalizer = norm
    a = p.predict_action_chunk(make_batch(p.config, b=2))
    assert a.shape == (2, 16, 7)
    assert a[..., :6].abs().max() <= 2.0 + 1e-5
    assert set(a[..., 6].unique().tolist()) <= {0.0, 1.0}


def test_save_load_gives_identical_actions_for_fixed_noise(tiny_policy, tmp_path):
    p = tiny_policy("damvla").eval()
    p.metadata = {"camera": "image"}
    batch = make_batch(p.config, b=2)
    noise = torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(3))
    before = p.predict_action_chunk(batch, noise=noise)
    p.save_pretrained(tmp_path / "ckpt")
    q = DAMVLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert q.config == p.config and q.metadata == {"camera": "image"}
    assert torch.equal(q.predict_action_chunk(batch, noise=noise), before)


def test_loading_rebuilds_the_architecture_from_the_saved_config(tiny_policy, tmp_path):
    p = tiny_policy("damvla")
    p.config.dit.depth = 3  # not the preset's value: must come back from config.json
    p2 = DAMVLAPolicy(p.config, p.normalizer)
    p2.save_pretrained(tmp_path / "c")
    assert len(DAMVLAPolicy.from_pretrained(tmp_path / "c").heads["arm"].blocks) == 3


def test_select_action_executes_n_steps_per_chunk(tiny_policy):
    p = tiny_policy("damvla").eval()
    p.config.inference.execute_steps = 3
    p.reset()
    calls = []
    p.language.register_forward_hook(lambda m, i, o: calls.append(1))
    batch = make_batch(p.config, b=2)
    actions = [p.select_action(batch) for _ in range(7)]
    assert len(calls) == 3 and actions[0].shape == (2, 7)
    p.reset()
    p.select_action(batch)
    assert len(calls) == 4


def test_bad_inputs_name_what_is_wrong(tiny_policy, tmp_path):
    p = tiny_policy("damvla")
    good = make_batch(p.config, b=2)
    s = p.config.vision.image_size
    cases = [
        ({"observation.images.image": torch.zeros(2, 3, s + 14, s + 14, dtype=torch.uint8)}, "observation.images.image"),
        ({"observation.images.image": torch.zeros(2, 4, s, s, dtype=torch.uint8)}, r"\(B, 3, "),
        ({"task": ["", "x"]}, "task"),
        ({"task": ["only one"]}, "task"),
        ({"action": torch.zeros(2, 16, 6)}, "action"),
        ({"observation.images.image": torch.full((2, 3, s, s), 3.0)}, r"\[0, 1\]"),
    ]
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            p({**good, **change})
    batch = dict(good)
    del batch["observation.images.image"]
    with pytest.raises(ValueError, match="lacks 'observation.images.image'"):
        p(batch)


def test_broken_checkpoints_are_refused_with_the_file_named(tiny_policy, tmp_path):
    p = tiny_policy("damvla")
    p.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "normalization.json").unlink()
    with pytest.raises(FileNotFoundError, match="normalization.json"):
        DAMVLAPolicy.from_pretrained(tmp_path / "a")
    # config.json says one architecture, model.safetensors holds another.
    tiny_policy("cogact").save_pretrained(tmp_path / "b")
    p.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model.safetensors.*(missing|unexpected)"):
        DAMVLAPolicy.from_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg["dit"]["depthh"] = 2
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="depthh"):
        DAMVLAPolicy.from_pretrained(tmp_path / "b")


def test_paper_preset_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        p = DAMVLAPolicy(preset("paper"), load_pretrained=False)
    counts = p.parameter_counts()
    assert counts["llm"] == 6_607_343_616  # LLaMA-2-7B without its LM head
    assert 280e6 < counts["vision.dinov2"] < 305e6  # DINOv2-L/14, last block not built
    assert 380e6 < counts["vision.siglip"] < 415e6  # SigLIP-so400m/14
    assert counts["projector"] == 2176 * 8704 + 8704 + 8704 * 4096 + 4096 + 4096 * 4096 + 4096
    assert 88e6 < counts["head.arm"] < 91e6 and 88e6 < counts["head.gripper"] < 91e6  # two DiT-B
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert 7.5e9 < counts["total"] < 7.6e9


def test_a_run_folder_or_latest_pointer_resolves_to_its_checkpoint(tiny_policy, tmp_path):
    p = tiny_policy("cogact")
    ckpts = tmp_path / "run" / "checkpoints"
    p.save_pretrained(ckpts / "step-0000010")
    (ckpts / "latest").write_text("step-0000010\n")
    for where in (tmp_path / "run", ckpts, ckpts / "latest"):
        assert DAMVLAPolicy.from_pretrained(where).config == p.config
