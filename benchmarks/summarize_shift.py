"""Aggregate `spe-lightning benchmark shift` results: mean ± std over seeds, per-target table, figure.

python benchmarks/summarize_shift.py benchmarks/results/shift_jsrt_seed*.json --figure docs/shift_jsrt.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from summarize_paper import _ms

from spe_lightning.benchmark import shift_scores


def _value(e: object) -> float | None:
    return e["value"] if isinstance(e, dict) else e  # type: ignore[index,return-value]


def tables(results: list[dict]) -> str:
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
    for m in results[0]["summary"]:
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
    a = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in a.files]
    for r in results:  # score with the current estimators (the raw measurements are what was measured)
        r.update(shift_scores(r))
    print(tables(results))
    if a.figure:
        figure(results[0], a.figure)


if __name__ == "__main__":
    main()
