"""Target-styled calibration pairs: the labelled calibration set restyled with a target's appearance.

For each target SPE builds, from the target's *unlabelled* images only, a copy of the calibration set that
looks like the target, and measures the model on it at the final weights (its real metrics are known from the
calibration masks). Each calibration image is, in its own ``[0, 1]`` range (min-max, as
:mod:`~spe_lightning.engine.shifts`):

1. given the low-frequency band of the Fourier amplitude of a random target image, its phase kept
   (FDA: Yang & Soatto, "FDA: Fourier Domain Adaptation for Semantic Segmentation", CVPR 2020): the target's
   illumination, contrast layout and large-scale texture, the calibration image's structures;
2. histogram matched to the same target image (quantile mapping): the target's intensity distribution;
3. blurred and given noise to the levels estimated on the target: noise sigma from the median absolute
   deviation of a high-pass residual (:func:`estimate_noise_sigma`), blur the Gaussian sigma whose
   re-blur gradient-energy ratio (:func:`reblur_ratio`) matches the target's (:func:`estimate_blur`);
4. mapped to that target image's intensity range.

:class:`Styling` names which of these steps run (``SPEConfig.styling``): ``"v1"`` is the recipe above (the
default); other recipes were measured on development data (``benchmarks/styling_dev.py``,
docs/other_sites.md). Masks are unchanged. The pair ``(pseudo difference, real difference)`` of the styled set carries
``"target": <name>``: it joins only that target's move/interval model
(:func:`~spe_lightning.engine.calibration_pairs.pairs_for_target`), and its real score is the *styled
calibration score* baseline. Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spe_lightning.engine.cached_set import CachedSet
from spe_lightning.engine.shifts import gray_rows

__all__ = [
    "BLUR_GRID",
    "FDA_BETA",
    "HISTOGRAM_MODES",
    "STYLED_PREFIX",
    "STYLINGS",
    "Styling",
    "estimate_blur",
    "estimate_noise_sigma",
    "fda_swap",
    "gaussian_blur",
    "histogram_match",
    "pooled_histogram",
    "reblur_ratio",
    "resolve_styling",
    "style_image",
    "styled_name",
    "styled_set",
    "target_style",
]

#: FDA's low-frequency band: half-side of the swapped square as a fraction of the image side (the paper used
#: 0.01-0.09 at 1024 px; at SPE's ~128 px 0.05 keeps a band of a few frequencies). Fixed a priori, not tuned.
FDA_BETA = 0.05
#: the blur sigmas (pixels) tried when matching a target's sharpness
BLUR_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
#: the name of a target's styled calibration set is this prefix + the target's name
STYLED_PREFIX = "styled_"
#: target images the noise and blur levels are estimated on (the median over them)
_N_ESTIMATE = 16
#: target images pooled into the target histogram of ``Styling(histogram="pooled")``
_N_POOL = 64
#: how a calibration image's histogram is matched: not at all, to its random target image, to the pooled target
HISTOGRAM_MODES = ("off", "image", "pooled")


@dataclass(frozen=True)
class Styling:
    """Which restyling steps run.

    Args:
        beta: FDA band (fraction of the image side; 0: no FDA swap).
        histogram: ``"off"``, ``"image"`` (matched to the calibration image's random target image) or
            ``"pooled"`` (matched to the pooled histogram of up to 64 target images).
        noise_blur: add the target's estimated blur and noise.
        references: styled copies of each calibration image, each from its own random target image.
    """

    beta: float = FDA_BETA
    histogram: str = "image"
    noise_blur: bool = True
    references: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"Styling beta must be in [0, 0.5) (0: no FDA swap), got {self.beta!r}.")
        if self.histogram not in HISTOGRAM_MODES:
            raise ValueError(f"Styling histogram must be one of {HISTOGRAM_MODES}, got {self.histogram!r}.")
        if isinstance(self.references, bool) or not isinstance(self.references, int) or self.references < 1:
            raise ValueError(f"Styling references must be a positive int, got {self.references!r}.")

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain values (for the style record)."""
        return asdict(self)


#: the named recipes of ``SPEConfig.styling``: ``"v1"`` is the recipe fixed beforehand (the default);
#: ``"histogram_noise_blur"`` drops the FDA swap, the recipe chosen on development data (benchmarks/styling_dev.py,
#: test-split halves: the styled score's Dice MAE to the real target score 0.068 pooled over JSRT lungs, JSRT heart
#: and BUSI against v1's 0.116; v1 stays better on BUSI alone, 0.079 against 0.094)
STYLINGS: dict[str, Styling] = {
    "v1": Styling(),
    "histogram_noise_blur": Styling(beta=0.0, histogram="image", noise_blur=True, references=1),
}


def resolve_styling(styling: str | Styling) -> tuple[str, Styling]:
    """``(name, recipe)`` of a recipe name from :data:`STYLINGS` or a :class:`Styling` (named ``"custom"``
    unless it equals a named one)."""
    if isinstance(styling, Styling):
        names = [n for n, s in STYLINGS.items() if s == styling]
        return (names[0] if names else "custom"), styling
    if styling not in STYLINGS:
        raise ValueError(f"Unknown styling {styling!r}; choose from {sorted(STYLINGS)} or pass a Styling.")
    return styling, STYLINGS[styling]


def styled_name(target: str) -> str:
    """The styled calibration set's (and its pair's) name for ``target``: ``styled_<target>``."""
    return STYLED_PREFIX + target


def _unit(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` scaled to [0, 1] over all its values, with the offset and span that map it back."""
    x = x.float()
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-8)
    return (x - lo) / span, lo, span


def _gray2d(x: Tensor) -> Tensor:
    """``[H,W]`` (mean over channels; the middle slice of a volume) of an item image ``[C,H,W]``/``[C,D,H,W]``."""
    x = x.float().mean(0)
    return x[x.shape[0] // 2] if x.ndim == 3 else x


def histogram_match(source: Tensor, reference: Tensor) -> Tensor:
    """``source`` with the intensity distribution of ``reference`` (quantile mapping; any shapes): each value
    goes to the reference quantile of its rank in ``source``. Ties keep their order (stable ranks)."""
    s = source.float().reshape(-1)
    ref = torch.sort(reference.float().reshape(-1)).values
    if s.numel() == 0 or ref.numel() == 0:
        return source.float().clone()
    order = torch.argsort(s, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(s.numel())
    q = (ranks.double() + 0.5) / s.numel()  # quantile of each source value
    pos = (q * ref.numel() - 0.5).clamp(0, ref.numel() - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(ref.numel() - 1)
    w = (pos - lo.double()).float()
    out = ref[lo] * (1 - w) + ref[hi] * w
    return out.reshape(source.shape)


def pooled_histogram(images: Sequence[Tensor], n_quantiles: int = 4096) -> Tensor:
    """The pooled intensity distribution of ``images`` (each ``[H,W]``, scaled to its own [0, 1] range; each
    weighs by its pixel count) as ``n_quantiles`` sorted quantiles: the reference of :func:`histogram_match`
    for a whole set (quantiles keep each match cheap)."""
    if not images:
        raise ValueError("pooled_histogram needs at least one image.")
    values = torch.sort(torch.cat([_unit(x)[0].reshape(-1) for x in images])).values
    pos = ((torch.arange(n_quantiles, dtype=torch.float64) + 0.5) / n_quantiles * values.numel()).long()
    return values[pos.clamp_max(values.numel() - 1)]


def fda_swap(source: Tensor, target: Tensor, beta: float = FDA_BETA) -> Tensor:
    """``source`` ``[...,H,W]`` with the low-frequency band of its Fourier amplitude replaced by ``target``'s
    (``[H',W']``, resized to ``H,W`` first), its phase kept (FDA, Yang & Soatto 2020). The band is the
    centred square of half-side ``max(1, floor(beta * min(H, W)))`` frequencies (the mean included)."""
    if not 0 < beta < 0.5:
        raise ValueError(f"beta must be in (0, 0.5), got {beta!r}.")
    h, w = source.shape[-2:]
    t = target.float()
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t.reshape(1, 1, *t.shape[-2:]), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    fs = torch.fft.fftshift(torch.fft.fft2(source.float()), dim=(-2, -1))
    ft = torch.fft.fftshift(torch.fft.fft2(t), dim=(-2, -1))
    amp, phase = fs.abs(), fs.angle()
    b = max(1, int(math.floor(beta * min(h, w))))
    ch, cw = h // 2, w // 2
    amp[..., ch - b : ch + b + 1, cw - b : cw + b + 1] = ft.abs()[ch - b : ch + b + 1, cw - b : cw + b + 1]
    out = torch.fft.ifft2(torch.fft.ifftshift(torch.polar(amp, phase), dim=(-2, -1)))
    return out.real.float()


_HIGH_PASS = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def estimate_noise_sigma(image: Tensor) -> float:
    """Standard deviation of additive white noise in ``image`` (``[H,W]``, or ``[...,H,W]`` pooled), from the
    median absolute value of a second-difference high-pass residual (Immerkaer's kernel, which cancels linear
    intensity ramps; the median ignores the edges): ``median|r| / 0.6745 / ||kernel||``."""
    x = image.float().reshape(-1, 1, *image.shape[-2:])
    r = F.conv2d(x, _HIGH_PASS.reshape(1, 1, 3, 3))
    if r.numel() == 0:
        return 0.0
    return float(r.abs().median()) / 0.6745 / float(_HIGH_PASS.norm())


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """``x`` ``[...,H,W]`` blurred by a Gaussian of ``sigma`` pixels (reflect padding); ``sigma <= 0``: unchanged."""
    if sigma <= 0:
        return x.float()
    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    k = k / k.sum()
    shape = x.shape
    y = x.float().reshape(-1, 1, *shape[-2:])
    pad_h, pad_w = min(r, shape[-2] - 1), min(r, shape[-1] - 1)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect" if pad_w > 0 else "replicate")
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect" if pad_h > 0 else "replicate")
    y = F.conv2d(y, k[r - pad_w : r + pad_w + 1].reshape(1, 1, 1, -1))
    y = F.conv2d(y, k[r - pad_h : r + pad_h + 1].reshape(1, 1, -1, 1))
    return y.reshape(shape)


def _grad_energy(x: Tensor) -> Tensor:
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return (dx**2).mean() + (dy**2).mean()


def reblur_ratio(image: Tensor, sigma: float = 1.0) -> float:
    """Gradient energy left after a Gaussian blur of ``sigma``: ``E|grad(G * x)|^2 / E|grad x|^2``, near 1 for
    an image that is already blurred, lower the sharper it is (independent of its contrast)."""
    x = image.float()
    e = float(_grad_energy(x))
    return float(_grad_energy(gaussian_blur(x, sigma))) / e if e > 1e-12 else 1.0


def estimate_blur(
    target_ratio: float, source: Sequence[Tensor], noise: float = 0.0, grid: Sequence[float] = BLUR_GRID, seed: int = 0
) -> float:
    """The blur sigma from ``grid`` that, applied to the ``source`` images (``[H,W]`` in [0, 1]) before noise of
    std ``noise``, brings their median :func:`reblur_ratio` closest to ``target_ratio`` (ties: the smaller)."""
    best, best_err = 0.0, math.inf
    for sigma in sorted(grid):
        g = torch.Generator().manual_seed(seed)
        ratios = []
        for x in source:
            y = gaussian_blur(x, sigma)
            if noise > 0:
                y = y + noise * torch.randn(y.shape, generator=g)
            ratios.append(reblur_ratio(y))
        err = abs(float(torch.tensor(ratios).median()) - target_ratio)
        if err < best_err - 1e-9:
            best, best_err = float(sigma), err
    return best


def target_style(calibration: CachedSet, target: CachedSet, seed: int = 0) -> dict[str, float]:
    """The target's noise and blur levels, estimated on (at most 16 of) its unlabelled images, and the noise
    and blur to add to the calibration images to reach them: ``{"noise_target", "noise_calibration",
    "noise_added", "blur_ratio_target", "blur_added"}`` (plain floats; images in their own [0, 1] range)."""
    g = torch.Generator().manual_seed(seed)

    def pick(data: CachedSet) -> list[Tensor]:
        n = len(data)
        pos = torch.randperm(n, generator=g)[: min(n, _N_ESTIMATE)].tolist()
        return [_unit(_gray2d(data.inputs[i]))[0] for i in pos]

    tgt, cal = pick(target), pick(calibration)
    if not tgt or not cal:
        raise ValueError("target_style: the calibration set and the target need at least one image each.")
    noise_t = float(torch.tensor([estimate_noise_sigma(x) for x in tgt]).median())
    noise_c = float(torch.tensor([estimate_noise_sigma(x) for x in cal]).median())
    added = math.sqrt(max(noise_t**2 - noise_c**2, 0.0))
    ratio_t = float(torch.tensor([reblur_ratio(x) for x in tgt]).median())
    # histogram matching and FDA barely change sharpness; blur is matched with the noise that will be added
    blur = estimate_blur(ratio_t, cal, noise=added, seed=seed)
    return {
        "noise_target": noise_t,
        "noise_calibration": noise_c,
        "noise_added": added,
        "blur_ratio_target": ratio_t,
        "blur_added": blur,
    }


def style_image(
    image: Tensor,
    reference: Tensor,
    noise: float,
    blur: float,
    generator: torch.Generator,
    beta: float = FDA_BETA,
    histogram: str | Tensor = "image",
) -> Tensor:
    """``image`` (``[C,H,W]`` or ``[C,D,H,W]``, any range) in the style of ``reference`` (an item image of the
    target): FDA low-frequency amplitude (``beta`` 0: none), histogram, then ``blur`` and ``noise`` (in [0, 1]
    units), and the reference's intensity range. ``histogram``: ``"image"`` (the reference's), ``"off"``, or
    the values to match (e.g. :func:`pooled_histogram`). Same shape and dtype as ``image``."""
    x, _, _ = _unit(image)
    ref_unit, ref_lo, ref_span = _unit(_gray2d(reference))
    y = fda_swap(x, ref_unit, beta) if beta > 0 else x
    if isinstance(histogram, Tensor):
        y = histogram_match(y, histogram)
    elif histogram == "image":
        y = histogram_match(y, ref_unit)
    elif histogram != "off":
        raise ValueError(f"histogram must be 'image', 'off' or a tensor of values, got {histogram!r}.")
    y = gaussian_blur(y, blur)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=generator)
    y = y.clamp(0.0, 1.0) * ref_span + ref_lo
    return (
        y.to(image.dtype)
        if image.is_floating_point()
        else y.round().clamp(float(torch.iinfo(image.dtype).min), float(torch.iinfo(image.dtype).max)).to(image.dtype)
    )


def styled_set(
    calibration: CachedSet,
    target: CachedSet,
    seed: int = 0,
    beta: float | None = None,
    styling: str | Styling = "v1",
    style: dict[str, float] | None = None,
) -> tuple[CachedSet, dict[str, Any]]:
    """The calibration set restyled as ``target`` (masks unchanged) and the style that was applied.

    With the default ``"v1"`` recipe each calibration image takes the FDA amplitude and histogram of a random
    target image (seeded), and the noise and blur of :func:`target_style`; ``styling`` picks another recipe
    (:data:`STYLINGS` or a :class:`Styling`), ``beta`` overrides its FDA band. With ``references = k`` the set
    holds ``k`` styled copies of each calibration image (copy-major). ``style``: the target's noise and blur
    levels when already estimated (:func:`target_style` of the same sets and seed). The set is called
    ``styled_<target name>``.
    """
    if len(target) == 0:
        raise ValueError(f"styled_set: target {target.name!r} has no images.")
    name, recipe = resolve_styling(styling)
    beta = recipe.beta if beta is None else float(beta)
    if beta != recipe.beta:
        name, recipe = "custom", Styling(beta, recipe.histogram, recipe.noise_blur, recipe.references)
    style = target_style(calibration, target, seed) if style is None else dict(style)
    noise, blur = (style["noise_added"], style["blur_added"]) if recipe.noise_blur else (0.0, 0.0)
    g = torch.Generator().manual_seed(seed + 1)
    n, k = len(calibration), recipe.references
    refs = torch.randint(len(target), (n * k,), generator=g).tolist()
    hist: str | Tensor = recipe.histogram
    if recipe.histogram == "pooled":  # drawn after the references, so "image" and "off" keep v1's draws
        pool = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed + 2))[:_N_POOL].tolist()
        hist = pooled_histogram([_gray2d(target.inputs[j]) for j in sorted(pool)])
    inputs = [
        style_image(calibration.inputs[i % n], target.inputs[j], noise, blur, g, beta, hist) for i, j in enumerate(refs)
    ]
    h, w = calibration.gray.shape[-2:]
    units = [(p + c * n, z) for c in range(k) for p, z in calibration.units]
    gray = gray_rows(inputs, units, (int(h), int(w)))
    masks = calibration.masks if calibration.masks is None or k == 1 else list(calibration.masks) * k
    styled = CachedSet(styled_name(target.name), inputs, masks, gray, list(calibration.indices) * k, units)
    record = {**style, "beta": beta, "styling": name, "recipe": recipe.to_dict(), "target_images": refs}
    return styled, record
