"""Running a segmentation model over a cached dataset: foreground probabilities and masks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spe_lightning.data.adapters import binarize_mask, resize_images, split_item, to_gray01

__all__ = ["CachedSet", "cache_dataset", "default_logits", "foreground_probability", "predict_set", "eval_mode"]

LogitsFn = Callable[[nn.Module, Tensor], Tensor]


@dataclass
class CachedSet:
    """A dataset held in memory: model inputs, optional masks and working-size gray images."""

    name: str
    inputs: list[Tensor]  # model inputs [C,H,W] (as the dataset returns them)
    masks: list[Tensor] | None  # bool [1,H,W] or None (unlabelled)
    gray: Tensor  # float [N,1,w,w] in [0,1]: what the reverse segmenter sees
    indices: list[int] = field(default_factory=list)  # positions in the source dataset

    def __len__(self) -> int:
        return len(self.inputs)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive items stacked into batches while their shapes agree."""
        i = 0
        while i < len(self.inputs):
            j = i + 1
            while j < len(self.inputs) and j - i < batch_size and self.inputs[j].shape == self.inputs[i].shape:
                j += 1
            yield torch.stack(self.inputs[i:j])
            i = j


def cache_dataset(
    name: str,
    dataset: Sequence,
    working_size: int,
    image_key: str = "image",
    label_key: str = "label",
    foreground: int | None = None,
    indices: Sequence[int] | None = None,
    require_masks: bool = False,
) -> CachedSet:
    """Read ``dataset`` (items ``(image, mask)`` tuples or dicts) once into a :class:`CachedSet`."""
    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(f"SPE {name} dataset must be a map-style Dataset with __len__.") from err
    if n == 0:
        raise ValueError(f"The SPE {name} dataset is empty; give it at least one item.")
    idx = list(range(n)) if indices is None else list(indices)
    inputs: list[Tensor] = []
    masks: list[Tensor] = []
    has_mask = True
    for i in idx:
        image, mask = split_item(dataset[i], image_key, label_key)
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3:
            raise ValueError(f"SPE {name} item {i}: image has shape {tuple(image.shape)}; expected [C,H,W] or [H,W].")
        inputs.append(image)
        if mask is None:
            has_mask = False
            continue
        mask = binarize_mask(mask, foreground)
        if mask.ndim == 2:
            mask = mask[None]
        if mask.ndim == 3 and mask.shape[0] > 1:  # one-hot masks: any foreground channel
            mask = mask[1:].any(0, keepdim=True)
        if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
            raise ValueError(
                f"SPE {name} item {i}: mask size {tuple(mask.shape[-2:])} differs from image size "
                f"{tuple(image.shape[-2:])}; resize them together in the dataset."
            )
        masks.append(mask)
    if require_masks and not has_mask:
        raise ValueError(f"The SPE {name} dataset must return masks: items need (image, mask) or a {label_key!r} key.")
    size = (working_size, working_size)
    gray = torch.cat([resize_images(to_gray01(x[None].float()), size) for x in inputs])
    return CachedSet(name, inputs, masks if has_mask else None, gray, idx)


def default_logits(module: nn.Module, images: Tensor) -> Tensor:
    """``module(images)``; from a dict output takes ``"logits"``/``"pred"``/``"out"``, from a list the first."""
    out = module(images)
    if isinstance(out, Mapping):
        for key in ("logits", "pred", "out", "seg"):
            if key in out:
                return out[key]
        raise TypeError(f"Model returned a dict with keys {sorted(out)}; pass logits_fn= to pick the logits.")
    if isinstance(out, (list, tuple)):
        return out[0]
    return out


def foreground_probability(logits: Tensor, activation: str = "auto") -> Tensor:
    """``[B,1,H,W]`` foreground probability: sigmoid for 1 channel, 1 - softmax background for several."""
    logits = logits.float()
    if activation == "none":
        return logits[:, :1] if logits.shape[1] == 1 else 1.0 - logits[:, :1]
    if logits.shape[1] == 1 or activation == "sigmoid":
        return torch.sigmoid(logits[:, :1])
    return 1.0 - torch.softmax(logits, dim=1)[:, :1]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


@torch.no_grad()
def predict_set(
    module: nn.Module,
    data: CachedSet,
    device: torch.device,
    batch_size: int = 16,
    logits_fn: LogitsFn = default_logits,
    activation: str = "auto",
    threshold: float = 0.5,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Predict every item: ``(probabilities [1,H,W] list, masks bool [1,H,W] list, confidence [N])``.

    Confidence is the soft Dice between the probabilities and their own binarisation: 1 when the
    model is certain everywhere, lower where it hesitates (a baseline, not used by SPE).
    """
    probs: list[Tensor] = []
    masks: list[Tensor] = []
    conf: list[Tensor] = []
    with eval_mode(module):
        for batch in data.batches(batch_size):
            logits = logits_fn(module, batch.to(device))
            if not isinstance(logits, Tensor) or logits.ndim != 4 or logits.shape[0] != batch.shape[0]:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"Model output {shape} is not [B,C,H,W] logits; pass logits_fn= to SPECallback.")
            p = foreground_probability(logits, activation)
            if p.shape[-2:] != batch.shape[-2:]:
                p = resize_images(p, tuple(batch.shape[-2:]))
            p = p.cpu()
            m = p > threshold
            pm = m.float()
            inter = (p * pm).flatten(1).sum(1)
            denom = (p + pm).flatten(1).sum(1)
            conf.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1e-8), torch.ones_like(denom)))
            probs.extend(p)
            masks.extend(m)
    return probs, masks, torch.cat(conf)
