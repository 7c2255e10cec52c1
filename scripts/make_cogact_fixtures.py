"""Make the small CogACT reference fixtures of tests/test_convert_cogact.py (issue #12).

Runs in a THROWAWAY venv, never the project's: it needs timm (the ViT classes CogACT's Prismatic backbone
builds) and CogACT's own action-model code, neither of which damvla depends on.

    python3 -m venv /tmp/timm-venv
    /tmp/timm-venv/bin/pip install torch==2.13.0 timm==1.0.31 transformers==5.24.0
    git clone https://github.com/microsoft/CogACT /tmp/CogACT          # only action_model/ is imported
    /tmp/timm-venv/bin/python scripts/make_cogact_fixtures.py --cogact-src /tmp/CogACT \
        --out tests/fixtures/cogact

What it writes (all float32, a few hundred kB):

- ``cogact_tiny.pt``: a CogACT checkpoint in CogACT's layout, ``torch.load(f)["model"]`` holding
  ``vision_backbone`` (``dino_featurizer.*`` / ``siglip_featurizer.*``: small random timm ViTs of the classes
  and key names of ``vit_large_patch14_reg4_dinov2`` and ``vit_so400m_patch14_siglip_224``),
  ``projector`` (Prismatic's fused-GELU MLP), ``llm_backbone`` (a tiny random ``LlamaForCausalLM``,
  ``llm.*``) and ``action_model`` (a small random DiT built by CogACT's ``ActionModel``, ``net.*``).
- ``llama/config.json``: the tiny LLaMA's config (what ``--llama DIR`` reads; the byte tokenizer stands in
  for LLaMA's, so the prompt's token ids are its UTF-8 bytes, BOS 256, EOS 257).
- ``reference.pt``: inputs and CogACT's outputs for them, computed the way CogACT's inference computes them:
  timm ``get_intermediate_layers`` features (2nd-to-last block, no norm), the projector output, the
  cognition latent (``hidden_states[-1][:, -1]`` of ``[BOS] + visual + prompt + ["▁", EOS]``, one sample at a
  time as ``CogACT.predict_action``), ε predictions of ``DiT.forward`` (conditional and null condition),
  and a full DDIM-10 + CFG-1.5 sample from fixed noise by CogACT's ``ddim_sample_loop`` (clip_denoised=False).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# timm 1.0.31 registers fake kernels for these torchvision ops at import; beside a CPU torch whose
# torchvision lacks them, define their schemas first.
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

IMAGE = 56  # 4 x 4 patches of 14
PATCH = 14
ACTION_DIM, HORIZON = 7, 16
INSTRUCTIONS = ["Pick up the coke can", "open the top drawer and put the sponge inside"]
PROMPT = "In: What action should the robot take to {}?\nOut: "
BOS, EOS = 256, 257  # damvla's byte tokenizer
SPACE = 32  # the byte of " ": the tokenizer's "▁" token CogACT appends (29871 in LLaMA's vocabulary)
VOCAB = 320  # 259 byte-tokenizer ids padded to a multiple of 64, as CogACT pads 32001 to 32064
LLAMA = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False)  # fmt: skip
DIT = dict(depth=2, hidden_size=32, num_heads=4)


def randomize(module: torch.nn.Module, gen: torch.Generator, std: float = 0.05) -> None:
    """Every parameter random (no zero read-outs, no 1e-5 layer scales): outputs then depend on every weight."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cogact-src", required=True, help="a checkout of github.com/microsoft/CogACT")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.cogact_src).resolve()))
    import timm
    from action_model.action_model import ActionModel  # CogACT's own DiT and diffusion code
    from timm.models.vision_transformer import VisionTransformer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- vision: the classes and arguments of timm's two models, small ------------------------------
    dino = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=32, depth=3, num_heads=2, init_values=1e-5,
                             reg_tokens=4, no_embed_class=True, num_classes=0)  # fmt: skip
    siglip = VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=24, depth=3, num_heads=2, mlp_ratio=3.7362,
                               class_token=False, global_pool="map", num_classes=0)  # fmt: skip
    for m in (dino, siglip):
        randomize(m, gen)
        m.eval()
    pixels = torch.rand(len(INSTRUCTIONS), 3, IMAGE, IMAGE, generator=gen)  # [0, 1], already at 56 px
    x_dino = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x_siglip = (pixels - 0.5) / 0.5
    with torch.no_grad():
        # Prismatic: forward = get_intermediate_layers(n={len(blocks) - 2}), unpacked
        dino_patches = dino.get_intermediate_layers(x_dino, n={len(dino.blocks) - 2})[0]
        _, dino_prefix = dino.get_intermediate_layers(x_dino, n={len(dino.blocks) - 2}, return_prefix_tokens=True)[0]
        siglip_patches = siglip.get_intermediate_layers(x_siglip, n={len(siglip.blocks) - 2})[0]
    features = torch.cat([dino_patches, siglip_patches], dim=2)

    # ---- projector: Prismatic's FusedMLPProjector ---------------------------------------------------
    vdim, ldim = features.shape[-1], LLAMA["hidden_size"]
    projector = torch.nn.Sequential(torch.nn.Linear(vdim, 4 * vdim), torch.nn.GELU(), torch.nn.Linear(4 * vdim, ldim),
                                    torch.nn.GELU(), torch.nn.Linear(ldim, ldim))  # fmt: skip
    randomize(projector, gen)
    with torch.no_grad():
        projected = projector(features)

    # ---- LLM: LLaMA, read as CogACT.predict_action does ---------------------------------------------
    llm = LlamaForCausalLM(LlamaConfig(**LLAMA))
    randomize(llm, gen, std=0.1)
    llm.eval()
    cognition, prompt_ids = [], []
    with torch.no_grad():
        for i, instruction in enumerate(INSTRUCTIONS):
            # tokenizer(prompt.rstrip()) (BOS added) + ["▁", EOS]: the special tokens CogACT appends
            text = PROMPT.format(instruction.lower()).rstrip()
            ids = list(text.encode()) + [SPACE, EOS]
            prompt_ids.append(ids)
            emb = llm.model.embed_tokens
            seq = torch.cat([emb(torch.tensor([[BOS]])), projected[i : i + 1], emb(torch.tensor([ids]))], dim=1)
            hs = llm(inputs_embeds=seq, output_hidden_states=True).hidden_states
            cognition.append(hs[-1][:, -1, :])
    cognition_t = torch.cat(cognition)  # (B, ldim)

    # ---- action model: CogACT's ActionModel (DiT + guided-diffusion DDIM) ---------------------------
    am = ActionModel(token_size=ldim, model_type="DiT-B", in_channels=ACTION_DIM, future_action_window_size=HORIZON - 1,
                     past_action_window_size=0)  # fmt: skip
    # CogACT's DiT class, at a small size (DiT-B's structure: the registry only fixes depth / width / heads).
    from action_model.models import DiT, LabelEmbedder

    am.net = DiT(token_size=ldim, in_channels=ACTION_DIM, class_dropout_prob=0.1, learn_sigma=False,
                 future_action_window_size=HORIZON - 1, past_action_window_size=0, **DIT)  # fmt: skip
    # CogACT's DiT leaves LabelEmbedder's conditions_shape at its default (1, 1, 4096), i.e. LLaMA-7B's width;
    # at our LLM width the null condition must be (1, ldim).
    am.net.z_embedder = LabelEmbedder(ldim, DIT["hidden_size"], dropout_prob=0.1, conditions_shape=(1, 1, ldim))
    randomize(am.net, gen, std=0.1)
    am.eval()
    b = len(INSTRUCTIONS)
    x_t = torch.randn(b, HORIZON, ACTION_DIM, generator=gen)
    t = torch.tensor([3, 71])
    z = cognition_t[:, None]
    uncond = am.net.z_embedder.uncondition[None].expand(b, 1, -1)
    noise = torch.randn(b, HORIZON, ACTION_DIM, generator=gen)
    with torch.no_grad():
        eps_cond = am.net(x_t, t, z)
        eps_uncond = am.net(x_t, t, uncond)
        # CogACT.predict_action's sampling (cfg 1.5, DDIM 10, eta 0, no clipping), batched over samples
        ddim = am.create_ddim(ddim_step=10)
        samples = ddim.ddim_sample_loop(am.net.forward_with_cfg, (2 * b, HORIZON, ACTION_DIM), torch.cat([noise, noise]),
                                        clip_denoised=False, model_kwargs=dict(z=torch.cat([z, uncond]), cfg_scale=1.5),
                                        progress=False, device="cpu", eta=0.0)[:b]  # fmt: skip

    # ---- CogACT's checkpoint layout -----------------------------------------------------------------
    model = {
        "vision_backbone": {**{f"dino_featurizer.{k}": v for k, v in dino.state_dict().items()},
                            **{f"siglip_featurizer.{k}": v for k, v in siglip.state_dict().items()}},
        "projector": {f"projector.{k}": v for k, v in projector.state_dict().items()},
        "llm_backbone": {f"llm.{k}": v for k, v in llm.state_dict().items()},
        "action_model": am.state_dict(),
    }  # fmt: skip
    torch.save({"model": model}, out / "cogact_tiny.pt")
    (out / "llama").mkdir(exist_ok=True)
    (out / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", **LLAMA}, indent=2) + "\n")
    reference = {
        "pixels": pixels, "instructions": INSTRUCTIONS, "prompt_ids": prompt_ids,
        "dino_patches": dino_patches, "dino_prefix": dino_prefix, "siglip_patches": siglip_patches,
        "features": features, "projected": projected, "cognition": cognition_t,
        "x_t": x_t, "t": t, "eps_cond": eps_cond, "eps_uncond": eps_uncond, "noise": noise, "sample": samples,
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
    }  # fmt: skip
    torch.save(reference, out / "reference.pt")
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f}  {f.stat().st_size / 1024:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
