"""The `spe-lightning` command: help, any LightningModule for `fit`, one-line errors, status 2 (docs/security.md)."""

from __future__ import annotations

import pytest

from spe_lightning.cli import main as cli_main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("fit", "estimate", "benchmark"):
        assert cmd in text.split("usage:")[0]


def test_fit_takes_any_lightning_module_and_datamodule(tmp_path, monkeypatch):
    (tmp_path / "spe_user_mod.py").write_text(
        "import lightning.pytorch as pl, torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "class TinySeg(pl.LightningModule):\n"
        "    def __init__(self, channels: int = 2):\n"
        "        super().__init__()\n"
        "        self.net = torch.nn.Conv2d(1, 1, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
        "    def training_step(self, batch, i):\n"
        "        x, y = batch\n"
        "        return torch.nn.functional.binary_cross_entropy_with_logits(self(x), y)\n"
        "    def configure_optimizers(self):\n"
        "        return torch.optim.SGD(self.parameters(), 0.1)\n"
        "class PlainData(pl.LightningDataModule):\n"
        "    def train_dataloader(self):\n"
        "        x = torch.rand(4, 1, 8, 8)\n"
        "        return DataLoader(TensorDataset(x, (x > 0.5).float()), batch_size=2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli_main(
        [
            "fit",
            "--model=spe_user_mod.TinySeg",
            "--data=spe_user_mod.PlainData",
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )


def test_a_misspelt_value_is_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(
            [
                "fit",
                "--model=spe_lightning.models.SegmentationModel",
                "--data=spe_lightning.data.SyntheticShapesDataModule",
                "--trainer.callbacks+=spe_lightning.SPECallback",
                "--trainer.callbacks.config.segmenter=univerzeg",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        line for line in err.splitlines() if "unknown segmenter 'univerzeg'" in line
    ]


def test_benchmark_input_errors_are_one_line_and_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["benchmark", "paper", "--data", str(tmp_path / "missing"), "--epochs", "1", "--accelerator", "cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spe-lightning")]
    assert exit_.value.code == 2 and len(err) == 1 and "No image folder" in err[0]
