"""`damvla bench latency` runs end to end on the tiny preset and refuses what it cannot do here."""

import torch

from damvla.cli import main


def test_bench_latency_tiny_prints_the_three_components(capsys):
    assert main(["bench", "latency", "--preset", "tiny", "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    for part in ("vision", "language model", "action head (+router)", "total", "reference predict_action_chunk"):
        assert part in out, out
    assert "preset tiny" in out and "batch 1" in out


def test_bench_latency_cuda_graph_on_cpu_is_a_clear_error(capsys):
    assert main(["bench", "latency", "--preset", "tiny", "--cuda-graph"]) == 1
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err


def test_bench_latency_paper_on_cpu_asks_for_a_gpu(capsys):
    assert main(["bench", "latency", "--preset", "paper"]) == 1
    assert "needs a GPU" in capsys.readouterr().err


def test_bench_latency_cuda_without_a_gpu_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        return
    assert main(["bench", "latency", "--device", "cuda"]) == 1
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
