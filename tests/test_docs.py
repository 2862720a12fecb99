"""The settings page is generated from SPEConfig's field docstrings and is current; the callback agrees with them."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from spe_lightning import SPECallback, SPEConfig
from spe_lightning.config import SETTINGS_COMMAND, setting_docs, settings_markdown

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_has_a_docstring():
    docs = setting_docs()
    assert list(docs) == [f.name for f in dataclasses.fields(SPEConfig)]
    assert all(len(text) > 20 for text in docs.values())


def test_committed_settings_page_is_current():
    page = (REPO / "docs" / "settings.md").read_text()
    assert page == settings_markdown(), f"docs/settings.md is stale: regenerate it with `{SETTINGS_COMMAND}`"


def test_settings_page_has_one_row_per_field_and_no_benchmark_numbers():
    rows = [line for line in settings_markdown().splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [f.name for f in dataclasses.fields(SPEConfig)]
    assert "BENCHMARKS" not in settings_markdown() and "MAE" not in settings_markdown()


def test_a_field_without_docstring_is_named(monkeypatch):
    import spe_lightning.config as config

    monkeypatch.setattr(config, "setting_docs", lambda: {"segmenter": "the reverse segmenter, documented"})
    with pytest.raises(ValueError, match="every_n_epochs"):
        config.settings_markdown()


def test_callback_defaults_equal_config_defaults():
    """The callback mirrors SPEConfig's fields as keyword arguments: same names, same defaults."""
    params = inspect.signature(SPECallback.__init__).parameters
    defaults = SPEConfig()
    for f in dataclasses.fields(SPEConfig):
        assert f.name in params, f"SPECallback lacks the setting {f.name}"
        given = params[f.name].default
        given = tuple(given) if isinstance(given, (list, tuple)) else given
        assert given == getattr(defaults, f.name), f.name
