"""Does a new set of images look like the calibration images the estimator was fitted on?

SPE's estimate holds for images the model sees the way it saw its calibration images. Read differently
(padded to a square when training stretched them, scaled 0–255 instead of 0–1, another channel count) the
model segments something else and the estimate is for that. :func:`input_summary` records, per calibration
image, what the model was given (intensity mean, spread, 1st/99th percentiles, the share of flat bars at the
edges, i.e. padding) and what it predicted (foreground fraction, confidence); it is stored in the estimator
file. :func:`compare_inputs` compares a new set with it, names what differs, the likely cause and the fix.

Rule: a statistic differs when the new images' median lies outside the calibration images' 5th–95th
percentile range widened by half its span (and at least a floor per statistic: 20% of the calibration
intensity range for intensities, 5 points of image side for padding, a quarter of the calibration median or
0.01 for the foreground fraction, 0.05 for confidence). Wide on purpose: a set from another scanner or a
noisier site is what SPE is for and should pass; a reading mismatch moves these statistics far more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["INTENSITY_STATS", "image_statistics", "input_summary", "compare_inputs", "border_fraction"]

#: per-image intensity statistics of the model's inputs
INTENSITY_STATS = ("mean", "std", "p01", "p99")
_MAX_VALUES = 2**18  # percentiles from a strided sample of larger images


def border_fraction(image: Tensor, rel_tol: float = 1e-3) -> float:
    """Share of an image's height or width (the larger) taken by flat bars at its edges (padding).

    ``image`` ``[C,H,W]`` (or ``[H,W]``; volumes ``[C,D,H,W]`` use their middle slice). A row or column is
    flat when its values span at most ``rel_tol`` of the image's range.
    """
    x = image.float()
    if x.ndim == 4:
        x = x[:, x.shape[1] // 2]
    if x.ndim == 3:
        x = x.mean(0)
    if x.ndim != 2 or x.numel() == 0:
        return 0.0
    x = torch.nan_to_num(x)
    tol = rel_tol * max(float(x.max() - x.min()), 1e-12)
    rows = (x.amax(1) - x.amin(1)) <= tol
    cols = (x.amax(0) - x.amin(0)) <= tol

    def run(flags: Tensor) -> int:
        f = flags.tolist()
        n = len(f)
        lead = next((i for i, v in enumerate(f) if not v), n)
        if lead == n:
            return n
        trail = next((i for i, v in enumerate(reversed(f)) if not v), n)
        return lead + trail

    h, w = x.shape
    return max(run(rows) / h, run(cols) / w)


def image_statistics(image: Tensor) -> dict[str, float]:
    """``mean, std, p01, p99`` of the channel-averaged image and its :func:`border_fraction`."""
    x = image.float()
    g = x.mean(0) if x.ndim >= 3 else x
    flat = torch.nan_to_num(g.flatten())
    if flat.numel() > _MAX_VALUES:
        flat = flat[:: -(-flat.numel() // _MAX_VALUES)]
    q = torch.quantile(flat, torch.tensor([0.01, 0.99])) if flat.numel() else torch.zeros(2)
    return {
        "mean": float(flat.mean()) if flat.numel() else 0.0,
        "std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "p01": float(q[0]),
        "p99": float(q[1]),
        "border": border_fraction(x),
    }


def input_summary(inputs: Sequence[Tensor], masks: Sequence[Tensor], confidence: Tensor) -> dict[str, Any]:
    """What the model was given and what it predicted, per image (plain lists: stored in the estimator file).

    ``inputs``: the model inputs ``[C,*S]``; ``masks``: its predicted masks (bool or label maps);
    ``confidence``: its per-image confidence ``[n]``.
    """
    stats = [image_statistics(x) for x in inputs]
    out: dict[str, Any] = {k: [round(s[k], 6) for s in stats] for k in (*INTENSITY_STATS, "border")}
    out["channels"] = sorted({int(x.shape[0]) for x in inputs}) if inputs else []
    shapes = sorted({tuple(int(s) for s in x.shape[1:]) for x in inputs})
    out["shapes"] = [list(s) for s in shapes] if len(shapes) <= 5 else None  # sizes vary: nothing to compare
    out["foreground"] = [round(float((m > 0).float().mean()), 6) for m in masks]
    out["confidence"] = [round(float(c), 6) for c in confidence.flatten().tolist()]
    out["n"] = len(stats)
    return out


#: the new images' median std may be this many times below the calibration images' 5th percentile or above their 95th
STD_RATIO = 2.0


def _range(values: Sequence[float]) -> tuple[float, float, float]:
    """(5th percentile, 95th percentile, median)."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi, med = np.percentile(v, [5, 95, 50])
    return float(lo), float(hi), float(med)


