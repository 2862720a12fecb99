"""Per-case quality regression: a small CNN that reads an image and a candidate mask and predicts the mask's Dice.

After Robinson et al., "Real-time prediction of segmentation quality", MICCAI 2018, which regresses
Dice from image + segmentation with a CNN trained on labelled pairs. SPE holds such pairs for free:
its labelled references. :meth:`QualityRegressor.fit` damages their true masks in the ways models err
(:mod:`spe_lightning.percase.mask_errors`: erosion, dilation, shifts, holes, spurious blobs, missed parts,
boundary noise, another case's mask, empty), optionally adds real imperfect masks of the same images
(``extra_candidates``, e.g. an early checkpoint's predictions) and fits the network to the exact Dice of
each candidate. Images get random appearance changes (gamma, contrast, brightness, noise, blur), so the
network judges how the mask fits the image, not the image style.

The raw prediction is then calibrated on a labelled calibration set (:func:`calibrate_quality`): an
isotonic (or linear) map raw -> real per-case Dice, an interval from its leave-one-out residuals
(split-conformal half-width at ``level``), and a flag threshold for real Dice < ``dice_cut``.
:func:`quality_estimates` applies it to new cases.

Everything is plain PyTorch; :meth:`QualityRegressor.state_tensors` holds tensors and JSON-safe
settings only (``torch.load(..., weights_only=True)`` reads it back).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spe_lightning.data.adapters import resize_images
from spe_lightning.engine.mapping import MetricMapping
from spe_lightning.engine.metrics import per_image_metrics
from spe_lightning.percase.mask_errors import ERROR_KINDS, make_candidates

__all__ = [
    "QualitySettings",
    "QualityRegressor",
    "synthetic_pairs",
    "calibrate_quality",
    "quality_estimates",
    "choose_combination",
    "combination_from_pairs",
    "combined_value",
]


@dataclass
class QualitySettings:
    """Settings of a :class:`QualityRegressor` (JSON-safe).

    Args:
        size: side the image and mask are resized to before the network (area averaging).
        widths: channels of the four conv levels.
        per_case: synthetic candidates per reference.
        epochs: passes over the candidate pool.
        batch_size: candidates per step.
        lr: AdamW learning rate (cosine decay).
        weight_decay: AdamW weight decay.
        augment: random appearance changes and flips during training.
        tta: average the prediction over the left-right flip.
        kinds: error kinds of the synthetic candidates.
        extra_repeat: times each extra (real) candidate enters the pool per epoch.
        n_models: networks fitted (seeds ``seed``, ``seed + 1``, ...) on the same candidates; predictions averaged.
    """

    size: int = 64
    widths: tuple[int, ...] = (8, 16, 32, 64)
    per_case: int = 16
    epochs: int = 10
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    augment: bool = True
    tta: bool = True
    kinds: tuple[str, ...] = ERROR_KINDS
    extra_repeat: int = 1
    n_models: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualitySettings:
        """Settings from :meth:`to_dict` (unknown keys rejected)."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QualitySettings keys {sorted(unknown)}.")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kwargs)


