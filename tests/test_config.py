import json

import pytest

from damvla.config import ABLATIONS, PolicyConfig, apply_overrides, preset


def test_config_round_trips_through_json():
    cfg = preset("small", "no_dl")
    again = PolicyConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg


def test_overrides_change_the_named_field_and_reject_unknown_keys():
    cfg = apply_overrides(preset("tiny"), ["dit.depth=3", "ablation.dam=false", "inference.routing=soft"])
    assert cfg.dit.depth == 3 and cfg.ablation.dam is False and cfg.inference.routing == "soft"
    with pytest.raises(ValueError, match="unknown key"):
        apply_overrides(preset("tiny"), ["dit.depthh=3"])
    with pytest.raises(ValueError, match="no config section"):
        apply_overrides(preset("tiny"), ["ditt.depth=3"])


def test_all_switches_off_is_the_cogact_row():
    assert not any(vars(ABLATIONS["cogact"]).values())
    assert all(vars(ABLATIONS["damvla"]).values())


def test_invalid_values_are_named():
    with pytest.raises(ValueError, match="gripper_index"):
        apply_overrides(preset("tiny"), ["gripper_index=9"])
    with pytest.raises(ValueError, match="routing"):
        apply_overrides(preset("tiny"), ["inference.routing=blend"])
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
