"""A self-contained HTML report of an estimate on new data (figures embedded as base64 PNGs).

Sections: the estimate of every metric with its interval, the distribution of per-case quality
scores (with the calibration cases' and the flagging threshold), and a gallery of the worst
cases with the predicted mask drawn over the image. Only matplotlib (Agg) and the standard library.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spe_lightning import __version__
from spe_lightning.engine.results import Estimate

__all__ = [
    "GalleryItem",
    "METRIC_LABELS",
    "chunks_figure",
    "write_html_report",
    "estimate_figure",
    "quality_figure",
    "gallery_figure",
]

#: how a metric key is named on the page and in the figures (keys not listed are shown as they are)
METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "precision": "Precision",
    "recall": "Recall",
    "hd95": "HD95 (px)",
    "pearson_r": "Pixel Pearson r",
}


@dataclass
class GalleryItem:
    """One case of the gallery: a 2D gray image, the predicted mask (same size) and a caption."""

    image: np.ndarray
    mask: np.ndarray
    caption: str
    flagged: bool = False


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def estimate_figure(estimates: dict[str, dict[str, Any]], level: float) -> Any:
    """Point estimate with interval per metric; HD95 on its own axis (pixels)."""
    plt = _plt()
    unit = [m for m in estimates if m != "hd95"]
    dist = [m for m in estimates if m == "hd95"]
    panels = [p for p in (unit, dist) if p]
    widths = [3 if p is unit else 1.6 for p in panels]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(8.6, 0.55 * max(len(unit), 2) + 1.1), gridspec_kw={"width_ratios": widths}
    )
    axes = np.atleast_1d(axes)
    for ax, names in zip(axes, panels):
        ys = np.arange(len(names))[::-1]
        for y, m in zip(ys, names):
            e = estimates[m]
            if e.get("value") is None:
                ax.text(0.02, y, "n/a", va="center", transform=ax.get_yaxis_transform(), color="0.4")
                continue
            lo = e["lower"] if e.get("lower") is not None else e["value"]
            hi = e["upper"] if e.get("upper") is not None else e["value"]
            ax.plot([lo, hi], [y, y], color="#1f77b4", lw=6, alpha=0.35, solid_capstyle="butt")
            ax.plot([e["value"]], [y], "o", color="#1f77b4", ms=8)
            ax.annotate(f"{e['value']:.3g}", (e["value"], y), xytext=(0, 9), textcoords="offset points", ha="center")
        ax.set_yticks(ys, [METRIC_LABELS.get(m, m) for m in names])
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.grid(axis="x", alpha=0.3)
        if names is unit:
            ax.set_xlim(0, 1.02)
            ax.set_xlabel("higher is better")
        else:
            top = max((estimates[m].get("upper") or estimates[m].get("value") or 0.0) for m in names)
            ax.set_xlim(0, max(top, 1e-6) * 1.25)
            ax.set_xlabel("lower is better")
    fig.suptitle(f"Estimated performance (dot) with its {level:.0%} interval (bar)", fontsize=11)
    fig.tight_layout()
    return fig


def chunks_figure(
    chunks: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    level: float,
    alert_below: dict[str, float] | None = None,
    alert_above: dict[str, float] | None = None,
) -> Any:
    """Per metric: the estimate per chunk with its interval band, the thresholds, and the realised value (x)."""
    plt = _plt()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8.6, 2.6 * len(metrics) + 0.6), squeeze=False, sharex=True)
    xs = np.arange(len(chunks))
    labels = [str(c["chunk"]) for c in chunks]
    for ax, m in zip(axes[:, 0], metrics):

        def col(field: str, m: str = m) -> np.ndarray:
            return np.array([np.nan if (v := c["estimates"].get(m, {}).get(field)) is None else v for c in chunks])

        value, lo, hi = col("value"), col("lower"), col("upper")
        ax.fill_between(xs, lo, hi, color="#1f77b4", alpha=0.2, step=None, label=f"{level:.0%} interval")
        ax.plot(xs, value, "o-", color="#1f77b4", ms=4, label="estimate")
        true = np.array([np.nan if (v := (c.get("true") or {}).get(m)) is None else v for c in chunks])
        if np.isfinite(true).any():
            ax.plot(xs, true, "x", color="k", ms=7, label="realised (masks)")
        for thresholds, style in ((alert_below, "below"), (alert_above, "above")):
            if thresholds and m in thresholds:
                ax.axhline(thresholds[m], color="#b00000", ls="--", lw=1.2, label=f"alert {style} {thresholds[m]:g}")
        fired = [i for i, c in enumerate(chunks) if any(a["metric"] == m for a in c.get("alerts", []))]
        if fired:
            ax.plot(xs[fired], value[fired], "o", color="#b00000", ms=8, mfc="none", mew=2, label="alert")
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", ncol=3)
    ax = axes[-1, 0]
    step = max(1, len(labels) // 20)  # at most ~20 tick labels
    ax.set_xticks(xs[::step], labels[::step], rotation=45 if max(map(len, labels), default=0) > 4 else 0, ha="right")
    ax.set_xlabel("chunk")
    fig.suptitle("Estimated performance per chunk of incoming data", fontsize=11)
    fig.tight_layout()
    return fig


def _chunks_section(chunks: dict[str, Any], level: float) -> list[str]:
    """The per-chunk section: plot and table (``chunks`` as in ``estimate.json``)."""
    rows = chunks.get("chunks", [])
    if not rows:
        return []
    below, above = chunks.get("alert_below") or {}, chunks.get("alert_above") or {}
    keys = list(rows[0]["estimates"])
    metrics = [k for k in keys if k == "dice" or k in below or k in above] or keys[:1]
    fig = chunks_figure(rows, metrics, level, below, above)
    out = [f"<h2>Monitoring: estimate per chunk ({html.escape(str(chunks.get('by', '')))})</h2>"]
    out.append(f"<img alt='chunks' src='data:image/png;base64,{_png(fig)}'>")
    m = metrics[0]
    cells = []
    for c in rows:
        e = c["estimates"].get(m, {})
        alert = any(a["metric"] == m for a in c.get("alerts", []))
        true = (c.get("true") or {}).get(m)
        note = Estimate.from_dict(e).range_note if isinstance(e, dict) and "value" in e else None
        cells.append(
            f"<tr><td>{html.escape(str(c['chunk']))}</td><td>{c['n_images']}</td><td>{_f(e.get('value'))}</td>"
            f"<td>{_f(e.get('lower'))} – {_f(e.get('upper'))}</td><td>{_f(true)}</td>"
            f"<td class='{'flag' if alert else 'ok'}'>{'ALERT' if alert else ''}</td>"
            f"<td>{html.escape(note or '')}</td></tr>"
        )
    out.append(
        f"<table><tr><th>chunk</th><th>images</th><th>{html.escape(METRIC_LABELS.get(m, m))}</th>"
        f"<th>{level:.0%} interval</th><th>realised</th><th>alert</th><th>note</th></tr>{''.join(cells)}</table>"
    )
    n_alerts = len(chunks.get("alerts", []))
    out.append(
        f"<p class='note'>{n_alerts} alert(s). Each chunk is estimated on its own (its images are the support "
        "set); a chunk with fewer images than the calibration pairs' sets gets a wider interval (its mean varies "
        "more). "
        "Per chunk and metric: chunks.csv.</p>"
    )
    return out


def quality_figure(
    scores: Sequence[float | None],
    threshold: float | None,
    calibration_scores: Sequence[float | None] | None = None,
) -> Any:
    """Histogram of per-case quality scores, the calibration cases' outline and the flag threshold."""
    plt = _plt()
    s = np.asarray([np.nan if v is None else v for v in scores], dtype=float)
    s = s[np.isfinite(s)]
    fig, ax = plt.subplots(figsize=(9.4, 3.1))
    bins = np.linspace(0, 1, 26)
    if threshold is not None:
        low = s[s < threshold]
        ax.hist(low, bins=bins, color="#d62728", alpha=0.85, label=f"flagged ({low.size})")
        ax.hist(
            s[s >= threshold], bins=bins, color="#2ca02c", alpha=0.75, label=f"not flagged ({(s >= threshold).sum()})"
        )
        ax.axvline(threshold, color="k", ls="--", lw=1.2)
        right = threshold > 0.6  # the label goes on the side of the line with more room
        ax.annotate(
            "flag threshold",
            (threshold, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if right else 4, -14),
            textcoords="offset points",
            ha="right" if right else "left",
        )
    else:
        ax.hist(s, bins=bins, color="#1f77b4", alpha=0.8, label=f"cases ({s.size})")
    if calibration_scores:
        c = np.asarray([np.nan if v is None else v for v in calibration_scores], dtype=float)
        c = c[np.isfinite(c)]
        if c.size and s.size:
            w = np.full(c.size, s.size / c.size)  # scaled to the new data's count
            ax.hist(c, bins=bins, weights=w, histtype="step", color="0.3", lw=1.5, label="calibration cases (scaled)")
    ax.set_xlim(0, 1)
    ax.set_xlabel("per-case quality score (best pseudo Dice of the case's own prediction on similar references)")
    ax.set_ylabel("cases")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    fig.tight_layout()
    return fig


