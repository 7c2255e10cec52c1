"""`damvla serve` fails early with one line, not a traceback: bad port, taken port, missing CUDA; and it
says which checkpoint a run folder resolved to."""

from __future__ import annotations

import logging
import socket

import pytest
import torch

from damvla import serve
from damvla.cli import main


def no_model_load(monkeypatch) -> None:
    """Every check below must fire before the (slow) model load."""

    def fail(*_a, **_k):
        raise AssertionError("the model was loaded before the failing check")

    monkeypatch.setattr("damvla.model.policy.DAMVLAPolicy.from_pretrained", fail)
    monkeypatch.setattr("damvla.model.policy.DAMVLAPolicy.__init__", fail)


@pytest.mark.parametrize(
    "port,reason", [("70000", "70000 is outside 0..65535"), ("-1", "-1 is outside 0..65535"), ("http", "'http' is not an integer")]
)
def test_a_port_outside_the_tcp_range_is_a_one_line_usage_error(port, reason, capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "preset:tiny", "--port", port])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --port: {reason}" in err and "Traceback" not in err


def test_a_port_in_use_is_reported_before_the_model_loads(monkeypatch, capsys):
    no_model_load(monkeypatch)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "preset:tiny", "--port", str(port), "--no-warmup"]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port 0" in err and "Traceback" not in err


def test_device_cuda_without_cuda_is_refused_like_eval_does(monkeypatch, capsys):
    no_model_load(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "preset:tiny", "--port", "0", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "Traceback" not in err


def test_serve_logs_the_checkpoint_folder_and_step_a_run_folder_resolves_to(tmp_path, caplog):
    from damvla.config import preset
    from damvla.model.policy import DAMVLAPolicy
    from damvla.normalize import ActionNormalizer

    cfg = preset("tiny")
    ckpts = tmp_path / "run" / "checkpoints"
    DAMVLAPolicy(cfg, ActionNormalizer.identity(cfg.action_dim)).save_pretrained(ckpts / "step-0000300")
    (ckpts / "latest").write_text("step-0000300\n")
    with caplog.at_level(logging.INFO, logger="damvla.serve"):
        policy = serve._load_policy(str(tmp_path / "run"), "cpu")
    assert policy.config.name == "tiny"
    assert f"-> {(ckpts / 'step-0000300').resolve()} (step 300)" in caplog.text


def test_serve_help_shows_the_default_port(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "default 8000" in capsys.readouterr().out
