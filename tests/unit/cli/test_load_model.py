"""A checkpoint given to `spe-lightning estimate` never runs code (docs/security.md): class paths, pickled objects."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _inputs import tiny_estimator

from spe_lightning.cli import main as cli_main
from spe_lightning.cli.estimate import load_model

EVIL = """
import os
from pathlib import Path

import lightning.pytorch as pl

Path(os.environ["SPE_TEST_MARKER"]).write_text("side effect ran")


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
"""


def _ckpt(path: Path, class_path: str) -> Path:
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"_class_path": class_path},
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A module with an import-time side effect on sys.path and a checkpoint naming its class."""
    mods = tmp_path / "mods"
    mods.mkdir()
    name = f"spe_evil_{tmp_path.name.replace('-', '_')}"
    (mods / f"{name}.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(mods))
    marker = tmp_path / "marker.txt"
    monkeypatch.setenv("SPE_TEST_MARKER", str(marker))
    yield _ckpt(tmp_path / "evil.ckpt", f"{name}.Model"), marker, name
    sys.modules.pop(name, None)


def test_checkpoint_class_path_is_not_imported(evil, capsys, tmp_path):
    ckpt, marker, name = evil
    est = tiny_estimator({"name": "label_fusion"})
    est_path = tmp_path / "est.pt"
    torch.save(est.state(embed_reference=False), est_path)
    with pytest.raises(ValueError, match="--trust-checkpoint-class") as err:
        load_model(ckpt)
    assert f"--model {name}.Model" in str(err.value)
    assert not marker.exists() and name not in sys.modules
    with pytest.raises(SystemExit) as exit_:  # the same through the command: one line, status 2
        cli_main(["estimate", "--ckpt", str(ckpt), "--estimator", str(est_path), "--images", ".", "--out", "o"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and not marker.exists() and name not in sys.modules
    assert len(err.splitlines()) == 1 and "--trust-checkpoint-class" in err


def test_checkpoint_class_path_is_used_only_on_opt_in(evil):
    ckpt, marker, name = evil
    model = load_model(ckpt, trust_checkpoint_class=True)
    assert type(model).__module__ == name and marker.exists()  # the user asked for it


def test_lightning_guard_is_kept_for_foreign_classes(tmp_path):
    ckpt = _ckpt(tmp_path / "boring.ckpt", "lightning.pytorch.demos.boring_classes.BoringModel")
    with pytest.raises(ValueError, match="trust-checkpoint-class"):
        load_model(ckpt)


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": types.SimpleNamespace(a=1)}}, path)
    with pytest.raises(ValueError, match="refused to load"):
        load_model(path, "spe_lightning.models.SegmentationModel")


def test_a_checkpoint_of_the_users_class_loaded_without_model_names_the_class_the_estimator_recorded(tmp_path):
    path = tmp_path / "user.ckpt"  # a plain Lightning checkpoint of a user's module: no class path stored
    torch.save({"state_dict": {"body.weight": torch.zeros(2)}, "pytorch-lightning_version": pl.__version__}, path)
    with pytest.raises(ValueError, match=r"pass --model CLASS_PATH.*the estimator was fitted with the class derm\.Net"):
        load_model(path, recorded_class="derm.Net")
    with pytest.raises(ValueError) as err:
        load_model(path)
    assert "fitted with" not in str(err.value)
