"""The language model side of the VLM (METHOD.md §1): projector, CogACT's prompt, the two latents.

Sequence per sample: ``[BOS] + projected visual patches + prompt tokens + [cognition token]``, right-padded.
The cognition token is the tokenizer's EOS (CogACT). At its position we read
- the cognition latent f_cog: the last layer's output after the final norm, and
- the reasoning latent f_rea: ``hidden_states[k]``, the output of decoder layer k (default 2).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from damvla.config import LanguageConfig
from damvla.model.tokenizer import Tokenizer, load_tokenizer
from damvla.model.weights import build_hf_model


class Projector(nn.Module):
    """Prismatic's fused-GELU MLP: C -> 4C -> llm -> llm (2176 -> 8704 -> 4096 -> 4096 in the paper);
    ``hidden`` replaces the 4C width (the CPU preset: its first layer would cost more than the LLM)."""

    def __init__(self, vision_dim: int, llm_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * vision_dim
        self.net = nn.Sequential(
            nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim), nn.GELU(),
            nn.Linear(llm_dim, llm_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def llama_config(cfg: LanguageConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=False,
    )


def prompt_token_ids(cfg: LanguageConfig, tok: Tokenizer, instruction: str) -> list[int]:
    """Token ids of the prompt (``cfg.prompt_template``) for one instruction, without BOS and cognition
    token, whatever their number (``LanguageBackbone.prompt_ids`` also enforces ``max_prompt_tokens``)."""
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"task: expected a non-empty instruction string, got {instruction!r}")
    ids = tok.encode(cfg.prompt_template.format(instruction=instruction.strip().lower()))
    if any(i >= cfg.vocab_size for i in ids):
        raise ValueError(f"task {instruction[:60]!r}: token ids exceed language.vocab_size={cfg.vocab_size}")
    return ids


class LanguageBackbone(nn.Module):
    def __init__(self, cfg: LanguageConfig, vision_dim: int, load_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.projector = Projector(vision_dim, cfg.hidden_size, cfg.projector_hidden)
        self.llm = build_hf_model(
            LlamaModel, llama_config(cfg), cfg.pretrained_path if load_pretrained else None,
            "language.pretrained_path", allowed_unexpected=(r"^lm_head\.",),
        )
        self._tokenizer: Tokenizer | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        # Lazy: the paper preset can be built on the meta device without any tokenizer files.
        if self._tokenizer is None:
            tok = load_tokenizer(self.cfg.tokenizer, self.cfg.pretrained_path)
            ids = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
            if max(ids) >= self.cfg.vocab_size:
                raise ValueError(
                    f"tokenizer special ids {ids} exceed language.vocab_size={self.cfg.vocab_size}; "
                    "the tokenizer does not belong to this language model"
                )
            self._tokenizer = tok
        return self._tokenizer

    def set_tokenizer(self, tok: Tokenizer) -> None:
        self._tokenizer = tok

    def encode_prompt(self, instruction: str) -> list[int]:
        """Token ids of CogACT's prompt for ``instruction``, unchecked (the server counts them with this)."""
        return self.tokenizer.encode(self.cfg.prompt_template.format(instruction=instruction.strip().lower()))

    def prompt_ids(self, instruction: str) -> list[int]:
        """Token ids of CogACT's prompt for one instruction, without BOS and cognition token."""
        ids = prompt_token_ids(self.cfg, self.tokenizer, instruction)
        if len(ids) > self.cfg.max_prompt_tokens:
            raise ValueError(
                f"task {instruction[:60]!r}...: prompt is {len(ids)} tokens, more than "
                f"language.max_prompt_tokens={self.cfg.max_prompt_tokens}"
            )
        return ids

    def forward(self, patches: torch.Tensor, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (B, N, C_vision), B instructions -> (f_cog (B, h), f_rea (B, h))."""
        tok = self.tokenizer
        b, n, _ = patches.shape
        prompts = [self.prompt_ids(s) for s in instructions]
        length = 1 + n + max(len(p) for p in prompts) + 1
        dev = patches.device
        text = torch.full((b, length - 1 - n), tok.pad_token_id, dtype=torch.long, device=dev)
        mask = torch.zeros(b, length, dtype=torch.long, device=dev)
        cog_pos = torch.empty(b, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            text[i, : len(p)] = torch.tensor(p, device=dev)
            text[i, len(p)] = tok.eos_token_id  # the cognition token
            mask[i, : 1 + n + len(p) + 1] = 1
            cog_pos[i] = 1 + n + len(p)
        emb = self.llm.embed_tokens
        bos = emb(torch.full((b, 1), tok.bos_token_id, dtype=torch.long, device=dev))
        visual = self.projector(patches.to(bos.dtype))
        inputs = torch.cat([bos, visual, emb(text)], dim=1)

        captured: dict[str, torch.Tensor] = {}

        def grab(_m: nn.Module, _i: object, out: object) -> None:
            captured["h"] = out[0] if isinstance(out, tuple) else out  # hidden_states[k]

        handle = self.llm.layers[self.cfg.reasoning_layer - 1].register_forward_hook(grab)
        try:
            last = self.llm(inputs_embeds=inputs, attention_mask=mask, use_cache=False).last_hidden_state
        finally:
            handle.remove()
        rows = torch.arange(b, device=dev)
        return last[rows, cog_pos], captured["h"][rows, cog_pos]