class _Net(nn.Module):
    """[z-scored image, mask] -> Dice logit: four conv/BN/ReLU/max-pool levels, global avg+max pooling, MLP."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 2
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(2 * c + 1, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))

    def forward(self, x: Tensor) -> Tensor:
        f = self.features(x)
        area = x[:, 1].flatten(1).mean(1, keepdim=True).clamp_min(1e-6).log()  # log mask area: empty vs tiny
        return self.head(torch.cat([f.mean((2, 3)), f.amax((2, 3)), area], 1))[:, 0]


def _zscore(img: Tensor) -> Tensor:
    m = img.mean((1, 2, 3), keepdim=True)
    return (img - m) / img.std((1, 2, 3), keepdim=True).clamp_min(1e-3)


def _appearance(img: Tensor, g: torch.Generator) -> Tensor:
    """Random gamma, contrast, brightness, blur and noise of ``[B,1,S,S]`` images in [0, 1]."""
    b = img.shape[0]

    def u(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=g)

    x = img.clamp(0, 1) ** torch.exp(u(-0.7, 0.7))
    x = (x - 0.5) * u(0.5, 1.5) + 0.5 + u(-0.2, 0.2)
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.3
    x = torch.where(blur, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    x = x + u(0.0, 0.1) * torch.randn(x.shape, generator=g)
    return x


class QualityRegressor:
    """Image + candidate mask -> estimated Dice of the candidate (see the module docstring).

    Args:
        settings: :class:`QualitySettings` (defaults when None).
        device: where the network is fitted and run.
    """

    def __init__(self, settings: QualitySettings | None = None, device: torch.device | str = "cpu") -> None:
        self.settings = settings or QualitySettings()
        self.device = torch.device(device)
        self.nets = [_Net(self.settings.widths).to(self.device) for _ in range(max(1, self.settings.n_models))]
        self.fitted = False
        self.history: dict[str, Any] = {}

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Tensor,
        labels: Tensor,
        extra_candidates: Sequence[Tensor] | None = None,
        seed: int = 0,
        progress: Callable[[int, float], Any] | None = None,
    ) -> QualityRegressor:
        """Fit on references: ``images`` ``[N,1,H,W]`` in [0, 1], true ``labels`` ``[N,1,H,W]`` (bool or 0/1).

        ``extra_candidates``: more imperfect masks of the same images, each ``[N,1,H,W]`` aligned with
        ``images`` (e.g. an early checkpoint's predictions). ``progress(epoch, loss)`` after each epoch.
        Deterministic for ``seed`` (on one device and thread count).
        """
        s = self.settings
        if images.ndim != 4 or images.shape[1] != 1 or labels.shape != images.shape:
            raise ValueError(
                f"images and labels must both be [N,1,H,W]; got {tuple(images.shape)}, {tuple(labels.shape)}."
            )
        start = time.perf_counter()
        images, labels = images.detach().cpu(), labels.detach().cpu()  # candidates and augmentation on the CPU
        truth = labels > 0.5 if labels.is_floating_point() else labels.bool()
        cand, src, dice = make_candidates(truth, s.per_case, images, seed, tuple(s.kinds))
        parts_m, parts_s, parts_d = [resize_images(cand.float(), s.size, "area").half()], [src], [dice]
        for extra in extra_candidates or ():
            if extra.shape != labels.shape:
                raise ValueError(f"extra candidates must be {tuple(labels.shape)}; got {tuple(extra.shape)}.")
            extra = extra.detach().cpu()
            e = extra > 0.5 if extra.is_floating_point() else extra.bool()
            r = max(1, int(s.extra_repeat))
            parts_m.append(resize_images(e.float(), s.size, "area").half().repeat(r, 1, 1, 1))
            parts_s.append(torch.arange(len(e)).repeat(r))
            parts_d.append(per_image_metrics(e, truth, ("dice",))["dice"].float().repeat(r))
        pool_m, pool_s, pool_d = torch.cat(parts_m), torch.cat(parts_s), torch.cat(parts_d)
        imgs = resize_images(images.float(), s.size, "area").clamp(0, 1)
        m = len(pool_d)
        losses: list[float] = []
        self.nets = []
        for k in range(max(1, s.n_models)):
            net, member_losses = self._fit_one(imgs, pool_m, pool_s, pool_d, seed + k, progress)
            self.nets.append(net)
            losses = member_losses if k == 0 else [(a * k + b) / (k + 1) for a, b in zip(losses, member_losses)]
        self.fitted = True
        self.history = {
            "n_references": int(len(images)),
            "n_candidates": int(m),
            "train_mse": [float(v) for v in losses],
            "candidate_dice_mean": float(pool_d.mean()),
            "seconds": time.perf_counter() - start,
        }
        return self

    def _fit_one(
        self,
        imgs: Tensor,
        pool_m: Tensor,
        pool_s: Tensor,
        pool_d: Tensor,
        seed: int,
        progress: Callable[[int, float], Any] | None,
    ) -> tuple[_Net, list[float]]:
        """One network fitted on the candidate pool (images ``imgs[pool_s]``, masks ``pool_m``, Dice ``pool_d``)."""
        s = self.settings
        m = len(pool_d)
        steps_per_epoch = max(1, math.ceil(m / s.batch_size))
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            net = _Net(s.widths).to(self.device)
        opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        total = steps_per_epoch * s.epochs
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=total, pct_start=0.15)
        net.train()
        losses = []
        for epoch in range(s.epochs):
            order = torch.randperm(m, generator=g)
            run = 0.0
            for k in range(steps_per_epoch):
                idx = order[k * s.batch_size : (k + 1) * s.batch_size]
                if len(idx) < 2:
                    continue
                x_img, x_mask = imgs[pool_s[idx]], pool_m[idx].float()
                if s.augment:
                    x_img = _appearance(x_img, g)
                    flip = torch.rand(len(idx), generator=g) < 0.5
                    x_img = torch.where(flip[:, None, None, None], x_img.flip(-1), x_img)
                    x_mask = torch.where(flip[:, None, None, None], x_mask.flip(-1), x_mask)
                x = torch.cat([_zscore(x_img), x_mask], 1).to(self.device)
                loss = F.mse_loss(torch.sigmoid(net(x)), pool_d[idx].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                run += float(loss.detach()) * len(idx)
            losses.append(run / m)
            if progress is not None:
                progress(epoch + 1, losses[-1])
        return net.eval(), losses

    # ------------------------------------------------------------------ predicting
    @torch.no_grad()
    def predict(self, images: Tensor, masks: Tensor, batch_size: int = 256) -> Tensor:
        """Estimated Dice ``float32 [N]`` of each mask ``[N,1,H,W]`` on its image ``[N,1,H,W]`` in [0, 1]."""
        if images.shape[0] != masks.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {masks.shape[0]} masks.")
        s = self.settings
        out = []
        for i in range(0, images.shape[0], batch_size):
            img = _zscore(resize_images(images[i : i + batch_size].float(), s.size, "area").clamp(0, 1))
            m = masks[i : i + batch_size]
            m = resize_images((m > 0.5 if m.is_floating_point() else m.bool()).float(), s.size, "area")
            x = torch.cat([img, m], 1).to(self.device)
            views = [x, x.flip(-1)] if s.tta else [x]
            p = torch.stack([torch.sigmoid(net.eval()(v)) for net in self.nets for v in views]).mean(0)
            out.append(p.float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    # ------------------------------------------------------------------ saving
    def state_tensors(self) -> dict[str, Any]:
        """``{"settings": JSON-safe dict, "weights": [{name: tensor}, ...] (one per network), "history": dict}``."""
        return {
            "settings": self.settings.to_dict(),
            "weights": [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for net in self.nets],
            "history": dict(self.history),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device | str = "cpu") -> QualityRegressor:
        """The regressor saved by :meth:`state_tensors`."""
        reg = cls(QualitySettings.from_dict(dict(state["settings"])), device)
        weights = state["weights"]
        if len(weights) != len(reg.nets):
            raise ValueError(f"{len(weights)} saved networks but the settings say {len(reg.nets)}.")
        for net, w in zip(reg.nets, weights):
            net.load_state_dict(w)
            net.eval()
        reg.fitted = True
        reg.history = dict(state.get("history", {}))
        return reg


# ---------------------------------------------------------------------- calibration
def synthetic_pairs(
    regressor: QualityRegressor, images: Tensor, labels: Tensor, per_case: int = 8, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Raw predictions and exact Dice of synthetic candidates on labelled images the regressor was not fitted on.

    Added to the calibration pairs when the model's own calibration predictions cover too narrow a Dice
    range (e.g. every calibration case above 0.9) for the map to extend to bad cases.
    """
    truth = labels > 0.5 if labels.is_floating_point() else labels.bool()
    cand, src, dice = make_candidates(truth, per_case, images, seed, tuple(regressor.settings.kinds))
    return regressor.predict(images[src], cand).double().numpy(), dice.double().numpy()


def _combine(x: np.ndarray, c: np.ndarray | None, weights: Sequence[float] | None) -> np.ndarray:
    if weights is None:
        return x
    if c is None:
        raise ValueError("this quality calibration combines the regressor with the model's confidence; pass it.")
    return float(weights[0]) * x + float(weights[1]) * c


def _conformal(abs_resid: np.ndarray, level: float) -> float:
    r = np.sort(abs_resid)
    return float(r[min(math.ceil((r.size + 1) * level), r.size) - 1])


def _bin_half_widths(
    est: np.ndarray, resid: np.ndarray, bins: Sequence[float], level: float, fallback: float, min_per_bin: int
) -> list[float]:
    edges = np.asarray(bins, dtype=float)
    k = np.clip(np.searchsorted(edges, est, side="right") - 1, 0, len(edges) - 2)
    return [
        _conformal(np.abs(resid[k == b]), level) if (k == b).sum() >= min_per_bin else float(fallback)
        for b in range(len(edges) - 1)
    ]


def calibrate_quality(
    predicted: Sequence[float] | np.ndarray | Tensor,
    real_dice: Sequence[float] | np.ndarray | Tensor,
    kind: str = "isotonic",
    level: float = 0.9,
    dice_cut: float = 0.7,
    confidence: Sequence[float] | np.ndarray | Tensor | None = None,
    extra_pairs: tuple[np.ndarray, ...] | None = None,
    bins: Sequence[float] = (0.0, 0.5, 0.7, 0.85, 1.0),
    min_per_bin: int = 10,
) -> dict[str, Any]:
    """Map raw regressor outputs to per-case Dice on a labelled calibration set (plain numbers, safe to save).

    ``mapping``: G score -> real Dice (``kind`` isotonic or linear, bounded to [0, 1]; :meth:`MetricMapping.to_dict`),
    where the score is the raw output, or, with the model's per-case ``confidence``, ``weights[0] * raw +
    weights[1] * confidence`` (least-squares weights). ``extra_pairs`` (raw, Dice) or (raw, Dice, confidence),
    e.g. :func:`synthetic_pairs` or the model's predictions on shifted copies of the calibration images,
    join the fit of the weights, the map and the per-bin widths (not the flag threshold nor the reported
    statistics). ``half_width``: the split-conformal half-width at ``level`` from the
    leave-one-out residuals of the real calibration cases; ``bin_half_widths``: the same per bin of the
    estimate (``bins`` edges; Mondrian conformal), from the leave-one-out residuals of every pair whose
    estimate falls in the bin (the global half-width for bins with fewer than ``min_per_bin``), so a case
    estimated bad gets the wider interval bad cases need; ``threshold``: cases whose *estimated* Dice is
    below it are flagged; it maximises Youden's J (TPR - FPR) for real Dice < ``dice_cut`` on the
    leave-one-out estimates (``dice_cut`` itself when either kind has fewer than 2 cases). Also the
    calibration ``spearman`` and ``auroc`` of the score.
    """
    from spe_lightning.percase.rca import auroc, spearman

    x = np.asarray(predicted, dtype=float).reshape(-1)
    y = np.asarray(real_dice, dtype=float).reshape(-1)
    c = None if confidence is None else np.asarray(confidence, dtype=float).reshape(-1)
    if x.shape != y.shape or (c is not None and c.shape != x.shape):
        raise ValueError(
            f"{x.size} predictions, {y.size} real Dice values" + ("" if c is None else f", {c.size} confidences.")
        )
    ok = np.isfinite(x) & np.isfinite(y) & (np.isfinite(c) if c is not None else True)
    x, y = x[ok], y[ok]
    c = None if c is None else c[ok]
    ex = ey = ec = np.zeros(0)
    if extra_pairs is not None:
        ex, ey = (np.asarray(v, dtype=float).reshape(-1) for v in extra_pairs[:2])
        ec = np.asarray(extra_pairs[2], dtype=float).reshape(-1) if len(extra_pairs) > 2 else np.zeros(0)
        if c is not None and ec.shape != ex.shape:
            raise ValueError("with confidence, extra_pairs must be (raw, Dice, confidence).")
        keep = np.isfinite(ex) & np.isfinite(ey) & (np.isfinite(ec) if c is not None else True)
        ex, ey, ec = ex[keep], ey[keep], (ec[keep] if c is not None else ec)
    weights = None
    if c is not None:
        xa, ca, ya = np.concatenate([x, ex]), np.concatenate([c, ec]), np.concatenate([y, ey])
        w = np.linalg.lstsq(np.stack([xa, ca, np.ones_like(xa)], 1), ya, rcond=None)[0]
        weights = [float(w[0]), float(w[1])] if w[0] > 0 and w[1] > 0 else ([1.0, 0.0] if w[0] > 0 else [0.0, 1.0])
    score = _combine(x, c, weights)
    n = score.size
    fit_x = np.concatenate([score, _combine(ex, ec if c is not None else None, weights)])
    fit_y = np.concatenate([y, ey])
    g = MetricMapping.fit(kind, fit_x, fit_y, bounds=(0.0, 1.0))
    all_resid = np.asarray(g.residuals)
    resid = all_resid[:n]  # leave-one-out residuals of the real calibration cases
    g.residuals = [float(r) for r in resid]
    widths = _bin_half_widths(fit_y - all_resid, all_resid, bins, level, g.half_width(level), min_per_bin)
    loo = y - resid
    bad = y < dice_cut
    threshold, method = float(dice_cut), "dice_cut"
    if bad.sum() >= 2 and (~bad).sum() >= 2:
        cand = np.unique(loo)
        cuts = np.concatenate([[cand[0] - 1e-9], (cand[:-1] + cand[1:]) / 2, [cand[-1] + 1e-9]])
        flag = loo[None, :] < cuts[:, None]
        j = flag[:, bad].mean(1) - flag[:, ~bad].mean(1)
        best = np.flatnonzero(j == j.max())
        threshold, method = float(cuts[best[len(best) // 2]]), "youden"
    return {
        "mapping": g.to_dict(),
        "weights": weights,
        "n_extra_pairs": 0 if extra_pairs is None else int(len(fit_x) - n),
        "level": float(level),
        "half_width": g.half_width(level),
        "bins": [float(b) for b in bins],
        "bin_half_widths": widths,
        "dice_cut": float(dice_cut),
        "threshold": threshold,
        "threshold_method": method,
        "n_cases": int(n),
        "n_below_cut": int(bad.sum()),
        "spearman": spearman(score, y),
        "auroc": auroc(-score, bad),
        "loo_mae": float(np.mean(np.abs(resid))) if n else None,
    }


def quality_estimates(
    calibration: dict[str, Any],
    predicted: Sequence[float] | np.ndarray | Tensor,
    confidence: Sequence[float] | np.ndarray | Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Per case from :func:`calibrate_quality`: ``score`` (what is ranked), ``estimate``, ``lower``, ``upper``
    (float64) and ``flagged`` (bool). ``confidence`` is needed when the calibration combined it."""
    x = np.asarray(predicted, dtype=float).reshape(-1)
    c = None if confidence is None else np.asarray(confidence, dtype=float).reshape(-1)
    score = _combine(x, c, calibration.get("weights"))
    g = MetricMapping.from_dict(calibration["mapping"])
    est = g.predict(score)
    q = np.full(est.shape, float(calibration["half_width"]))
    if calibration.get("bins"):
        edges = np.asarray(calibration["bins"], dtype=float)
        k = np.clip(np.searchsorted(edges, est, side="right") - 1, 0, len(edges) - 2)
        q = np.asarray(calibration["bin_half_widths"], dtype=float)[k]
    return {
        "score": score,
        "estimate": est,
        "lower": np.clip(est - q, 0.0, 1.0),
        "upper": np.clip(est + q, 0.0, 1.0),
        "flagged": est < float(calibration["threshold"]),
    }


def choose_combination(
    spe: Sequence[float] | np.ndarray,
    regressor: Sequence[float] | np.ndarray,
    real: Sequence[float] | np.ndarray,
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
) -> dict[str, Any]:
    """Weight ``w`` of the dataset-level combination ``w * regressor + (1 - w) * spe``, from development sets only.

    ``spe``, ``regressor``, ``real``: one value per development set (e.g. SPE's estimate, the mean per-case
    regressor estimate and the real mean Dice on shifted copies of the calibration set). The weight with the
    lowest mean absolute error is kept only if it beats SPE alone (``w = 0``); ``mae`` maps each weight to
    its error. Non-finite sets are skipped.
    """
    s, q, y = (np.asarray(v, dtype=float).reshape(-1) for v in (spe, regressor, real))
    if not (s.shape == q.shape == y.shape):
        raise ValueError(f"lengths differ: {s.size} SPE, {q.size} regressor, {y.size} real values.")
    ok = np.isfinite(s) & np.isfinite(q) & np.isfinite(y)
    s, q, y = s[ok], q[ok], y[ok]
    if s.size == 0:
        return {"weight": 0.0, "mae": {}, "n_sets": 0}
    mae = {float(w): float(np.mean(np.abs(w * q + (1 - w) * s - y))) for w in weights}
    best = min(mae, key=lambda w: (mae[w], w))
    keep = best if mae[best] < mae.get(0.0, float(np.mean(np.abs(s - y)))) else 0.0
    return {"weight": keep, "mae": {str(k): v for k, v in mae.items()}, "n_sets": int(s.size)}


def combined_value(weight: float, regressor: float | None, spe: float | None) -> float | None:
    """``weight * regressor + (1 - weight) * spe`` (None when either is missing)."""
    if regressor is None or spe is None:
        return None
    return float(weight) * float(regressor) + (1 - float(weight)) * float(spe)


def combination_from_pairs(
    pairs: Sequence[dict[str, Any]],
    regressor_means: dict[str, float | None],
    g: MetricMapping | None,
    pseudo_calibration: float | None,
    real_calibration: float | None,
) -> dict[str, Any] | None:
    """:func:`choose_combination` on a run's calibration pairs (Dice): development sets whose real Dice
    (``real_calibration + d_real``), SPE's anchored estimate and the regressor's mean estimate
    (``regressor_means`` by pair name) are all known. None without them.

    Neither signal is scored on data it was fitted on: SPE's estimate of a pair is made with the move rule it
    applies (:func:`~spe_lightning.engine.estimate.fit_interval_model`) fitted without that pair's family,
    and ``regressor_means`` must be held out the same way (e.g. :func:`spe_lightning.run.regressor_heldout_means`;
    a pair whose mean is None, such as a subset of the calibration cases the regressor's map was fitted on,
    is skipped). Only generic pairs (no ``"target"``) are used."""
    from spe_lightning.engine.calibration_pairs import pairs_for_target
    from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, pair_family

    if not regressor_means or g is None or pseudo_calibration is None or real_calibration is None:
        return None
    generic = pairs_for_target(pairs, None)
    spe, reg, real, names = [], [], [], []
    for p in generic:
        dp, dr, mean = p["d_pseudo"].get("dice"), p["d_real"].get("dice"), regressor_means.get(p["name"])
        if dp is None or dr is None or mean is None:
            continue
        fam = pair_family(p["name"])
        held_out = [q for q in generic if pair_family(q["name"]) != fam]
        model = fit_interval_model(held_out, "dice", g, pseudo_calibration)
        value = anchored_estimate(
            g, "dice", pseudo_calibration + dp, pseudo_calibration, real_calibration, interval_model=model
        )["value"]
        spe.append(np.nan if value is None else value)
        reg.append(mean)
        real.append(real_calibration + dr)
        names.append(p["name"])
    return {**choose_combination(spe, reg, real), "sets": names, "held_out": True}
