"""`damvla convert cogact`: a CogACT checkpoint converted to damvla reproduces CogACT's own outputs.

The fixtures (tests/fixtures/cogact, made by scripts/make_cogact_fixtures.py in a throwaway venv with timm
and CogACT's action-model code) hold a small random CogACT checkpoint in CogACT's layout and the outputs
CogACT's code computes from it: timm ViT features, projector output, cognition latent, DiT ε, and a full
DDIM-10 + CFG-1.5 sample from fixed noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from damvla.cli import main
from damvla.config import PolicyConfig, preset
from damvla.convert import convert_cogact
from damvla.model.policy import DAMVLAPolicy
from damvla.model.weights import iter_safetensors, write_safetensors_streaming

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "cogact"
CKPT, LLAMA = FIXTURES / "cogact_tiny.pt", FIXTURES / "llama"
# What the tensor shapes of the small fixture cannot tell (the real CogACT widths are in a table).
SETS = ["vision.dinov2.num_heads=2", "vision.siglip.num_heads=2", "dit.num_heads=4", "language.tokenizer=byte",
        "language.max_prompt_tokens=128"]  # fmt: skip
TOL = 1e-5


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(FIXTURES / "reference.pt", weights_only=True)


def convert(out: Path, ablation: str = "cogact") -> Path:
    return convert_cogact(CKPT, LLAMA, out, ablation=ablation, stats="identity", overrides=SETS, progress=False)


@pytest.fixture(scope="module")
def cogact(tmp_path_factory) -> DAMVLAPolicy:
    return DAMVLAPolicy.from_pretrained(convert(tmp_path_factory.mktemp("conv") / "cogact")).eval()


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def test_converted_config_is_cogact_exactly(cogact):
    cfg = cogact.config
    assert not any(vars(cfg.ablation).values()) and list(cogact.heads) == ["action"]
    assert cfg.dit.condition == "cogact" and not cfg.diffusion.clip_sample
    assert cfg.vision.siglip.hidden_act == "gelu" and cfg.vision.dinov2.hidden_act == "gelu"
    assert (cfg.vision.image_size, cfg.horizon, cfg.action_dim, cfg.language.vocab_size) == (56, 16, 7, 320)
    assert cogact.heads["action"].null_cond.shape == (1, cfg.language.hidden_size)  # null in LLM width


def test_vision_features_match_timm_get_intermediate_layers(cogact, ref):
    with torch.no_grad():
        f = cogact.vision(ref["pixels"])
    d = ref["dino_patches"].shape[-1]
    assert maxdiff(f.patches[..., :d], ref["dino_patches"]) <= TOL
    assert maxdiff(f.patches[..., d:], ref["siglip_patches"]) <= TOL
    assert maxdiff(f.patches, ref["features"]) <= TOL
    # DAM-VLA's class and register tokens come from the same block
    assert maxdiff(torch.cat([f.cls, f.registers], dim=1), ref["dino_prefix"]) <= TOL


def test_projector_output_matches(cogact, ref):
    with torch.no_grad():
        assert maxdiff(cogact.language.projector(ref["features"]), ref["projected"]) <= TOL


def test_cognition_latent_is_read_where_cogact_inference_reads_it(cogact, ref):
    lang = cogact.language
    eos = lang.tokenizer.eos_token_id
    for instruction, ids in zip(ref["instructions"], ref["prompt_ids"]):
        assert lang.prompt_ids(instruction) + [eos] == ids  # "...Out:" + "▁" + EOS, as predict_action builds it
    with torch.no_grad():  # both prompts in one right-padded batch
        f_cog, _ = lang(ref["features"], ref["instructions"])
    assert maxdiff(f_cog, ref["cognition"]) <= TOL


def test_eps_prediction_matches_cogact_dit(cogact, ref):
    head = cogact.heads["action"]
    with torch.no_grad():
        eps = head(ref["x_t"], ref["t"], ref["cognition"])
        eps_null = head(ref["x_t"], ref["t"], ref["cognition"], drop_cond=torch.ones(2, dtype=torch.bool))
    assert maxdiff(eps, ref["eps_cond"]) <= TOL
    assert maxdiff(eps_null, ref["eps_uncond"]) <= TOL


def test_full_ddim_cfg_sample_from_fixed_noise_matches_cogact(cogact, ref):
    batch = {"observation.images.image": ref["pixels"], "task": ref["instructions"]}
    actions, info = cogact.predict_action_chunk(batch, noise=ref["noise"], return_info=True)
    assert maxdiff(info["normalized"], ref["sample"]) <= TOL
    assert ref["sample"].abs().max() > 1  # unclipped: CogACT's sampler does not clip x0
    assert set(actions[..., 6].unique().tolist()) <= {0.0, 1.0}


def test_damvla_conversion_starts_both_heads_from_cogact_action_model(tmp_path, ref):
    out = convert(tmp_path / "dam", "damvla")
    p = DAMVLAPolicy.from_pretrained(out).eval()
    assert list(p.heads) == ["arm", "gripper"] and p.router is not None and p.config.ablation.dam
    src = torch.load(CKPT, weights_only=True)["model"]["action_model"]
    for name, head in p.heads.items():
        assert torch.equal(head.blocks[1].mlp[2].weight, src["net.blocks.1.mlp.fc2.weight"]), name
        assert torch.equal(head.null_cond, src["net.z_embedder.uncondition"])
        pos, v = head.pos_embed[0], head.num_visual
        assert torch.equal(pos[0], src["net.positional_embedding"][0]) and torch.equal(pos[1 + v :], src["net.positional_embedding"][1:])
    meta = json.loads((out / "metadata.json").read_text())["converted_from"]
    assert "router" in meta["new_parameters"] and meta["ablation"] == "damvla"
    batch = {"observation.images.image": ref["pixels"], "task": ref["instructions"]}
    actions = p.predict_action_chunk(batch, noise=ref["noise"])
    assert actions.shape == (2, 16, 7) and torch.isfinite(actions).all()


def test_convert_command_writes_a_checkpoint_that_serve_answers(tmp_path, capsys):
    pytest.importorskip("websockets")
    from damvla.serving.client import PolicyClient
    from damvla.serving.server import PolicyServer, ServerThread

    out = tmp_path / "cli"
    argv = ["convert", "cogact", str(CKPT), "--llama", str(LLAMA), "--out", str(out), "--stats", "identity", "--no-progress"]
    assert main(argv + [a for s in SETS for a in ("--set", s)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    policy = DAMVLAPolicy.from_pretrained(out).eval()
    rng = np.random.default_rng(0)
    obs = {"observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/state": np.zeros(8, np.float32), "prompt": "pick up the coke can"}  # fmt: skip
    with ServerThread(PolicyServer(policy, port=0)) as srv, PolicyClient("127.0.0.1", srv.port) as client:
        reply = client.infer(obs)
    assert reply["actions"].shape == (16, 7) and np.isfinite(reply["actions"]).all()


def test_a_file_that_is_not_a_cogact_checkpoint_is_refused_by_name(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    vlm_only = tmp_path / "prismatic.pt"
    torch.save({"model": {"projector": {}, "llm_backbone": {}}}, vlm_only)
    for path, needle in ((junk, "not a torch checkpoint"), (other, "not a CogACT checkpoint: expected a dict with a 'model'"),
                         (vlm_only, "lacks ['vision_backbone', 'action_model']")):  # fmt: skip
        argv = ["convert", "cogact", str(path), "--llama", str(LLAMA), "--out", str(tmp_path / "o"), "--stats", "identity"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert needle in err and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unknown_vit_widths_ask_for_the_head_counts(tmp_path):
    with pytest.raises(ValueError, match=r"--set vision.dinov2.num_heads=N --set vision.siglip.num_heads=N --set dit.num_heads=N"):
        convert_cogact(CKPT, LLAMA, tmp_path / "x", stats="identity", overrides=["language.tokenizer=byte"], progress=False)


def test_cogact_statistics_become_the_action_normaliser(tmp_path):
    stats = {"fractal": {"action": {"q01": [-1.0] * 6 + [0.0], "q99": [1.0] * 6 + [1.0], "mask": [True] * 6 + [False]}},
             "bridge": {"action": {"q01": [-2.0] * 7, "q99": [2.0] * 7}}}  # fmt: skip
    (tmp_path / "dataset_statistics.json").write_text(json.dumps(stats))
    ckpt = tmp_path / "checkpoints" / "step.pt"
    ckpt.parent.mkdir()
    ckpt.symlink_to(CKPT)
    with pytest.raises(ValueError, match="pick one with --unnorm-key"):
        convert_cogact(ckpt, LLAMA, tmp_path / "a", overrides=SETS, progress=False)
    out = convert_cogact(ckpt, LLAMA, tmp_path / "a", unnorm_key="fractal", overrides=SETS, progress=False)
    norm = json.loads((out / "normalization.json").read_text())["action"]
    assert norm["normalize"] == [True] * 6 + [False] and norm["q01"][0] == -1.0


def test_streaming_safetensors_writer_round_trips(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7, dtype=torch.int64), "e": torch.randn(2, 2).bfloat16()}
    specs = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    seen = []
    write_safetensors_streaming(tmp_path / "m.safetensors", specs, lambda k: tensors[k], progress=seen.append)
    back = load_file(str(tmp_path / "m.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in tensors.items()) and sum(seen) == 60 + 56 + 8
    streamed = dict(iter_safetensors(tmp_path / "m.safetensors", ["e", "a"]))  # the reader --init uses
    assert list(streamed) == ["e", "a"] and all(torch.equal(streamed[k], tensors[k]) for k in streamed)
    with pytest.raises(ValueError, match="produced shape"):
        write_safetensors_streaming(tmp_path / "n.safetensors", specs, lambda k: torch.zeros(1))
    assert not list(tmp_path.glob("n.safetensors*"))


def test_siglip_runs_exact_gelu_and_old_configs_keep_the_activation_they_trained_with():
    cfg = preset("tiny")
    assert cfg.vision.siglip.hidden_act == "gelu"
    old = cfg.to_dict()
    del old["vision"]["siglip"]["hidden_act"]
    assert PolicyConfig.from_dict(old).vision.siglip.hidden_act == "gelu_pytorch_tanh"


def test_cogact_ablation_preset_uses_cogact_conditioning_and_sampling():
    cog, dam = preset("tiny", "cogact"), preset("tiny", "damvla")
    assert (cog.dit.condition, cog.diffusion.clip_sample) == ("cogact", False)
    assert (dam.dit.condition, dam.diffusion.clip_sample) == ("tokens", True)


@pytest.mark.sim
def test_a_converted_checkpoint_runs_in_damvla_eval(tmp_path):
    pytest.importorskip("metaworld", reason="Meta-World is an optional extra: pip install damvla[sim]")
    import damvla.envs  # noqa: F401  (sets MUJOCO_GL=egl before mujoco is imported)
    from damvla.envs.metaworld import dataset_action_mapping

    out = convert(tmp_path / "conv")
    meta = json.loads((out / "metadata.json").read_text())
    # What fine-tuning on `damvla collect metaworld` data adds to a checkpoint: how 7-D actions drive the arm.
    meta["damvla"] = {"gripper_index": 6, "action_mapping": dataset_action_mapping(["reach-v3"]),
                      "recipe": {"camera": "corner4", "resolution": 64, "seed_offset": 0, "seeds": {"reach-v3": [0]}}}  # fmt: skip
    (out / "metadata.json").write_text(json.dumps(meta))
    argv = ["eval", str(out), "--suite", "reach", "--episodes", "1", "--max-steps", "3", "--execute-steps", "3",
            "--out", str(tmp_path / "ev"), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["tasks"]["reach-v3"]["episodes"] == 1 and res["tasks"]["reach-v3"]["errors"] == 0


def test_train_init_fine_tunes_a_converted_checkpoint_with_the_dataset_stats(tmp_path):
    from damvla.training.checkpoint import find_checkpoint
    from test_train_cli import write_dataset

    conv = convert(tmp_path / "conv", "damvla")
    ds = write_dataset(tmp_path / "ds")
    out = tmp_path / "run"
    argv = ["train", "--init", str(conv), "--dataset", str(ds), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--num-workers", "0", "--warmup", "0", "--freeze", "vision", "diffusion.repeated_steps=1"]  # fmt: skip
    assert main(argv) == 0
    ckpt = find_checkpoint(out)
    before, after = load_file(str(conv / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert before.keys() == after.keys()
    frozen = "vision.dinov2.encoder.layer.0.mlp.fc1.weight"
    assert torch.equal(before[frozen], after[frozen])  # loaded, and frozen
    moved = "heads.arm.blocks.0.mlp.0.weight"
    assert not torch.equal(before[moved], after[moved]) and (before[moved] - after[moved]).abs().max() < 0.1
    norm = json.loads((ckpt / "normalization.json").read_text())["action"]
    assert norm["normalize"][-1] is False and norm["q01"] != [-1.0] * 7  # the dataset's stats, not identity
    assert DAMVLAPolicy.from_pretrained(ckpt).config.dit.condition == "cogact"


def test_policy_from_checkpoint_fills_every_weight_and_keeps_computed_buffers(tmp_path):
    from damvla.normalize import ActionNormalizer
    from damvla.training.model import policy_from_checkpoint

    torch.manual_seed(0)
    cfg = preset("tiny")
    ref = DAMVLAPolicy(cfg, ActionNormalizer.identity(7), load_pretrained=False)
    path = ref.save_pretrained(tmp_path / "ckpt")
    got, wrapped = policy_from_checkpoint(path, cfg, ref.normalizer, {}, None, torch.device("cpu"))
    assert wrapped is None
    assert all(p.device.type == "cpu" for p in got.parameters())
    for (name, a), (_, b) in zip(ref.state_dict(keep_vars=True).items(), got.state_dict(keep_vars=True).items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(ref.named_buffers(), got.named_buffers()):  # incl. non-persistent (RoPE, means)
        assert torch.equal(a, b), name
