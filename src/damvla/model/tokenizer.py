"""Tokenizers behind one small interface: ``encode(text) -> list[int]`` without special tokens, plus
``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` / ``vocab_size``. Token ids always come from here,
never from constants in model code."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS, EOS, PAD. Needs no files: the tiny/small presets use it."""

    def __init__(self) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def save_pretrained(self, path: str | Path) -> None:  # nothing to save; the config says "byte"
        return None


class HFTokenizer:
    """A transformers tokenizer from a local folder (e.g. LLaMA-2's)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"tokenizer folder {p} does not exist")
        self.tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self.tok, name) is None:
                raise ValueError(f"tokenizer in {p} defines no {name}; DAM-VLA needs BOS and EOS (the cognition token)")
        self.bos_token_id = int(self.tok.bos_token_id)
        self.eos_token_id = int(self.tok.eos_token_id)
        # Padding is masked out of attention, so any id works; LLaMA-2 has no pad token.
        self.pad_token_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def save_pretrained(self, path: str | Path) -> None:
        self.tok.save_pretrained(str(path))


def load_tokenizer(spec: str | None, model_path: str | None) -> Tokenizer:
    """``"byte"`` -> ByteTokenizer; a folder path -> HFTokenizer; None -> the tokenizer in ``model_path``."""
    if spec == "byte":
        return ByteTokenizer()
    path = spec if spec is not None else model_path
    if path is None:
        raise ValueError(
            "language.tokenizer is unset and language.pretrained_path is unset: give a local tokenizer folder "
            "(e.g. language.tokenizer=/path/to/Llama-2-7b-hf) or use tokenizer='byte'"
        )
    return HFTokenizer(path)