def _compare(
    name: str, cal: Sequence[float], new: Sequence[float], floor: float, ratio: float | None = None
) -> dict[str, Any]:
    """``new``'s median against ``cal``'s 5-95% range widened by half its width or ``floor``; with ``ratio``, a
    spread statistic (std) is compared by ratio instead: accepted from ``p05 / ratio`` to ``p95 * ratio`` (an
    additive margin larger than the std itself could never call it too low)."""
    lo, hi, cal_med = _range(cal)
    tol = max(0.5 * (hi - lo), floor)
    v = np.asarray(new, dtype=np.float64)
    med = float(np.median(v))
    low, high = (lo / ratio, hi * ratio) if ratio else (lo - tol, hi + tol)
    outside = float(np.mean((v < low) | (v > high))) if v.size else 0.0
    verdict = "ok" if low <= med <= high else ("higher" if med > high else "lower")
    return {
        "statistic": name,
        "calibration": {"p05": round(lo, 4), "p95": round(hi, 4), "median": round(cal_med, 4)},
        "accepted": [round(low, 4), round(high, 4)],
        "new_median": round(med, 4),
        "new_outside": round(outside, 3),
        "verdict": verdict,
    }


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def compare_inputs(
    stored: dict[str, Any] | None,
    new: dict[str, Any],
    reference_border: Sequence[float] | None = None,
    written_by: str | None = None,
) -> dict[str, Any]:
    """The input check of ``new`` (an :func:`input_summary`) against the ``stored`` calibration summary.

    ``reference_border``: :func:`border_fraction` of the stored references (working-size gray images), the
    padding check of estimator files written without a summary. Returns ``{"verdict": "ok" | "mismatch" |
    "not_compared", "checks": [...], "not_compared": [...], "warnings": [message naming cause and fix]}``.
    """
    checks: list[dict[str, Any]] = []
    not_compared: list[str] = []
    warnings: list[str] = []
    if stored is None:
        who = f"spe-lightning {written_by}" if written_by else "an older spe-lightning"
        why = (
            f"the estimator file (written by {who}) holds no statistics of its calibration images; "
            "re-export it with this version (a finished run's run.estimator.save(...)) to compare them"
        )
        not_compared += [f"intensity {s}: {why}" for s in INTENSITY_STATS]
        not_compared += [f"predicted foreground fraction: {why}", f"model confidence: {why}"]
        if reference_border is not None and len(reference_border):
            checks.append(_compare("border", reference_border, new["border"], 0.05))
            checks[-1]["against"] = "stored references"
        else:
            not_compared.append(f"padding (flat border bars): {why}")
    else:
        lo, hi, _ = _range(stored["p99"])
        lo1, _, _ = _range(stored["p01"])
        scale = max(hi - lo1, 1e-6)  # the calibration images' intensity range
        for s in INTENSITY_STATS:
            checks.append(_compare(s, stored[s], new[s], 0.2 * scale, STD_RATIO if s == "std" else None))
        checks.append(_compare("border", stored["border"], new["border"], 0.05))
        _, _, fg_med = _range(stored["foreground"]) if stored.get("foreground") else (0, 0, 0)
        if stored.get("foreground") and new.get("foreground"):
            checks.append(_compare("foreground", stored["foreground"], new["foreground"], max(0.25 * fg_med, 0.01)))
        if stored.get("confidence") and new.get("confidence"):
            checks.append(_compare("confidence", stored["confidence"], new["confidence"], 0.05))
        for c in checks:
            c["against"] = "calibration images"
    by = {c["statistic"]: c for c in checks}
    b = by.get("border")
    if b and b["verdict"] == "higher":
        warnings.append(
            f"{_pct(b['new_median'])} of the new images' height or width is flat bars at the edges (median), "
            f"against {_pct(b['calibration']['median'])} in the {b['against']}: the images are padded to a square "
            "but the model's images were not (the bars also move the intensity statistics). Read them as in "
            "training: pass --resize plain (stretch to a square), or --dataset / --transform with the training's "
            "own reading."
        )
    elif b and b["verdict"] == "lower":
        warnings.append(
            f"the {b['against']} have flat bars at the edges ({_pct(b['calibration']['median'])} of their side, "
            f"median: padding) and the new images {_pct(b['new_median'])}: the model saw padded images. Pass "
            "--resize pad (the default), or --dataset / --transform with the training's own reading."
        )
    moved = [s for s in INTENSITY_STATS if by.get(s, {}).get("verdict", "ok") != "ok"]
    # padding bars darken the images: with a padding warning, only a raised 99th percentile is worth its own
    explained = bool(b and b["verdict"] == "higher" and by.get("p99", {}).get("verdict") != "higher")
    if moved and not explained:
        p01, p99 = by["p01"], by["p99"]
        cal_txt = f"{p01['calibration']['median']:.3g}–{p99['calibration']['median']:.3g}"
        new_txt = f"{p01['new_median']:.3g}–{p99['new_median']:.3g}"
        hint = "--intensity auto (8-bit / 255, others between percentiles), divide, percentile or none"
        if p99["new_median"] > 2 * max(p99["calibration"]["p95"], 1e-6) and p99["new_median"] > 1.5:
            hint = "the values look unscaled (e.g. 0–255 where the model saw 0–1): --intensity auto or divide"
        elif p99["calibration"]["median"] > 1.5 and p99["new_median"] <= 1.0:
            hint = "the model saw unscaled values: --intensity none"
        warnings.append(
            f"the new images' intensities differ from the {p99['against']}' ({', '.join(moved)}; 1st–99th "
            f"percentile {new_txt} against {cal_txt}, medians): they are scaled differently than in training, or "
            f"come from another kind of scanner. If they are read differently, {hint}; or give the training's own "
            "reading with --dataset / --transform."
        )
    pred = [by[s] for s in ("foreground", "confidence") if by.get(s, {}).get("verdict", "ok") != "ok"]
    if pred:
        parts = [
            f"{'predicted foreground fraction' if c['statistic'] == 'foreground' else 'confidence'} "
            f"{c['new_median']:.3g} (median; calibration {c['calibration']['p05']:.3g}–{c['calibration']['p95']:.3g})"
            for c in pred
        ]
        cause = (
            "which follows from the reading difference above"
            if warnings
            else "so the images are either read differently than in training (padding, scaling, channels, "
            "orientation: see --resize, --intensity, --channels, --dataset, --transform) or come from a "
            "population the calibration set does not cover, where the estimate extrapolates"
        )
        warnings.append(f"the model's {' and '.join(parts)} lies outside the calibration set's range, {cause}.")
    shapes = stored.get("shapes") if stored else None
    if shapes and new.get("shapes"):
        known = {tuple(s) for s in shapes}
        odd = [s for s in new["shapes"] if tuple(s) not in known]
        checks.append(
            {
                "statistic": "size",
                "calibration": shapes,
                "new": new["shapes"],
                "verdict": "ok" if not odd else "differs",
                "against": "calibration images",
            }
        )
        if odd:
            warnings.append(
                f"the model's calibration inputs were {' or '.join('x'.join(map(str, s)) for s in shapes)} pixels "
                f"and the new ones {', '.join('x'.join(map(str, s)) for s in odd)}: resize them as in training "
                "(--image-size, or in your --dataset / --transform)."
            )
    if not checks:
        verdict = "not_compared"
    else:
        verdict = "mismatch" if any(c["verdict"] != "ok" for c in checks) else "ok"
    return {"verdict": verdict, "checks": checks, "not_compared": not_compared, "warnings": warnings}
