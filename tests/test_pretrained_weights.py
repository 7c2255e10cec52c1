"""The real-weights path: checkpoints on the user's disk, written here by the test itself."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Dinov2WithRegistersModel, LlamaForCausalLM, SiglipVisionModel

from damvla.config import preset
from damvla.model.language import llama_config
from damvla.model.policy import DAMVLAPolicy
from damvla.model.vision import dinov2_config, siglip_config
from damvla.normalize import ActionNormalizer


def _full_depth(cfg_fn, enc, image_size):
    c = cfg_fn(enc, image_size)
    c.num_hidden_layers = enc.num_layers  # what a released checkpoint holds: every block
    return c


def test_vision_and_llm_weights_load_from_local_folders(tmp_path):
    cfg = preset("tiny")
    torch.manual_seed(1)
    dino = Dinov2WithRegistersModel(_full_depth(dinov2_config, cfg.vision.dinov2, cfg.vision.image_size))
    sig = SiglipVisionModel(_full_depth(siglip_config, cfg.vision.siglip, cfg.vision.image_size))
    llm = LlamaForCausalLM(llama_config(cfg.language))
    dino.save_pretrained(tmp_path / "dino")
    sig.save_pretrained(tmp_path / "siglip")
    llm.half().save_pretrained(tmp_path / "llama")  # LLaMA-2 ships in float16
    cfg.vision.dinov2.pretrained_path = str(tmp_path / "dino")
    cfg.vision.siglip.pretrained_path = str(tmp_path / "siglip" / "model.safetensors")  # a bare file works too
    cfg.language.pretrained_path = str(tmp_path / "llama")
    p = DAMVLAPolicy(cfg, ActionNormalizer.identity(7))
    # Same classes on both sides, so the in-memory names agree whatever the on-disk format was.
    for ours, ref in ((p.vision.dinov2, dino), (p.vision.siglip, sig), (p.language.llm, llm.model)):
        theirs = ref.state_dict()
        own = ours.state_dict()
        assert own and all(v.dtype == torch.float32 for v in own.values())  # the policy's dtype, not the file's
        assert all(torch.equal(v, theirs[k].float()) for k, v in own.items())
    # The features are those of the second-to-last block, without the final norm.
    img = torch.rand(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    feats = p.vision(img)
    ref = dino(pixel_values=(img - p.vision.dino_mean) / p.vision.dino_std, output_hidden_states=True)
    assert torch.allclose(feats.cls[:, 0], ref.hidden_states[-2][:, 0], atol=1e-5)
    assert torch.allclose(feats.registers, ref.hidden_states[-2][:, 1:5], atol=1e-5)


def test_mismatched_weights_are_refused_with_the_path_named(tmp_path):
    cfg = preset("tiny")
    other = preset("tiny")
    other.vision.dinov2.hidden_size = 48
    other.vision.dinov2.intermediate_size = 192
    Dinov2WithRegistersModel(dinov2_config(other.vision.dinov2, 112)).save_pretrained(tmp_path / "dino")
    cfg.vision.dinov2.pretrained_path = str(tmp_path / "dino")
    with pytest.raises(ValueError, match="pretrained_path.*dino"):
        DAMVLAPolicy(cfg, ActionNormalizer.identity(7))
    cfg.vision.dinov2.pretrained_path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DAMVLAPolicy(cfg, ActionNormalizer.identity(7))


def test_a_local_tokenizer_folder_is_used_and_saved_with_the_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "in : what action should the robot take to pick up block ? out".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    cfg = preset("tiny")
    cfg.language.tokenizer = str(tmp_path / "tok")
    p = DAMVLAPolicy(cfg, ActionNormalizer.identity(7))
    assert p.language.tokenizer.eos_token_id == 2 and p.language.tokenizer.bos_token_id == 1
    batch = {"observation.images.image": torch.zeros(1, 3, 112, 112, dtype=torch.uint8), "task": ["pick up block"]}
    noise = torch.randn(1, 16, 7)
    a = p.eval().predict_action_chunk(batch, noise=noise)
    p.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer").is_dir()
    q = DAMVLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(q.predict_action_chunk(batch, noise=noise), a)


def test_loading_a_checkpoint_skips_random_init_and_names_a_bad_tensor(tmp_path, monkeypatch):
    cfg = preset("tiny")
    cfg.dit.depth = 1
    torch.manual_seed(0)
    saved = DAMVLAPolicy(cfg, ActionNormalizer.identity(7), {"camera_key": "observation.images.image"})
    saved.save_pretrained(tmp_path / "ckpt")
    calls = []
    for name in ("normal_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "uniform_"):
        fn = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name, lambda t, *a, _fn=fn, _n=name, **k: calls.append(_n) or _fn(t, *a, **k))
    DAMVLAPolicy(cfg, ActionNormalizer.identity(7))
    assert calls, "building a fresh policy initialises its weights"
    calls.clear()
    loaded = DAMVLAPolicy.from_pretrained(tmp_path / "ckpt")
    assert calls == []  # every parameter comes from the file: no initialisation work thrown away
    own, ref = loaded.state_dict(), saved.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in ref)

    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    key = next(k for k in state if k.startswith("heads."))
    bad = dict(state)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"shape mismatch.*{key}"):
        DAMVLAPolicy.from_pretrained(tmp_path / "ckpt")
    del bad[key]
    save_file(bad, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=f"missing.*{key}"):
        DAMVLAPolicy.from_pretrained(tmp_path / "ckpt")
