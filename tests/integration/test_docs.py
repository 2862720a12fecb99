"""The settings page is generated from SPEConfig's field docstrings, one section per group, and is current."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from spe_lightning import SPECallback, SPEConfig
from spe_lightning.config import GROUPS, SETTINGS_COMMAND, setting_docs, setting_groups, settings_markdown

REPO = Path(__file__).resolve().parents[2]


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


def test_settings_page_has_one_section_per_group_in_field_order():
    page = settings_markdown()
    sections = [line[3:] for line in page.splitlines() if line.startswith("## ")]
    assert sections == list(GROUPS.values())
    for group, names in setting_groups().items():
        body = page.split(f"## {GROUPS[group]}\n", 1)[1].split("\n## ", 1)[0]
        assert [r.split("`")[1] for r in body.splitlines() if r.startswith("| `")] == names


def test_callback_settings_are_the_config_not_a_second_copy():
    """SPECallback takes an SPEConfig and overrides by name: its signature repeats no setting (one source)."""
    params = inspect.signature(SPECallback.__init__).parameters
    assert params["config"].annotation in ("SPEConfig | None", SPEConfig | None)
    assert not {f.name for f in dataclasses.fields(SPEConfig)} & set(params)
    assert SPECallback(every_n_epochs=2).config == SPEConfig(every_n_epochs=2)
