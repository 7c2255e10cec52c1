"""Reading weights that users have on disk: a .safetensors / .bin file, or a transformers folder
(single file or sharded index). Explicit key mapping with shape checks, nanoGPT-style."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors in a weights file or transformers folder."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"weights path {p} does not exist")
    if p.is_dir():
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).exists():
                files = sorted(set(json.loads((p / index).read_text())["weight_map"].values()))
                out: dict[str, torch.Tensor] = {}
                for f in files:
                    out.update(read_state_dict(p / f))
                return out
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).exists():
                return read_state_dict(p / name)
        raise FileNotFoundError(f"{p}: no model.safetensors, pytorch_model.bin or sharded index found")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    if p.suffix in (".bin", ".pt", ".pth"):
        return torch.load(str(p), map_location="cpu", weights_only=True)
    raise ValueError(f"{p}: unknown weights format (expected .safetensors, .bin, .pt or a folder)")


def load_into(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    strip_prefixes: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
) -> None:
    """Copy ``state`` into ``module`` after stripping the first matching prefix of each key.

    Keys starting with an ``ignore`` prefix (after stripping) are allowed to be absent from the module
    (e.g. the last ViT block we never run). Anything else missing, unexpected or of another shape is an
    error naming the key.
    """
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for pre in strip_prefixes:
            if k.startswith(pre):
                k = k[len(pre) :]
                break
        mapped[k] = v
    own = module.state_dict()
    unexpected = [k for k in mapped if k not in own and not k.startswith(ignore)]
    missing = [k for k in own if k not in mapped]
    shape = [f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in mapped and mapped[k].shape != own[k].shape]
    if unexpected or missing or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:5]}")
        raise ValueError(f"{source}: weights do not match the configured architecture: " + "; ".join(parts))
    module.load_state_dict({k: mapped[k] for k in own}, strict=True)


def load_hf_weights(
    target: nn.Module,
    model_cls: type,
    hf_config: object,
    path: str | Path,
    source: str,
    allowed_unexpected: tuple[str, ...] = (),
) -> None:
    """Load a transformers checkpoint (folder, or a bare weights file) into ``target``.

    transformers itself reads the files, so its checkpoint-format conversions (legacy key names, shards,
    dtypes) apply. ``hf_config`` is *our* architecture (e.g. a truncated ViT); every parameter of
    ``target`` must be found in the file, and keys the file holds beyond it must match one of
    ``allowed_unexpected`` (regexes, e.g. the last ViT block we never run).
    """
    import re
    import tempfile

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{source}: {p} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        folder = p
        if p.is_file():  # a bare file: give transformers a folder holding our config and that file
            folder = Path(tmp)
            hf_config.save_pretrained(tmp)
            (folder / ("model.safetensors" if p.suffix == ".safetensors" else "pytorch_model.bin")).symlink_to(p.resolve())
        from transformers.utils import logging as hf_logging

        # transformers prints a report of the keys we deliberately skip; we check them ourselves below.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            loaded, info = model_cls.from_pretrained(
                str(folder), config=hf_config, local_files_only=True, output_loading_info=True
            )
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{source}: transformers could not load {p}: {e}") from e
        finally:
            hf_logging.set_verbosity(verbosity)
    bad_unexpected = [k for k in info.get("unexpected_keys", []) if not any(re.search(a, k) for a in allowed_unexpected)]
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {sorted(info['missing_keys'])[:5]}")
    if info.get("mismatched_keys"):
        problems.append(f"shape mismatch {list(info['mismatched_keys'])[:5]}")
    if bad_unexpected:
        problems.append(f"unexpected {sorted(bad_unexpected)[:5]}")
    if problems:
        raise ValueError(f"{source}: weights in {p} do not match the configured architecture: " + "; ".join(problems))
    state = loaded.state_dict()
    own = target.state_dict()
    absent = [k for k in own if k not in state]
    if absent:
        raise ValueError(f"{source}: weights in {p} lack {absent[:5]}")
    target.load_state_dict({k: state[k] for k in own}, strict=True)
