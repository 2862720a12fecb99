"""Datasets in the folder layout ``<root>/<split>/{images,masks}/<id>.png`` (+ optional ``meta.csv``)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from spe_lightning.data.images import (
    IMAGE_SUFFIXES,
    ReadOptions,
    check_mask_shape,
    is_dicom,
    mask_foreground,
    read_image_array,
    read_mask,
    square_resize,
)

__all__ = ["FolderSegmentationDataset", "FolderSegmentationDataModule", "read_meta", "site_dataset"]


def read_meta(root: str | Path) -> dict[str, dict[str, str]]:
    """``id -> row`` of ``<root>/meta.csv`` (empty when the file is absent)."""
    path = Path(root) / "meta.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


class FolderSegmentationDataset(Dataset):
    """Image/mask pairs from ``<root>/<split>/images`` and ``<root>/<split>/masks`` (same file stem).

    Items are dicts ``{"image": float [1,S,S] in [0,1], "label": float [1,S,S] in {0,1}, "id": str}``.
    Images are read by :func:`spe_lightning.data.images.read_image` (the reader ``spe-lightning
    estimate`` uses too): grayscale, 8-bit / 255, 16-bit and float images scaled between their 0.5th
    and 99.5th percentiles. Masks hold class indices and ``class_index`` picks
    the foreground (``None``: any non-zero class). Images are resized to ``image_size``
    (longer side padded with zeros first when ``keep_aspect``; masks nearest-neighbour).

    Args:
        root: dataset root.
        split: sub-folder, e.g. ``"train"``.
        class_index: foreground class index in the masks.
        image_size: side of the square output.
        groups: keep only ids whose ``meta.csv`` group is listed.
        augment: light random intensity and translation augmentation (training only).
        keep_aspect: pad to a square before resizing instead of stretching (``spe-lightning estimate
            --resize pad``; False: ``--resize plain``).
        intensity: how intensities are scaled (:data:`~spe_lightning.data.images.INTENSITY_MODES`; ``estimate
            --intensity``).
        image_channels: ``"gray"`` (one channel) or ``"rgb"`` (three; ``estimate --channels``).
        require_masks: the split must have a mask for every image (training and validation splits); else a
            split without a ``masks`` folder is unlabelled (items without ``"label"``). A ``masks`` folder that
            lacks some images' masks is refused either way (they would read as empty masks).

    Masks that hold only 0 and 255 (8-bit binary masks) are read as class 1 where 255 is.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        class_index: int | None = 1,
        image_size: int = 128,
        groups: Sequence[str] | None = None,
        augment: bool = False,
        keep_aspect: bool = True,
        intensity: str = "auto",
        image_channels: str = "gray",
        require_masks: bool = False,
    ) -> None:
        ReadOptions(intensity=intensity, channels=image_channels)  # validates
        self.intensity, self.image_channels = intensity, image_channels
        self.root = Path(root)
        folder = self.root / split / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"No image folder {folder}; expected the layout <root>/<split>/images/<id>.png.")
        self.split, self.class_index, self.image_size = split, class_index, int(image_size)
        self.augment, self.keep_aspect = augment, keep_aspect
        self.images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p))
        if groups is not None:
            meta = read_meta(self.root)
            wanted = set(groups)
            self.images = [p for p in self.images if meta.get(p.stem, {}).get("group") in wanted]
        if not self.images:
            raise ValueError(
                f"No images found in {folder}"
                + (f" for groups {list(groups)} (the 'group' column of {self.root / 'meta.csv'})" if groups else "")
                + f"; expected files with the suffixes {', '.join(IMAGE_SUFFIXES)} or .dcm."
            )
        self.ids = [p.stem for p in self.images]
        self.labelled = self._check_masks(require_masks)
        self._cache: dict[int, tuple[Tensor, Tensor | None]] = {}

    def _check_masks(self, required: bool) -> bool:
        """Whether the split is labelled; raise when its masks folder is missing (``required``) or incomplete."""
        folder = self.root / self.split / "masks"
        if not folder.is_dir():
            if required:
                near = [p.name for p in (self.root / self.split).iterdir() if p.is_dir() and p.name != "images"]
                hint = f" (found {', '.join(sorted(near))}/: rename the masks' folder to masks/)" if near else ""
                raise FileNotFoundError(
                    f"No mask folder {folder}{hint}; the {self.split!r} split needs masks in the layout "
                    "<root>/<split>/masks/<id>.png (the same file stem as its image)."
                )
            return False
        missing = [p.name for p in self.images if self._mask_path(p) is None]
        if missing:
            raise FileNotFoundError(
                f"{folder} has no mask for {len(missing)} of {len(self.images)} images, e.g. {missing[:3]}: each "
                "image needs a mask with the same file stem (any image suffix), else it would read as an empty mask."
            )
        return True

    def __len__(self) -> int:
        return len(self.images)

    def _mask_path(self, img: Path) -> Path | None:
        folder = self.root / self.split / "masks"
        for suffix in (img.suffix, *IMAGE_SUFFIXES):
            cand = folder / (img.stem + suffix)
            if cand.exists():
                return cand
        return None

    def _square(self, x: Tensor, mode: str) -> Tensor:
        return square_resize(x, self.image_size, mode, self.keep_aspect)

    def _load(self, i: int) -> tuple[Tensor, Tensor | None]:
        if i not in self._cache:
            img = torch.from_numpy(read_image_array(self.images[i], None, self.intensity, self.image_channels))
            mpath = self._mask_path(self.images[i])
            mask = None
            if mpath is not None:
                m = read_mask(mpath)
                check_mask_shape(m, self.images[i].name, str(mpath), shape=(img.shape[-2], img.shape[-1]))
                fg = torch.from_numpy(mask_foreground(m, self.class_index))  # 0/255: 255 is class 1
                mask = self._square(fg[None].float(), "nearest")
            self._cache[i] = (self._square(img, "bilinear"), mask)
        return self._cache[i]

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        img, mask = self._load(i)
        if mask is None:  # an unlabelled split: no "label" (never an empty mask posing as the truth)
            return {"image": _augment(img, torch.zeros_like(img[:1]))[0] if self.augment else img, "id": self.ids[i]}
        if self.augment:
            img, mask = _augment(img, mask)
        return {"image": img, "label": mask, "id": self.ids[i]}


