"""The reverse-segmenter interface shared by UniverSeg and the weight-free segmenters.

A reverse segmenter is an in-context segmenter: given a *support set* of images with
binary masks, it segments *query* images. SPE calls it with the model's predictions as
the support and the labelled references as the queries.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ReverseSegmenter",
    "CallableSegmenter",
    "check_inputs",
    "register_segmenter",
    "available_segmenters",
    "make_segmenter",
    "segmenter_from_text",
    "downloads_allowed",
]

_TRUE = {"1", "true", "yes", "on"}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def downloads_allowed() -> bool:
    """Whether a segmenter may download weights it was not told to download (``download=None``).

    Only when the user opted in with ``SPE_DOWNLOAD=1``; ``SPE_NO_DOWNLOAD=1`` always forbids it.
    Nothing downloads implicitly: not ``segmenter="auto"``, not ``"universeg"``, not an estimator file.
    """
    return _env_true("SPE_DOWNLOAD") and not _env_true("SPE_NO_DOWNLOAD")


def check_inputs(query: Tensor, support_images: Tensor, support_labels: Tensor) -> None:
    """Raise a clear error unless query, support images and labels are ``[N,1,H,W]`` tensors that fit together."""
    for name, t in (("query_images", query), ("support_images", support_images), ("support_labels", support_labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim != 4 or t.shape[1] != 1:
            raise ValueError(
                f"{name} must have shape [N,1,H,W]; got {tuple(t.shape)}. Add a channel axis with x[:, None]."
            )
    if support_images.shape != support_labels.shape:
        raise ValueError(
            f"support_images {tuple(support_images.shape)} and support_labels {tuple(support_labels.shape)} must match."
        )
    if support_images.shape[0] == 0:
        raise ValueError("The support set is empty: a reverse segmenter needs at least one image with a mask.")
    if query.shape[-2:] != support_images.shape[-2:]:
        raise ValueError(
            f"Query size {tuple(query.shape[-2:])} differs from support size {tuple(support_images.shape[-2:])}; "
            "resize both to one working size first."
        )


class ReverseSegmenter(ABC):
    """Base class: ``segmenter(query_images, support_images, support_labels) -> probabilities``.

    Shapes ``[Q,1,H,W]``, ``[S,1,H,W]``, ``[S,1,H,W]``; images float in [0, 1], labels binary.
    Returns foreground probabilities ``[Q,1,H,W]`` on the inputs' device. One support set is
    shared by all queries: :meth:`prepare` runs once per support set (e.g. to train a model on
    it) and :meth:`predict` runs on chunks of at most ``chunk_size`` queries, which bounds
    peak memory. Subclasses implement :meth:`prepare` and :meth:`predict`.

    Args:
        chunk_size: queries segmented per step; lower it to lower peak memory.
    """

    #: short name used in reports and by :func:`make_segmenter`
    name: str = "custom"
    #: True when the segmenter must be fitted on the labelled references (:meth:`fit`) before use
    needs_fit: bool = False
    #: True when the segmenter implements ``score(query_images, query_labels, support_images,
    #: support_labels) -> Tensor[Q]``: the pseudo Dice per query, computed per support (no fused map);
    #: SPE then uses it for the pseudo metrics instead of thresholding ``__call__``'s probabilities
    supports_scoring: bool = False
    #: the metrics such a segmenter scores per support pair through ``score_metrics(query_images,
    #: query_labels, support_images, support_labels, metrics) -> {metric: Tensor[Q]}`` (beyond Dice)
    scored_metrics: tuple[str, ...] = ("dice",)
    #: the registered segmenter that scores single cases (:mod:`spe_lightning.percase.rca`) in this one's
    #: place; None: this one (a segmenter good at sets can be poor with a one-image support)
    case_segmenter: str | None = None
    #: how many of a set's images SPE gives this segmenter as supports when ``support_size`` is None
    #: (the paper's 64: UniverSeg's cost and memory grow with the supports, label fusion's too)
    default_support_size: int = 64

    def __init__(self, chunk_size: int = 32) -> None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.chunk_size = chunk_size

    def fit(self, images: Tensor, labels: Tensor) -> None:
        """Learn from labelled references ``[N,1,H,W]`` (images in [0, 1], binary labels).

        SPE calls it once, with its reference set, before the first evaluation (benchmark harnesses
        call it with their query set). The default does nothing: weight-free segmenters need no fit.
        """
        return None

    @property
    def is_fitted(self) -> bool:
        """Whether the segmenter is ready to segment (always True unless ``needs_fit``)."""
        return not self.needs_fit

    def state_tensors(self) -> dict[str, Tensor]:
        """Fitted weights as plain tensors (loadable with ``torch.load(weights_only=True)``); default empty."""
        return {}

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (default: nothing to restore)."""
        return None

    def prepare(self, support_images: Tensor, support_labels: Tensor) -> Any:
        """Pre-compute whatever depends on the support set only (default: keep it as is)."""
        return support_images, support_labels

    @abstractmethod
    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        """Foreground probabilities ``[q,1,H,W]`` for one chunk of queries."""

    def spec(self) -> dict[str, Any]:
        """A JSON-safe description (name and settings) for reports and saved estimators."""
        return {"name": self.name, "chunk_size": self.chunk_size}

    def fit_spec(self) -> dict[str, Any]:
        """The settings that :meth:`fit`'s result depends on (keys of fitted weights; default: all of them)."""
        return self.spec()

    @torch.no_grad()
    def __call__(self, query_images: Tensor, support_images: Tensor, support_labels: Tensor) -> Tensor:
        check_inputs(query_images, support_images, support_labels)
        device = query_images.device
        support_images = support_images.to(device=device, dtype=torch.float32)
        support_labels = (support_labels.to(device) > 0.5).float()
        prepared = self.prepare(support_images, support_labels)
        out = [
            self.predict(query_images[i : i + self.chunk_size].float(), prepared).float().clamp(0.0, 1.0)
            for i in range(0, query_images.shape[0], self.chunk_size)
        ]
        if not out:
            return query_images.new_zeros(query_images.shape, dtype=torch.float32)
        probs = torch.cat(out).to(device)
        if probs.shape != query_images.shape:
            raise RuntimeError(
                f"{type(self).__name__} returned shape {tuple(probs.shape)} for queries {tuple(query_images.shape)}."
            )
        return probs

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({args})"


