"""Aggregate `spe-lightning benchmark shift` results: mean ± std over seeds, per-target table, figure.

python benchmarks/summarize_shift.py benchmarks/results/shift_jsrt_seed*.json --figure docs/shift_jsrt.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from summarize_paper import _ms

from spe_lightning.benchmarking import shift_scores


def _value(e: object) -> float | None:
    return e["value"] if isinstance(e, dict) else e  # type: ignore[index,return-value]


def tables(results: list[dict], metrics: list[str] | None = None) -> str:
    """Markdown: summary per metric and method, then Dice per target (mean over seeds)."""
    methods = [k for k in results[0]["summary"]["dice"] if isinstance(results[0]["summary"]["dice"][k], dict)]
    lines = [
        f"{results[0]['dataset']}: seeds "
        + ", ".join(str(r["seed"]) for r in results)
        + f"; {len(results[0]['targets'])} targets per seed",
        "",
        "| metric | method | MAE | max abs error | coverage of the 90% interval | median / max width "
        "| Dice false alarms |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in metrics or list(results[0]["summary"]):
        for meth in methods:
            rows = [r["summary"][m][meth] for r in results]
            d = 1 if m == "hd95" else 3
            cov = _ms([row.get("coverage") for row in rows], 2) if "coverage" in rows[0] else ""
            fa = " / ".join(str(row["false_alarms"]) for row in rows) if "false_alarms" in rows[0] else ""
            width = (
                f"{_ms([row['median_width'] for row in rows], d)} / {_ms([row['max_width'] for row in rows], d)}"
                if "median_width" in rows[0]
                else ""
            )
            lines.append(
                f"| {m} | {meth} | {_ms([row['mae'] for row in rows], d)} | "
                f"{_ms([row['max_abs_error'] for row in rows], d)} | {cov} | {width} | {fa} |"
            )
    for site in results[0].get("sites", {}):
        lines += ["", f"Another site, {site} (its own rows, never averaged with the synthetic shifts):", ""]
        lines += ["| method | Dice error per seed (estimate - real) | mean abs error | interval per seed |"]
        lines += ["|---|---|---|---|"]
        for meth in methods:
            errs, ivs = [], []
            for r in results:
                row = next(t for t in r["targets"] if t["name"] == site)
                e, real = row[meth].get("dice"), row["real"]["dice"]
                v = _value(e)
                errs.append(None if v is None else v - real)
                if isinstance(e, dict) and e.get("lower") is not None:
                    ivs.append(
                        f"[{e['lower']:.3f}, {e['upper']:.3f}]{'' if e['lower'] <= real <= e['upper'] else ' (misses)'}"
                    )
            shown = " / ".join("n/a" if x is None else f"{x:+.3f}" for x in errs)
            mae = np.mean([abs(x) for x in errs if x is not None]) if any(x is not None for x in errs) else None
            lines.append(f"| {meth} | {shown} | {'n/a' if mae is None else f'{mae:.3f}'} | {' / '.join(ivs)} |")
    combos = [r.get("combination") for r in results]
    if any(combos):
        lines += [
            "",
            "SPE + regressor combination weight (chosen per run on its calibration pairs): "
            + ", ".join(
                "n/a" if c is None else f"seed {r['seed']}: w {c['weight']:.2f} ({c['n_sets']} sets)"
                for r, c in zip(results, combos)
            ),
        ]
    lines += [
        "",
        "| target | real Dice | SPE [90% interval] | calibration score | confidence |",
        "|---|---|---|---|---|",
    ]
    for i, t in enumerate(results[0]["targets"]):
        per = [r["targets"][i] for r in results]
        real = np.mean([p["real"]["dice"] for p in per])
        spe = [p["spe"]["dice"] for p in per]
        v, lo, hi = (np.mean([s[k] for s in spe]) for k in ("value", "lower", "upper"))
        cal = np.mean([p["calibration_score"]["dice"] for p in per])
        conf = np.mean([p["confidence"]["dice"] for p in per])
        lines.append(f"| {t['name']} | {real:.3f} | {v:.3f} [{lo:.3f}, {hi:.3f}] | {cal:.3f} | {conf:.3f} |")
    return "\n".join(lines)


def figure(result: dict, path: str, metric: str = "dice") -> None:
    """Estimated vs real ``metric`` per target: SPE with its interval, and the two baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = result["targets"]
    real = np.array([r["real"][metric] for r in t])
    spe = np.array([r["spe"][metric]["value"] for r in t])
    lo = np.array([r["spe"][metric]["lower"] for r in t])
    hi = np.array([r["spe"][metric]["upper"] for r in t])
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    ax.errorbar(real, spe, yerr=[spe - lo, hi - spe], fmt="o", ms=5, capsize=2, label="SPE (anchored) ± 90% interval")
    ax.scatter(real, [_value(r["calibration_score"][metric]) for r in t], marker="s", s=18, label="calibration score")
    ax.scatter(real, [_value(r["confidence"][metric]) for r in t], marker="^", s=18, label="confidence")
    for x, y, r in zip(real, spe, t):
        if abs(x - y) > 0.05 or r["name"].startswith("group"):
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lim = [min(real.min(), lo.min()) - 0.03, 1.0]
    ax.plot(lim, lim, color="0.5", lw=1)
    ax.set(xlim=lim, ylim=lim, xlabel=f"real {metric} of the shifted target", ylabel=f"estimated {metric}")
    ax.set_title(f"{result['dataset']} seed {result['seed']}: shifted copies of extra_test", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--figure", default=None, help="PNG for the first file's run")
    p.add_argument("--metrics", nargs="+", default=None, help="summary rows of these metrics only (default: all)")
    a = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in a.files]
    for r in results:  # score with the current estimators (the raw measurements are what was measured)
        r.update(shift_scores(r))
    print(tables(results, a.metrics))
    if a.figure:
        figure(results[0], a.figure)


if __name__ == "__main__":
    main()
