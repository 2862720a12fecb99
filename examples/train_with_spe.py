"""Add SPECallback to a Trainer: train on the synthetic phantom task, estimate two unlabelled targets.

python examples/train_with_spe.py
"""

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from spe_lightning import SPECallback, SPEConfig
from spe_lightning.data import SyntheticShapesDataModule
from spe_lightning.models import SegmentationModel


def main() -> None:
    pl.seed_everything(0)
    data = SyntheticShapesDataModule(n_train=96, n_val=32, n_target=32, size=64)
    data.setup()
    model = SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=3e-3)

    spe = SPECallback(
        SPEConfig(every_n_epochs=1, support_size=32, working_size=64),  # the settings (docs/settings.md)
        reference=data.train_set,  # labelled: the reverse step's queries (no augmentation)
        calibration=data.val_set,  # labelled: fits G (pseudo -> real metric)
        target=data.targets,  # unlabelled: {"target": ..., "target_noisy": ...}
    )
    trainer = pl.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=TensorBoardLogger("spe_runs/example", name="tb"),
        callbacks=[spe],
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(model, datamodule=data)

    for target, per_metric in spe.report.estimates.items():
        est = per_metric["dice"]  # an Estimate; the target came with masks, so its true Dice is beside it
        print(f"{target}: estimated Dice {est.value:.3f} [{est.lower:.3f}, {est.upper:.3f}], true {est.true:.3f}")
    print(f"TensorBoard: tensorboard --logdir {trainer.log_dir}")


if __name__ == "__main__":
    main()