class CallableSegmenter(ReverseSegmenter):
    """Wraps a plain function ``fn(query, support_images, support_labels) -> probabilities``.

    The easiest way to plug in your own in-context segmenter: chunking, validation and
    ``no_grad`` come from the base class.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor, Tensor], Tensor], name: str = "custom", chunk_size: int = 32):
        super().__init__(chunk_size)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.name = name

    def predict(self, query_images: Tensor, prepared: Any) -> Tensor:
        support_images, support_labels = prepared
        return self.fn(query_images, support_images, support_labels)


_REGISTRY: dict[str, Callable[..., ReverseSegmenter]] = {}


def register_segmenter(name: str) -> Callable[[Callable[..., ReverseSegmenter]], Callable[..., ReverseSegmenter]]:
    """Decorator: make a segmenter class or factory available to :func:`make_segmenter` by ``name``."""

    def deco(factory: Callable[..., ReverseSegmenter]) -> Callable[..., ReverseSegmenter]:
        if name in _REGISTRY or name == "auto":
            raise ValueError(f"A segmenter named {name!r} is already registered.")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_segmenters() -> list[str]:
    """Names accepted by :func:`make_segmenter` (besides ``"auto"``)."""
    return sorted(_REGISTRY)


#: the segmenter "auto" falls back to without UniverSeg weights: the learned label propagation, fitted on
#: the references at set-up (~50 s on 2 CPU cores). It beats label fusion in benchmarks/reverse_sensitivity.py
#: and in the shift benchmarks (BENCHMARKS.md, docs/benchmarks_history.md); ``segmenter="label_fusion"`` needs no fit.
DEFAULT_WEIGHT_FREE = "learned_propagation"


def make_segmenter(name: str = "auto", **kwargs: Any) -> ReverseSegmenter:
    """Build a segmenter by name.

    ``"auto"`` returns UniverSeg when its official weights load without a download, else the default
    weight-free segmenter; use :func:`resolve_auto` to also learn why.
    """
    if name == "auto":
        return resolve_auto(**kwargs)[0]
    if name not in _REGISTRY:
        raise ValueError(f"Unknown segmenter {name!r}; choose 'auto' or one of {available_segmenters()}.")
    return _REGISTRY[name](**kwargs)


def segmenter_from_text(text: str) -> ReverseSegmenter:
    """``"name"`` or ``"name:key=value,key=value"`` (values parsed as bool (true/false), int, float or str), e.g.
    ``"label_fusion:normalise=rank,k=4"``: the command-line form of :func:`make_segmenter`."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Bad segmenter option {item!r} in {text!r}; write name:key=value,key=value.")
        value: Any = {"true": True, "false": False}.get(val.strip().lower(), val)
        for cast in (int, float) if isinstance(value, str) else ():
            try:
                value = cast(val)
                break
            except ValueError:
                continue
        kwargs[key.strip()] = value
    return make_segmenter(name, **kwargs)


def resolve_auto(**kwargs: Any) -> tuple[ReverseSegmenter, str]:
    """``(segmenter, reason)`` for ``"auto"``: UniverSeg if its weights load, else the weight-free default.

    "auto" never downloads on its own (see :func:`downloads_allowed`). Asking for UniverSeg
    explicitly, with ``weights=`` or ``SPE_UNIVERSEG_WEIGHTS``, is not "auto": when that file is
    missing or not UniverSeg's weights, the error (naming the path) is raised, not swallowed.
    """
    explicit = kwargs.get("weights") is not None or bool(os.environ.get("SPE_UNIVERSEG_WEIGHTS", "").strip())
    try:
        # building the network draws its initial weights from the global RNG before the file is read: keep the
        # caller's random stream (a user's training) as it was, whether or not the weights are found
        with torch.random.fork_rng(devices=[]):
            seg = _REGISTRY["universeg"](**kwargs)
        return seg, "UniverSeg's official weights were found."
    except (FileNotFoundError, RuntimeError, OSError):
        if explicit:
            raise
        reason = (
            f"UniverSeg's weights were not found (set SPE_UNIVERSEG_WEIGHTS=PATH, or SPE_DOWNLOAD=1 to download "
            f"them), so the '{DEFAULT_WEIGHT_FREE}' reverse segmenter (no download; it learns from the references) "
            "is used."
        )
        return _REGISTRY[DEFAULT_WEIGHT_FREE](), reason
