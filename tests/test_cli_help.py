"""Help texts a user reads first, and the install extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from damvla.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_is_a_whole_sentence(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "exposing" not in out and "evaluate in simulation, serve over openpi's protocol." in out


def test_data_check_help_describes_the_command_and_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Validate a LeRobot v3.0 dataset (a folder, or a Hugging Face dataset id) for training" in out
    assert "Hugging Face dataset id namespace/name[@revision]" in out
    for needle in ("--horizon HORIZON action chunk length", "--sigma-lead SIGMA_LEAD width in steps",
                   "--sigma-trail SIGMA_TRAIL width in steps", "the dataset's only camera"):  # fmt: skip
        assert needle in out, needle


def test_no_extra_installs_lerobot_whose_pins_break_metaworld():
    # lerobot 0.3.x pins gymnasium<1.0 (Meta-World 3.1.1 needs >=1.1) and replaces torch: an extra must
    # never break another one. damvla reads LeRobot folders itself (damvla.data.lerobot).
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, deps in extras.items():
        packages = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in deps}
        assert name != "lerobot" and "lerobot" not in packages, name
