"""Running a segmentation model over a cached set: foreground probabilities, masks or label maps, confidence."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spe_lightning.data.adapters import encode_labels
from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.soft_dice import soft_dice_confidence

__all__ = [
    "LogitsFn",
    "NonFiniteOutputError",
    "default_logits",
    "eval_mode",
    "foreground_probability",
    "predict_labels",
]

LogitsFn = Callable[[nn.Module, Tensor], Tensor]


class NonFiniteOutputError(ValueError):
    """The model's output holds NaN or inf at the current weights."""


def model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """Where SPE runs ``model``: ``device`` when given, else the module's own (a LightningModule's
    ``device``, or its first parameter's), else the CPU."""
    if device is not None:
        return torch.device(device)
    own = getattr(model, "device", None)
    if isinstance(own, torch.device):
        return own
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """Short hashes of a model's architecture (its state's names and shapes) and of its weights (their bytes): what
    a fitted estimator records, so that another model, or other weights, are told apart from the fitted ones."""
    arch, weights = hashlib.sha256(), hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, Tensor):
            continue
        arch.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        weights.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"architecture": arch.hexdigest()[:16], "weights": weights.hexdigest()[:16]}


def default_logits(module: nn.Module, images: Tensor) -> Tensor:
    """``module(images)``; from a dict output takes ``"logits"``/``"pred"``/``"out"``, from a list the first."""
    out = module(images)
    if isinstance(out, Mapping):
        for key in ("logits", "pred", "out", "seg"):
            if key in out:
                return out[key]
        raise TypeError(f"Model returned a dict with keys {sorted(out)}; pass logits_fn= to pick the logits.")
    if isinstance(out, (list, tuple)):
        if not out:
            raise TypeError("Model returned an empty list; pass logits_fn= to pick the logits.")
        return out[0]
    return out


def foreground_probability(logits: Tensor, activation: str = "auto") -> Tensor:
    """``[B,1,*S]`` foreground probability: sigmoid for 1 channel, 1 - softmax background for several."""
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


def _checked_logits(logits: object, batch: Tensor) -> Tensor:
    nd = batch.ndim
    if not isinstance(logits, Tensor) or logits.ndim != nd or logits.shape[0] != batch.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        want = "[B,C,H,W]" if nd == 4 else "[B,C,D,H,W]"
        raise ValueError(f"Model output {shape} is not {want} logits; pass logits_fn= to SPECallback.")
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteOutputError("the model's output holds NaN or inf at these weights")
    logits = logits.float()
    if logits.shape[2:] != batch.shape[2:]:
        mode = "bilinear" if nd == 4 else "trilinear"
        logits = F.interpolate(logits, size=tuple(batch.shape[2:]), mode=mode, align_corners=False)
    return logits


def _soft_dice(p: Tensor, m: Tensor) -> Tensor:
    # the per-case confidence is the Soft Dice Confidence (engine/soft_dice.py)
    return soft_dice_confidence(p, m)


def _decode(
    logits: Tensor, activation: str, threshold: float, foreground: int | None, classes: Sequence[int] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(foreground probability [B,1,*S], masks [B,1,*S] (bool or uint8 labels), confidence [B])``."""
    c = logits.shape[1]
    if classes is None and (foreground is None or c == 1):
        p = foreground_probability(logits, activation)
        m = p > threshold
        return p, m, _soft_dice(p, m)
    need = max(classes) if classes is not None else foreground
    assert need is not None
    if c == 1 or c <= need:
        raise ValueError(
            f"The model has {c} output channel(s) but SPE needs class index {need}: give the classes the model "
            "predicts (channel index = class index), or a logits_fn."
        )
    probs = logits if activation == "none" else torch.softmax(logits, dim=1)
    arg = logits.argmax(1, keepdim=True)
    if classes is None:
        assert foreground is not None  # without classes, a None foreground returned above
        m = arg == foreground
        p = probs[:, foreground : foreground + 1]
        return p, m, _soft_dice(p, m)
    labels = encode_labels(arg.cpu(), classes)
    p = 1.0 - probs[:, :1]
    return p, labels, _soft_dice(p.cpu(), labels > 0)


@torch.no_grad()
def predict_labels(
    module: nn.Module,
    data: CachedSet,
    device: torch.device | str,
    batch_size: int = 16,
    logits_fn: LogitsFn = default_logits,
    activation: str = "auto",
    threshold: float = 0.5,
    foreground: int | None = None,
    classes: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """Predicted masks (bool ``[1,*S]``, or uint8 label maps with ``classes``) and confidence ``[n]``.

    Only the items at ``positions`` (default: all), in that order. Integer images are cast to
    float32 (values unchanged) before the forward. Raises :class:`NonFiniteOutputError` when the
    output holds NaN/inf and ValueError when it is not ``[B,C,*S]`` logits.
    """
    masks: list[Tensor] = []
    conf: list[Tensor] = []
    with eval_mode(module):
        for _, batch in data.batches(batch_size, positions):
            x = batch if batch.is_floating_point() else batch.float()
            logits = _checked_logits(logits_fn(module, x.to(device)), batch)
            _, m, c = _decode(logits, activation, threshold, foreground, classes)
            masks.extend(m.cpu())
            conf.append(c.cpu())
    return masks, torch.cat(conf) if conf else torch.zeros(0)
