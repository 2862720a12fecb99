"""Class paths a user gives (--model, --dataset, --transform, class_path in configs): errors that name the fix."""

from __future__ import annotations

import sys

import pytest

from spe_lightning.class_paths import find_missing_class_paths, import_object


@pytest.fixture(autouse=True)
def _no_cwd_on_path(monkeypatch):
    """As under the spe-lightning console script: the current folder is not on sys.path."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])


def test_import_object_finds_and_explains(tmp_path, monkeypatch):
    assert import_object("spe_lightning.models.SegmentationModel").__name__ == "SegmentationModel"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--model nomodule\.Net: no module named 'nomodule'.*PYTHONPATH=\."):
        import_object("nomodule.Net")
    with pytest.raises(ValueError, match="give a full dotted path"):
        import_object("Net")
    with pytest.raises(ValueError, match="spe_lightning.models has no 'Nope' \\(it defines"):
        import_object("spe_lightning.models.Nope")
    (tmp_path / "needsdep.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="imports 'a_package_that_is_not_installed', which is not installed"):
        import_object("needsdep.Net", "--dataset")


def test_lightningcli_arguments_and_config_files_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mynet.py").write_text("class MyNet: pass\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model:\n  class_path: mynet.MyNet\ndata:\n  class_path: spe_lightning.data.SyntheticShapesDataModule\n"
    )
    problems = find_missing_class_paths(
        ["fit", "--config", str(cfg), "--data=otherdata.Data", "--trainer.max_epochs=2"]
    )
    assert len(problems) == 2
    assert problems[0].startswith(f"class_path in {cfg} mynet.MyNet: 'mynet' is in the current folder")
    assert problems[1].startswith("--data otherdata.Data: no module named 'otherdata'")
    monkeypatch.syspath_prepend(str(tmp_path))  # PYTHONPATH=.
    assert find_missing_class_paths(["fit", "--config", str(cfg), "--model", "mynet.MyNet"]) == []
