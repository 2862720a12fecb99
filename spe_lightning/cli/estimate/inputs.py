"""Reading the inputs of ``spe-lightning estimate``: the image folder (or the user's dataset), the masks, the
chunks, and the model from its checkpoint."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spe_lightning.class_paths import import_object
from spe_lightning.cli.estimate.arguments import DEFAULT_MODEL
from spe_lightning.data.adapters import as_tensor
from spe_lightning.data.images import (
    IMAGE_SUFFIXES,
    ImageLimits,
    ReadOptions,
    UnreadableImageError,
    check_mask_shape,
    find_mask_file,
    fit_to_size,
    image_tensor,
    is_nifti,
    list_image_files,
    mask_foreground,
    read_mask,
    read_nifti_slices,
)
from spe_lightning.monitoring.chunks import chunks_by_column, chunks_of, find_meta, parse_chunk_by, read_meta

__all__ = [
    "read_image_folder",
    "load_model",
    "read_masks",
    "chunk_groups",
    "user_dataset",
    "RecordingDataset",
    "progress_bar",
    "unreadable_error",
    "read_case_masks",
    "IMAGE_SUFFIXES",
]

#: how many unreadable files one error names (the others are counted)
MAX_LISTED = 10


def read_image_folder(
    folder: str | Path,
    image_size: int | None = None,
    progress: bool = False,
    limits: ImageLimits | None = None,
    options: ReadOptions | None = None,
    transform: Any = None,
) -> tuple[list[str], list[Tensor], list[str]]:
    """``(ids, images [C,S,S] float, source files relative to folder)`` of every image in ``folder``.

    Recursive and sorted; see :func:`spe_lightning.data.images.list_image_files` for what is refused
    (``limits``: default :class:`ImageLimits`). ``options``: how each file is read (default
    :class:`ReadOptions`: gray in [0, 1], padded to a square); ``transform(image [C,S,S]) -> image``
    after reading. Files that cannot be decoded are all named in one ``ValueError``, after the whole folder.
    """
    folder = Path(folder)
    o = options or ReadOptions()
    limits = ImageLimits() if limits is None else limits
    files = list_image_files(folder, limits)
    if not files:
        raise ValueError(
            f"--images {folder}: no images in it (looked for {', '.join(IMAGE_SUFFIXES)}, .dcm, .nii, .nii.gz, "
            "in sub-folders too); give the folder that holds the image files, or --dataset to read other formats."
        )
    ids: list[str] = []
    images: list[Tensor] = []
    sources: list[str] = []
    # files that cannot be decoded, named together at the end: a user with five broken files fixes them in one go
    bad: list[tuple[Path, Exception]] = []
    bar = progress_bar(len(files), "reading images", progress)
    for p in files:
        rel = p.relative_to(folder)
        name = rel.as_posix()
        try:
            slices = read_nifti_slices(p, limits, o.intensity) if is_nifti(p) else None
            x = image_tensor(p, image_size, limits, o) if slices is None else None
        except (OSError, SyntaxError, UnreadableImageError) as err:  # PIL: not an image, truncated; DICOM, NIfTI
            bad.append((p, err))
        else:
            if slices is not None:
                stem = name[: -len(".nii.gz") if p.name.lower().endswith(".gz") else -len(".nii")]
                for z, sl in enumerate(slices):
                    ids.append(f"{stem}#z{z:03d}")
                    y = torch.from_numpy(np.ascontiguousarray(sl))[None]
                    y = y.expand(3, *y.shape[1:]).clone() if o.channels == "rgb" else y
                    images.append(_transformed(fit_to_size(y, image_size, o.resize), transform, name))
                    sources.append(name)
            else:
                assert x is not None
                images.append(_transformed(x, transform, name))
                ids.append(rel.with_suffix("").as_posix())
                sources.append(name)
        bar.update(1)
    bar.close()
    _raise_unreadable(folder, bad)
    return ids, images, sources


def _reason(err: Exception, path: Path, root: Path) -> str:
    """The short why of an unreadable file (PIL quotes the whole path: shortened to the name under ``root``)."""
    if isinstance(err, UnreadableImageError):
        return err.reason
    return f"{type(err).__name__}: {err}".replace(str(path), path.relative_to(root).as_posix())


def _raise_unreadable(folder: Path, bad: Sequence[tuple[Path, Exception]]) -> None:
    """Raise for the image files of ``folder`` that could not be read (none: return): one file with its own message,
    several in one list."""
    if not bad:
        return
    if len(bad) == 1:
        path, err = bad[0]
        if isinstance(err, UnreadableImageError):
            raise err
        raise ValueError(
            f"cannot read the image {path.relative_to(folder).as_posix()}: {type(err).__name__}: {err} (remove it "
            "from the folder, or re-save it as PNG/TIFF)"
        ) from err
    listed = [(p.relative_to(folder).as_posix(), _reason(e, p, folder)) for p, e in bad]
    raise unreadable_error(
        "--images",
        folder,
        listed,
        "Remove or replace those files (re-save them as PNG/TIFF), or move them out of the folder.",
    ) from bad[0][1]


def unreadable_error(option: str, folder: Path, bad: Sequence[tuple[str, str]], fix: str) -> ValueError:
    """One error for the files of ``option``'s ``folder`` that could not be read (``(name, reason)`` each): how
    many, the first :data:`MAX_LISTED` with their reason, and ``fix``."""
    shown = "; ".join(f"{name} ({reason})" for name, reason in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    files = "file" if len(bad) == 1 else "files"
    return ValueError(f"{option} {folder}: cannot read {len(bad)} {files}: {shown}{more}. {fix}")


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "img") -> Any:
    """A tqdm bar on stderr (disabled with ``--no-progress``)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def _transformed(x: Tensor, transform: Any, name: str) -> Tensor:
    """``transform(x)`` as a float tensor ``[C,H,W]``; an error naming the file and the contract."""
    if transform is None:
        return x
    try:
        y = transform(x)
    except Exception as err:
        raise ValueError(f"--transform failed on {name}: {type(err).__name__}: {err}") from err
    try:
        y = as_tensor(y).float()
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"--transform returned a {type(y).__name__} for {name}; return a [C,H,W] tensor.") from err
    if y.ndim == 2:
        y = y[None]
    if y.ndim != 3:
        raise ValueError(f"--transform returned shape {tuple(y.shape)} for {name}; return a [C,H,W] image.")
    return y