def gallery_figure(items: Sequence[GalleryItem], cols: int = 4) -> Any:
    """Images with the predicted mask's outline (and a light fill) over them."""
    plt = _plt()
    rows = max(1, int(np.ceil(len(items) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.55 * rows))
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, it in zip(axes, items):
        ax.imshow(it.image, cmap="gray", interpolation="bilinear")
        m = np.asarray(it.mask, dtype=float)
        if m.any():
            overlay = np.zeros((*m.shape, 4))
            overlay[..., 0], overlay[..., 3] = 1.0, 0.22 * m
            ax.imshow(overlay, interpolation="nearest")
            ax.contour(m, levels=[0.5], colors=["#ff3030"], linewidths=1.2)
        else:
            ax.text(
                0.5,
                0.5,
                "no mask\npredicted",
                color="#ffb000",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
            )
        ax.set_title(it.caption, fontsize=8, color="#b00000" if it.flagged else "black")
    fig.tight_layout()
    return fig


def _f(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:1000px;margin:24px auto;
padding:0 16px;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.92em}.note{color:#555;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.93em}td,th{padding:4px 10px;border-bottom:1px solid #e5e5e5;
text-align:right}th{background:#f5f5f5}td:first-child,th:first-child{text-align:left}
.flag{color:#b00000;font-weight:600}.ok{color:#227722}img{max-width:100%}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:.8em 0}.card{border:1px solid #ddd;border-radius:6px;
padding:8px 14px;min-width:150px}.card b{font-size:1.5em;display:block}
table{display:block;max-width:100%;overflow-x:auto}.meta{overflow-wrap:anywhere}
@media (max-width:600px){body{margin:12px auto;padding:0 10px}td,th{padding:3px 6px}.card{min-width:0;flex:1 1 40%}}
"""


def _labelled_section(labelled: dict[str, Any] | None, level: float) -> list[str]:
    """The prediction-powered estimates of a few labelled cases (``estimate.json``'s ``labelled``), if any."""
    metrics = (labelled or {}).get("metrics") or {}
    if not metrics:
        return []
    rows = "".join(
        f"<tr><td>{html.escape(METRIC_LABELS.get(m, m))}</td><td>{_f(r.get('estimate'))}</td>"
        f"<td>{_f(r.get('lower'))} – {_f(r.get('upper'))}</td><td>{_f(r.get('classical'))}</td>"
        f"<td>{_f(r.get('classical_lower'))} – {_f(r.get('classical_upper'))}</td>"
        f"<td>{_f(r.get('lambda'), 2)}</td></tr>"
        for m, r in metrics.items()
    )
    n = (labelled or {}).get("n_labels")
    return [
        f"<h2>Estimates with {html.escape(str(n))} labelled cases</h2>",
        f"<table><tr><th>metric</th><th>prediction-powered</th><th>{level:.0%} interval</th><th>labelled only</th>"
        f"<th>{level:.0%} interval</th><th>λ</th></tr>{rows}</table>",
        "<p class='note'>The labelled cases' real scores combined with SPE's per-case estimates of every case "
        "(prediction-powered inference); the interval holds whatever SPE's bias, for labelled cases drawn at "
        "random (docs/few_labels.md).</p>",
    ]


def write_html_report(
    path: str | Path,
    summary: dict[str, Any],
    cases: Sequence[dict[str, Any]],
    gallery: Sequence[GalleryItem] = (),
    calibration: dict[str, Any] | None = None,
    title: str = "SPE estimate on unlabelled data",
    meta: dict[str, str] | None = None,
    chunks: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.html``: ``summary`` as in ``estimate.json``, ``cases`` as in ``cases.csv``, ``chunks``
    as ``estimate.json``'s ``chunks`` (a plot of the estimate per chunk)."""
    level = float(summary.get("level", 0.9))
    est = summary.get("estimates", {})
    flagged = [c for c in cases if c.get("flagged")]
    threshold = (calibration or {}).get("threshold")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"  # phones: the screen's width
        f"<title>{html.escape(title)}</title>"
    ]
    parts.append(f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>")
    if meta:
        parts.append(
            "<p class='meta'>"
            + "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(str(v))}" for k, v in meta.items())
            + "</p>"
        )
    dice = est.get("dice", {})
    cards = [("images", str(summary.get("n_images", len(cases))))]
    if dice:
        cards.append(("estimated mean Dice", f"{_f(dice.get('value'))}"))
        if dice.get("lower") is not None:
            cards.append((f"{level:.0%} interval", f"{_f(dice.get('lower'), 2)} – {_f(dice.get('upper'), 2)}"))
    if cases and threshold is not None:
        cards.append(("cases flagged for review", f"{len(flagged)} of {len(cases)}"))
    parts.append(
        "<div class='cards'>"
        + "".join(f"<div class='card'><b>{html.escape(v)}</b>{html.escape(k)}</div>" for k, v in cards)
        + "</div>"
    )

    parts.append("<h2>1. Estimated performance on these images</h2>")
    if est:
        parts.append(f"<img alt='estimates' src='data:image/png;base64,{_png(estimate_figure(est, level))}'>")
        true = summary.get("true") or {}  # the images came with masks: the realised score beside each estimate
        rows = "".join(
            f"<tr><td>{html.escape(METRIC_LABELS.get(m, m))}</td><td>{_f(e.get('value'))}</td>"
            f"<td>{_f(e.get('lower'))} – {_f(e.get('upper'))}</td><td>{_f(e.get('pseudo'))}</td>"
            + (f"<td>{_f(true.get(m))}</td>" if true else "")
            + f"<td>{html.escape(_estimate_note(e))}</td></tr>"
            for m, e in est.items()
        )
        parts.append(
            f"<table><tr><th>metric</th><th>estimate</th><th>{level:.0%} interval</th>"
            f"<th>pseudo value</th>{'<th>true (masks)</th>' if true else ''}<th>note</th></tr>{rows}</table>"
        )
    parts.extend(_labelled_section(summary.get("labelled"), level))
    parts.append(
        "<p class='note'>The estimate is the model's expected <i>average</i> score on this set, inferred without "
        "labels: the predicted masks of these images are used to segment labelled reference images, and how "
        "well that works (the pseudo value) is mapped to the real score by a mapping fitted on the labelled "
        f"calibration set during training. The interval has nominal {level:.0%} coverage for data like the "
        "calibration set; it does not cover an unusually large shift between training and these images.</p>"
    )
    if chunks:
        parts.extend(_chunks_section(chunks, level))

    if cases:
        parts.append("<h2>2. Per-case quality</h2>")
        scores = [c.get("quality") for c in cases]
        cal_scores = (calibration or {}).get("calibration_scores")
        parts.append(
            f"<img alt='quality' src='data:image/png;base64,{_png(quality_figure(scores, threshold, cal_scores))}'>"
        )
        if threshold is not None:
            assert calibration is not None  # the threshold came from it
            cut = calibration.get("dice_cut", 0.7)
            if calibration.get("method") == "youden":
                how = (
                    f"on the labelled calibration set this threshold best separated the cases with real Dice below "
                    f"{cut:g} from the others"
                    + (f" (AUROC {calibration['auroc']:.2f} there)" if calibration.get("auroc") is not None else "")
                )
            else:
                how = (
                    f"the calibration set had too few cases on one side of real Dice {cut:g} to fit a threshold, so "
                    f"it is a low quantile of the calibration scores ({calibration.get('method')})"
                )
            parts.append(
                "<p class='note'>Each case's own predicted mask is used to segment the labelled references that "
                "look most like it; the best resulting Dice is its quality score (reverse classification "
                f"accuracy). Cases scoring below <b>{threshold:.3f}</b> are flagged: {how}. The outline shows "
                "the calibration cases' scores. A flag means <i>review this case</i>, not that it is wrong.</p>"
            )
        else:
            parts.append(
                "<p class='note'>The estimator was not calibrated per case: scores are shown, nothing is flagged.</p>"
            )
        parts.extend(_site_notes(cases, summary.get("case_agreement"), level))
        if gallery:
            parts.append(f"<h2>3. The {len(gallery)} lowest-scoring cases (predicted mask in red)</h2>")
            parts.append(f"<img alt='gallery' src='data:image/png;base64,{_png(gallery_figure(gallery))}'>")
        if flagged:
            site = "signals" in flagged[0]  # site-calibrated rows: their interval and distance flag too
            rows = "".join(
                f"<tr><td>{html.escape(str(c['id']))}</td><td>{_f(c.get('quality'))}</td>"
                f"<td>{_f(c.get('estimated_dice'))}</td><td>{c.get('foreground_pixels', '')}</td>"
                f"<td>{_f(c.get('confidence'))}</td>"
                + (
                    f"<td>{_f(c.get('estimated_dice_lower'))} – {_f(c.get('estimated_dice_upper'))}</td>"
                    f"<td>{'yes' if c.get('beyond_calibrated') else 'no'}</td>"
                    if site
                    else ""
                )
                + "</tr>"
                for c in sorted(flagged, key=lambda c: c.get("quality") or 0.0)
            )
            extra = f"<th>{level:.0%} interval</th><th>beyond calibrated</th>" if site else ""
            parts.append(
                f"<h2>Flagged cases ({len(flagged)})</h2><table><tr><th>case</th><th>quality</th>"
                f"<th>estimated Dice</th><th>mask pixels</th><th>model confidence</th>{extra}</tr>{rows}</table>"
            )
    parts.append(
        f"<p class='note'>Generated by spe-lightning {__version__} (SPE, Zou et al., MICCAI 2025; per-case scores "
        "after reverse classification accuracy, Valindria et al., IEEE TMI 2017). Full numbers: estimate.json, "
        "cases.csv.</p></body></html>"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _estimate_note(e: dict[str, Any]) -> str:
    """The note beside one metric's estimate: why there is no value, or what widened its interval."""
    notes = [e["reason"]] if e.get("reason") else []
    est = Estimate.from_dict(e)
    if est.range_note:
        notes.append(est.range_note)
    if e.get("value") is not None and est.widened_to_styled_anchor:
        notes.append(
            f"interval reaches {_f(e['styled_anchor'])}, the estimate anchored on the calibration set restyled like "
            "these images"
        )
    return "; ".join(notes)


def _site_notes(cases: Sequence[dict[str, Any]], agreement: dict[str, Any] | None, level: float) -> list[str]:
    """The per-target (site) calibration's note and whether the rows agree with the set estimate."""
    out = []
    if cases and cases[0].get("signals"):
        signals = str(cases[0]["signals"])  # percase.sites.rule_name: "regressor+confidence[/isotonic]"
        far = sum(1 for c in cases if c.get("beyond_calibrated"))
        out.append(
            "<p class='note'>Per-case estimates of this set come from a map recalibrated for it: the calibration "
            "cases and the same images restyled like this set (their real Dice known), stacking "
            f"<b>{html.escape(signals.removesuffix('/isotonic'))}</b>"
            f"{' through a monotone map' if signals.endswith('/isotonic') else ''}. "
            f"Each case has a {level:.0%} interval; "
            f"<b>{far}</b> of {len(cases)} cases lie farther from every calibrated case than the calibrated cases "
            "lie from each other, and their intervals are widened in proportion (column beyond_calibrated).</p>"
        )
    if agreement:
        text = (
            f"The mean per-case estimated Dice is <b>{agreement['mean_case_estimate']:.3f}</b> beside SPE's "
            f"<b>{agreement['set_estimate']:.3f}</b> (difference {agreement['difference']:+.3f}; SPE's half-width "
            f"{agreement['half_width']:.3f})."
        )
        widened = agreement.get("case_intervals_widened")
        if widened:
            text += (
                " Each case's interval also carries SPE's uncertainty about the set's Dice (its interval reaches "
                f"{widened['below']:.3f} below and {widened['above']:.3f} above the rows' mean; added in quadrature)."
            )
        if agreement.get("disagree"):
            text += " <b>They disagree by more than SPE's interval: check a few cases with labels.</b>"
        out.append(f"<p class='note'>{text}</p>")
    return out
