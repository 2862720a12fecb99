import os
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import pytest

from spe_lightning import SPECallback
from spe_lightning.data import SyntheticShapesDataModule
from spe_lightning.models import SegmentationModel

# Tests never touch the network: UniverSeg's loader must not try to download.
os.environ["SPE_NO_DOWNLOAD"] = "1"
os.environ.pop("SPE_UNIVERSEG_WEIGHTS", None)
# A user's cache of fitted reverse segmenters never leaks into tests (tests of the cache give a folder).
os.environ["SPE_CACHE_DIR"] = ""

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_torch_hub(tmp_path_factory, monkeypatch):
    """Point torch.hub at an empty folder so a user's cached UniverSeg weights never leak into tests."""
    import torch

    hub = tmp_path_factory.mktemp("hub")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))


@pytest.fixture(autouse=True)
def _fast_auto_segmenter(request, monkeypatch):
    """Offline, ``segmenter="auto"`` means the learned propagation, whose fit takes ~50 s: tests that only
    need *a* working SPE get label fusion from "auto"; tests marked ``real_default`` see the real default."""
    if "real_default" not in request.keywords:
        from spe_lightning.reverse import base

        monkeypatch.setattr(base, "DEFAULT_WEIGHT_FREE", "label_fusion")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_default: 'auto' resolves to the product's real offline default")
    import torch

    # The tests are tiny; one thread avoids oversubscription slow-downs on small shared CPUs.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """A tiny model trained 3 epochs with SPE on the phantom task: (callback, model, datamodule).

    Shared by test_estimator and test_estimate_cli (session scope: trained once).
    """
    pl.seed_everything(0)
    dm = SyntheticShapesDataModule(n_train=32, n_val=16, n_target=12, size=48, batch_size=4)
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)
    cb = SPECallback(
        segmenter="label_fusion", support_size=12, working_size=48, max_references=20, seed=0, verbose=False
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path_factory.mktemp("fit"),
    )
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    cb.ckpt_path = ckpt  # for the CLI test
    # the estimator as the callback would save it after fit (per-case flags calibrated on its calibration set)
    assert cb.run.estimator is not None  # built once when the run finished (fit_estimator)
    cb.estimator_path = cb.run.estimator.save(ckpt.parent / "spe_estimator.pt")
    return cb, model, dm


class QualityFit(NamedTuple):
    """A finished run with the quality regressor (read-only for the tests that share it)."""

    callback: SPECallback
    trainer: pl.Trainer
    datamodule: SyntheticShapesDataModule
    log_dir: Path


@pytest.fixture(scope="session")
def quality_fitted(tmp_path_factory) -> QualityFit:
    """A tiny model trained 3 epochs with SPE and ``quality_regressor=True``, files written to ``log_dir``.

    Shared by test_estimator and test_percase_sites_run (the same ~40 s fit, trained once). The tests only read
    it: the estimator is loaded from ``log_dir``'s file; the model is used for inference only.
    """
    log_dir = tmp_path_factory.mktemp("quality_fit")
    pl.seed_everything(0)
    dm = SyntheticShapesDataModule(n_train=16, n_val=12, n_target=8, size=32, batch_size=4)
    cb = SPECallback(
        segmenter="label_fusion", support_size=8, seed=0, verbose=False, quality_regressor=True, log_dir=str(log_dir)
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("quality_root"),
    )
    trainer.fit(SegmentationModel(channels=(8, 16), strides=(2,), lr=3e-3), datamodule=dm)
    return QualityFit(cb, trainer, dm, log_dir)


@pytest.fixture(scope="session")
def demo_fit_in_scratch_dir(tmp_path_factory) -> Path:
    """``spe-lightning fit --config configs/synthetic.yaml`` shrunk (tests/_demo.py's SMALL and CHEAP_SPE), run
    from an empty directory with the config's own output places; that directory (tests only read it).

    Shared by test_cli (what the report holds) and test_outputs (where the files go): one fit, not two.
    """
    import torch
    from _demo import CHEAP_SPE, CONFIG, SMALL

    from spe_lightning.cli import cli
    from spe_lightning.reverse import base

    root = tmp_path_factory.mktemp("demo_fit")
    hub = tmp_path_factory.mktemp("demo_fit_hub")
    # a session fixture runs outside the function-scoped autouse fixtures above: the same isolation by hand
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: str(hub))
        mp.setattr(base, "DEFAULT_WEIGHT_FREE", "label_fusion")  # the config's "auto", as _fast_auto_segmenter
        mp.chdir(root)
        cli(["fit", "--config", str(CONFIG), *SMALL, *CHEAP_SPE])
    return root
