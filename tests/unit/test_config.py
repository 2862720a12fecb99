"""SPEConfig: validated once, plain-dict round trip, unknown keys named, fields grouped."""

from __future__ import annotations

import dataclasses
import json

import pytest

import spe_lightning.config as config
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
        ({"styling": "v9"}, "styling must be one of"),
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


def test_every_field_has_a_group_and_groups_are_declared_together():
    groups = config.setting_groups()
    assert list(groups) == list(config.GROUPS)
    assert [n for names in groups.values() for n in names] == [f.name for f in dataclasses.fields(SPEConfig)]
    assert "every_n_epochs" in groups["run"] and "alert_below" in groups["alerts"] and "classes" in groups["data"]


def test_a_field_out_of_its_group_is_named():
    @dataclasses.dataclass
    class Scattered:
        a: int = dataclasses.field(default=1, metadata=config.RUN)
        b: int = dataclasses.field(default=1, metadata=config.ALERTS)
        c: int = dataclasses.field(default=1, metadata=config.RUN)

    with pytest.raises(ValueError, match=r"Scattered.c: the fields of group 'run' are not declared together"):
        config.setting_groups(Scattered)

    @dataclasses.dataclass
    class Ungrouped:
        extra: int = 1

    with pytest.raises(ValueError, match="Ungrouped.extra has group None"):
        config.setting_groups(Ungrouped)

    @dataclasses.dataclass
    class Reordered:
        a: int = dataclasses.field(default=1, metadata=config.ALERTS)
        b: int = dataclasses.field(default=1, metadata=config.RUN)

    with pytest.raises(ValueError, match="order"):
        config.setting_groups(Reordered)
