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
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spe_lightning.data.adapters import resize_images
from spe_lightning.engine.metrics import per_image_metrics
from spe_lightning.percase.mask_errors import ERROR_KINDS, make_candidates
from spe_lightning.percase.mirror import MIRROR
from spe_lightning.percase.quality_calibration import calibrate_quality, quality_estimates
from spe_lightning.percase.scorer import CaseInputs, CaseScoring, ScorerFitData, working_masks

__all__ = [
    "QualitySettings",
    "QualityRegressor",
    "synthetic_pairs",
    "calibrate_quality",
    "quality_estimates",
    "RegressorScorer",
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


class RegressorScorer:
    """Per-case Dice from the :class:`QualityRegressor`, calibrated on the calibration set (:func:`calibrate_quality`).

    :meth:`fit` learns from the references' true masks damaged in the ways models err and from the model's own
    masks of the references, then maps the raw output to per-case Dice with intervals on the model's calibration
    predictions: combined with the model's confidence when the calibration set has at least 5 cases below Dice
    0.7, else with the model's predictions on shifted copies of the calibration images as extra pairs.
    2D binary only.

    Args:
        settings: the network's :class:`QualitySettings` (None: the defaults).
        state: a saved :meth:`state` (``{"regressor": state tensors, "calibration": plain numbers}``).
        device: where a saved regressor runs.
    """

    name = "regressor"

    def __init__(
        self,
        settings: QualitySettings | None = None,
        state: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.settings = settings
        self.regressor: QualityRegressor | None = None
        self.calibration: dict[str, Any] | None = None
        #: per run target: the map recalibrated with its styled pairs (:func:`~.site_fit.fit_sites`)
        self.sites: dict[str, Any] | None = None
        if state is not None:
            self.regressor = QualityRegressor.from_state(state["regressor"], device=device)
            self.calibration = dict(state["calibration"])
            self.sites = state.get("sites")

    def fit(self, data: ScorerFitData) -> RegressorScorer:
        """Fit the network on ``data.reference`` and calibrate it on ``data.calibration`` (see the class docstring)."""
        from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set
        from spe_lightning.percase.rca import per_case_dice
        from spe_lightning.progress import Progress

        ref, cal = data.reference, data.calibration
        if ref is None or ref.masks is None or cal.masks is None:
            raise ValueError("RegressorScorer.fit: the reference and calibration sets need masks.")
        size = tuple(ref.gray.shape[-2:])
        ref_pred, _ = data.predict(ref)
        regressor = QualityRegressor(self.settings, device=data.device)
        s = regressor.settings
        with Progress(
            s.epochs * max(1, s.n_models), "SPE: fitting the quality regressor", data.progress, "epoch"
        ) as bar:
            regressor.fit(
                ref.gray,
                working_masks(ref.masks, size),
                extra_candidates=[working_masks(ref_pred, size)],
                seed=data.seed,
                progress=lambda epoch, loss: bar.update(1),
            )
        self.regressor = regressor
        masks, conf = data.predict(cal)
        raw = self.raw(cal.gray, masks)
        real = per_case_dice(masks, cal.masks)
        if int((real < 0.7).sum()) >= 5:
            qcal = calibrate_quality(raw, real, kind="linear", level=data.level, confidence=conf.numpy())
        else:  # too few bad calibration cases: the model's predictions on shifted copies join the fit
            xs, ys = [], []
            for i, family in enumerate(SHIFT_FAMILIES):
                shifted = shift_set(cal, family, 2, seed=data.seed * 7919 + 97 * i)
                s_masks, _ = data.predict(shifted)
                xs.append(self.raw(shifted.gray, s_masks))
                assert shifted.masks is not None  # shifted copies keep the calibration set's masks
                ys.append(per_case_dice(s_masks, shifted.masks))
            qcal = calibrate_quality(
                raw, real, kind="isotonic", level=data.level, extra_pairs=(np.concatenate(xs), np.concatenate(ys))
            )
        self.calibration = qcal
        if data.styled:  # the run's targets: the map recalibrated with each one's styled pairs
            from spe_lightning.percase.site_fit import fit_sites

            try:
                self.sites = fit_sites(self.raw, data.predict, per_case_dice, cal, data.styled, data.level, data.seed)
            except ValueError as err:  # e.g. too few calibration cases: the targets keep the calibration-set map
                warnings.warn(
                    f"SPE: no per-target per-case calibration ({err}); the calibration-set map is used.", stacklevel=2
                )
        return self

    def raw(self, gray: Tensor, masks: Sequence[Tensor]) -> np.ndarray:
        """The network's uncalibrated Dice of each native-size mask on its working-size gray image."""
        if self.regressor is None:
            raise RuntimeError("RegressorScorer: not fitted; call fit() or build it from a saved state.")
        return self.regressor.predict(gray, working_masks(masks, tuple(gray.shape[-2:]))).numpy()

    def score(
        self, cases: CaseInputs, device: torch.device, progress: Callable[[int], Any] | None = None
    ) -> CaseScoring:
        """One row per case: the calibrated estimate with its interval and flag (one forward per case)."""
        from spe_lightning.percase.rca import regressor_case_rows

        qcal = self.calibration
        if qcal is None:
            raise RuntimeError("RegressorScorer: not calibrated; call fit() or build it from a saved state.")
        raw = self.raw(cases.gray, cases.masks)
        site = ((self.sites or {}).get("targets") or {}).get(cases.name) if cases.name is not None else None
        if site is not None:  # a run target: its own map, distance-aware intervals
            from spe_lightning.percase.site_fit import site_rows

            if progress is not None:
                progress(len(cases.ids))
            return CaseScoring(site_rows(site, raw, cases, float(qcal["threshold"])), float(qcal["threshold"]))
        est = quality_estimates(qcal, raw, cases.confidence.numpy() if qcal.get("weights") else None)
        if progress is not None:
            progress(len(cases.ids))
        rows = regressor_case_rows(est, cases.masks, cases.confidence, cases.ids, cases.real_dice)
        return CaseScoring(rows, float(qcal["threshold"]))

    def model_signals(self, name: str | None) -> tuple[str, ...]:
        """``("mirror",)`` when ``name`` is a run target whose map stacks the model's mirror consistency."""
        site = ((self.sites or {}).get("targets") or {}).get(name) if name is not None else None
        return tuple(s for s in (site or {}).get("signals", ()) if s == MIRROR)

    def state(self) -> dict[str, Any] | None:
        """``{"regressor": network state tensors, "calibration": plain numbers}`` (and ``"sites"``, the run
        targets' calibrations, when fitted); None before :meth:`fit`."""
        if self.regressor is None or self.calibration is None:
            return None
        out: dict[str, Any] = {"regressor": self.regressor.state_tensors(), "calibration": self.calibration}
        if self.sites is not None:
            out["sites"] = self.sites
        return out