def _augment(img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Random contrast/brightness and a small translation (no flips: anatomy is lateralised)."""
    g = torch.rand(3)
    img = (img * (0.8 + 0.4 * g[0]) + 0.1 * (g[1] - 0.5)).clamp(0, 1)
    dy, dx = (torch.randint(-6, 7, (2,))).tolist()
    img = torch.roll(img, shifts=(dy, dx), dims=(-2, -1))
    mask = torch.roll(mask, shifts=(dy, dx), dims=(-2, -1))
    return img, mask


class FolderSegmentationDataModule(pl.LightningDataModule):
    """Train/validation loaders from a folder dataset, plus the datasets SPE needs.

    ``spe_datasets()`` returns the reference (train split without augmentation), the
    calibration (validation split) and the targets (``target_splits``), so SPECallback
    works without passing datasets explicitly (e.g. from LightningCLI).

    Args:
        root: dataset root in the layout ``<root>/<split>/{images,masks}/<id>.png``.
        class_index: foreground class (e.g. JSRT heart = 2, BUSI lesion = 1).
        image_size: square side images are resized to.
        batch_size: training batch size.
        num_workers: DataLoader workers.
        train_split: split used for training and as SPE reference.
        val_split: split used for validation and as SPE calibration.
        target_splits: splits given to SPE as unlabelled targets (their masks only score the estimate).
        train_groups: restrict training/reference/calibration to these ``meta.csv`` groups.
        augment: augment the training images.
        extra_targets: more targets from other roots, ``{name: root}`` (e.g. another site's images in
            the same layout): every split found under the root is used, concatenated.
        keep_aspect, intensity, image_channels: how images are read (:class:`FolderSegmentationDataset`); give
            ``spe-lightning estimate`` the same (``--resize pad|plain``, ``--intensity``, ``--channels``).
    """

    def __init__(
        self,
        root: str,
        class_index: int | None = 1,
        image_size: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        train_split: str = "train",
        val_split: str = "test",
        target_splits: list[str] | None = None,
        train_groups: list[str] | None = None,
        augment: bool = True,
        extra_targets: dict[str, str] | None = None,
        keep_aspect: bool = True,
        intensity: str = "auto",
        image_channels: str = "gray",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.target_splits = ["extra_test"] if target_splits is None else list(target_splits)
        self.extra_targets = dict(extra_targets or {})
        clash = sorted(set(self.extra_targets) & {*self.target_splits, "calibration"})
        if clash:
            raise ValueError(f"extra_targets names {clash} clash with the target splits or 'calibration'; rename them.")

    def _ds(self, split: str, augment: bool = False, labelled: bool = False) -> FolderSegmentationDataset:
        hp: Any = self.hparams  # an AttributeDict (Lightning types it as a mapping)
        return FolderSegmentationDataset(
            self.root, split, hp.class_index, hp.image_size, groups=hp.train_groups, augment=augment,
            require_masks=labelled, **self._read,
        )  # fmt: skip

    @property
    def _read(self) -> dict[str, Any]:
        """How images are read (the same for training, SPE's sets and extra targets)."""
        return {k: self.hparams[k] for k in ("keep_aspect", "intensity", "image_channels")}

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_set"):
            self.train_set = self._ds(self.hparams["train_split"], augment=self.hparams["augment"], labelled=True)
            self.reference_set = self._ds(self.hparams["train_split"], labelled=True)
            self.val_set = self._ds(self.hparams["val_split"], labelled=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.hparams["batch_size"],
            shuffle=True,
            num_workers=self.hparams["num_workers"],
            drop_last=len(self.train_set) > self.hparams["batch_size"],
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams["batch_size"], num_workers=self.hparams["num_workers"])

    def spe_datasets(self) -> dict[str, object]:
        """``{"reference", "calibration", "target": {split: dataset}}`` for SPECallback."""
        self.setup()
        targets: dict[str, Dataset] = {split: self._ds(split) for split in self.target_splits}
        targets.update(
            {
                name: site_dataset(root, self.hparams["class_index"], self.hparams["image_size"], **self._read)
                for name, root in self.extra_targets.items()
            }
        )
        return {"reference": self.reference_set, "calibration": self.val_set, "target": targets}


def site_dataset(root: str | Path, class_index: int | None = 1, image_size: int = 128, **read: Any) -> Dataset:
    """Every split under ``root`` (folders holding ``images/``), concatenated: another site's labelled images
    (``read``: ``keep_aspect``, ``intensity``, ``image_channels`` of :class:`FolderSegmentationDataset`)."""
    splits = sorted(p.parent.name for p in Path(root).glob("*/images") if p.is_dir())
    if not splits:
        raise FileNotFoundError(f"No <split>/images folder under {root}; expected <root>/<split>/images/<id>.png.")
    parts = [FolderSegmentationDataset(root, split, class_index, image_size, **read) for split in splits]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)
