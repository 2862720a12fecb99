"""SPEConfig: validated once, plain-dict round trip, unknown keys named."""

from __future__ import annotations

import json

import pytest

from spe_lightning import SPEConfig


def test_round_trip_through_json():
    c = SPEConfig(classes={"heart": 2, "lung": 1}, metrics=["dice"], interval_shifts=["noise"], level=0.8)
    again = SPEConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c and again.class_names == ["heart", "lung"] and again.class_indices == [2, 1]
    assert c.keys == ["dice", "dice/heart", "dice/lung"]
    assert SPEConfig(classes=[1, 2]).classes == {"class_1": 1, "class_2": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"support_size": 0}, "support_size"),
        ({"every_n_epochs": 1.5}, "every_n_epochs"),
        ({"threshold": 1.0}, "threshold"),
        ({"level": 0}, "level"),
        ({"mapping": "cubic"}, "mapping"),
        ({"activation": "relu"}, "activation"),
        ({"interval_shifts": ["fog"]}, "interval_shifts"),
        ({"segmenter": "nope"}, "unknown segmenter"),
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"classes": [1, 1]}, "distinct"),
        ({"classes": [1], "foreground_class": 1}, "not both"),
        ({"metrics": ["dice", "volume"]}, "volume"),
        ({"memory_budget_mb": 0}, "memory_budget_mb"),
        ({"max_references": 0}, "max_references"),
    ],
)
def test_bad_settings_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPEConfig(**kwargs)


def test_unknown_keys_and_changes():
    with pytest.raises(ValueError, match="suport_size"):
        SPEConfig.from_dict({"suport_size": 8})
    c = SPEConfig()
    assert c.changed_from({**c.to_dict(), "support_size": 8, "verbose": False}) == ["support_size"]
    assert c.replace(seed=3).seed == 3 and c.seed == 0