def _import_class(path: str) -> type:
    cls: type = import_object(path, "--model", DEFAULT_MODEL)
    return cls


def load_model(
    ckpt: str | Path,
    model_class: str | None = None,
    device: str = "cpu",
    trust_checkpoint_class: bool = False,
    recorded_class: str | None = None,
) -> nn.Module:
    """The LightningModule of a checkpoint, in eval mode on ``device``.

    The class is ``model_class`` if given, else :class:`~spe_lightning.models.SegmentationModel`.
    The class path a checkpoint stores (``hyper_parameters._class_path``, as LightningCLI saves it)
    is imported only with ``trust_checkpoint_class=True``, and only after the whole checkpoint loaded
    with ``torch.load(weights_only=True)`` (tensors, numbers and strings, no code): importing a module
    runs its code, so a checkpoint must not choose one unless you trust where it came from.
    ``recorded_class``: the class the estimator file recorded at fit time, named in the error when the
    default class cannot load the checkpoint (never imported).
    """
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"--ckpt {ckpt}: no such file. Give the model's checkpoint from training: ModelCheckpoint's file, "
            "trainer.save_checkpoint(...), or, for a LightningCLI run, its checkpoints/ folder (configs with "
            "enable_checkpointing: false, like the demo's, save none: add --trainer.enable_checkpointing=true)."
        )
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"--ckpt {ckpt}: refused to load; it holds objects other than tensors, numbers and strings "
            f"({str(err).splitlines()[0][:200]})."
        ) from err
    except Exception as err:  # not a torch file, truncated...
        raise ValueError(f"--ckpt {ckpt}: cannot read it as a checkpoint: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and state.get("format") == "spe-estimator":
        raise ValueError(
            f"--ckpt {ckpt} is an SPE estimator file, not the model's checkpoint: did you swap --ckpt and --estimator?"
        )
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(
            f"--ckpt {ckpt}: not a Lightning checkpoint (no 'state_dict'); give the file ModelCheckpoint or "
            "trainer.save_checkpoint wrote (a bare torch.save(model.state_dict()) cannot say which class to build)."
        )
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    stored = hp.get("_class_path") if isinstance(hp, dict) else None
    stored = stored if isinstance(stored, str) else None
    if model_class is not None:
        path = model_class
    elif trust_checkpoint_class and stored:
        path = stored
    else:
        path = DEFAULT_MODEL
        if stored and stored != DEFAULT_MODEL:
            raise ValueError(
                f"--ckpt {ckpt} was saved from the class {stored}; pass --model {stored} (its module is imported: "
                "its code runs), or --trust-checkpoint-class if you trust the checkpoint's origin."
            )
    cls = _import_class(path)
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"{path} is not a LightningModule class; pass --model CLASS_PATH.")
    try:
        model = cls.load_from_checkpoint(str(ckpt), map_location=device, weights_only=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        first = " ".join(str(err).split())[:400]
        hint = ""
        if not model_class:
            hint = " (pass --model CLASS_PATH, the class the checkpoint was saved from"
            if recorded_class and recorded_class != path:
                hint += f"; the estimator was fitted with the class {recorded_class}"
            hint += ")"
        raise ValueError(f"cannot build {path} from --ckpt {ckpt}{hint}: {type(err).__name__}: {first}") from err
    return model.to(device).eval()


def read_masks(
    folder: str | Path,
    sources: Sequence[str],
    size: int | None,
    fg: int | None,
    resize: str = "pad",
    images: str | Path | None = None,
) -> list[Tensor]:
    """The mask of every image (``folder/<same relative name>``, any mask suffix), binary ``[1,S,S]`` at the images'
    size; with ``images`` (their folder) each mask must have its image's height and width."""
    root = Path(folder)
    paths = [None if is_nifti(s) else find_mask_file(root, s) for s in sources]
    missing = [s for s, p in zip(sources, paths) if p is None]
    if missing:
        raise ValueError(
            f"--masks {root}: no 2D mask for {len(missing)} image(s), e.g. {missing[:3]}; each mask must have its "
            "image's relative file name, any suffix (images/a/b.tif -> masks/a/b.png), or leave --masks out."
        )
    image_paths = [None if images is None else Path(images) / s for s in sources]
    cases = [(pos, path, image) for pos, (path, image) in enumerate(zip(paths, image_paths))]
    masks = read_case_masks(cases, root, fg, size, resize, "--masks")
    return [masks[pos] for pos in range(len(sources))]


def read_case_masks(
    cases: Sequence[tuple[int, Path | None, Path | None]],
    root: Path,
    fg: int | None,
    size: int | None,
    resize: str,
    option: str,
) -> dict[int, Tensor]:
    """:func:`read_case_mask` of each ``(position, mask path, image path)`` under ``root``, by position; the mask
    files that cannot be decoded are all named in one ``ValueError``, after the whole folder (as ``--images``)."""
    masks: dict[int, Tensor] = {}
    bad: list[tuple[str, str]] = []
    for pos, path, image in cases:
        assert path is not None
        try:
            masks[pos] = read_case_mask(path, image, fg, size, resize, option)
        except (OSError, SyntaxError) as err:  # PIL: not an image, truncated file
            bad.append((path.relative_to(root).as_posix(), _reason(err, path, root)))
    if bad:
        raise unreadable_error(option, root, bad, "Replace each with a readable PNG/TIFF mask.")
    return masks


def read_case_mask(
    path: Path, image: Path | None, fg: int | None, size: int | None, resize: str, option: str
) -> Tensor:
    """One case's mask file as the estimate CLI reads it (``--masks``, ``--labelled-masks``): binary ``[1,S,S]``
    at the images' size, after checking it has its ``image``'s height and width (when given)."""
    m = read_mask(path)
    if image is not None:
        check_mask_shape(m, image, f"{option} {path}")
    return fit_to_size(torch.from_numpy(mask_foreground(m, fg).astype(np.uint8))[None], size, resize, mode="nearest")


def chunk_groups(spec: str, ids: Sequence[str], images: str | Path) -> tuple[dict[str, list[int]], str]:
    """The chunks of ``--chunk-by`` (label -> positions) and a description of them."""
    parsed = parse_chunk_by(spec)
    if isinstance(parsed, int):
        return chunks_of(len(ids), parsed), f"{parsed} images per chunk, in file order"
    meta = find_meta(parsed[0], images)
    return chunks_by_column(ids, read_meta(meta), parsed[1], meta=str(meta)), f"by {parsed[1]!r} of {meta.name}"


class RecordingDataset:
    """A user's dataset as :meth:`SPEEstimator.cache` reads it, keeping each dict item's ``id``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.ids: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
            self.ids[i] = str(item["id"])
        return item

    def item_ids(self) -> list[str]:
        """Each item's ``id`` (dict items), else the dataset's ``ids`` attribute, else its position."""
        n = len(self)
        own = getattr(self.dataset, "ids", None)
        fallback = [str(v) for v in own] if isinstance(own, (list, tuple)) and len(own) == n else None
        return [self.ids.get(i, fallback[i] if fallback else f"{i:05d}") for i in range(n)]


def user_dataset(path: str, folder: str) -> RecordingDataset:
    """``--dataset``: the user's class built from the images folder."""
    cls = import_object(path, "--dataset", "mypackage.data.MyDataset")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--images {folder}: not a folder (--dataset {path} is built from it).")
    try:
        ds = cls(folder)
    except Exception as err:
        raise ValueError(
            f"--dataset {path}: {path.rpartition('.')[2]}({folder!r}) failed: {type(err).__name__}: {err} "
            "(the class is built with the --images folder as its only argument; wrap it in a class that is)."
        ) from err
    try:
        n = len(ds)
    except TypeError as err:
        raise ValueError(f"--dataset {path}: needs __len__ and __getitem__ (a map-style dataset).") from err
    if n == 0:
        raise ValueError(f"--dataset {path}: built from {folder}, it has no items; check the folder it reads.")
    return RecordingDataset(ds)
