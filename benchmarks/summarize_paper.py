"""Aggregate `spe-lightning benchmark paper` results: mean ± std over seeds, and figures.

python benchmarks/summarize_paper.py benchmarks/results/paper_jsrt_seed*.json --figure docs/paper_jsrt.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spe_lightning.benchmarking import paper_metrics
from spe_lightning.engine.records import CALIBRATION, fit_and_estimate, fit_mapping, series

METHODS = ("spe", "spe_paper", "spe_huber", "spe_isotonic", "calibration_score", "confidence", "quality_regressor")


def _ms(vals: list[float | None], digits: int = 3) -> str:
    v = np.asarray([x for x in vals if x is not None], dtype=float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


def _dice_range(result: dict, target: str) -> str:
    records = next(iter(result["records"].values())) if isinstance(result["records"], dict) else result["records"]
    v = [x for r in records if (x := r["real"].get(target, {}).get("dice")) is not None]
    return f"{min(v):.2f}–{max(v):.2f}" if v else "n/a"


def table(results: list[dict], target: str = "extra_test") -> str:
    """Markdown: per metric and method, Pearson r / MAE / final abs error as mean ± std over runs."""
    lines = [
        f"{results[0]['dataset']}: {len(results)} seed(s) "
        + ", ".join(str(r["seed"]) for r in results)
        + f"; real {target} Dice range per seed: "
        + ", ".join(_dice_range(r, target) for r in results),
        "",
        "| metric | method | Pearson r | MAE | final abs error | checkpoints scored per seed |",
        "|---|---|---|---|---|---|",
    ]
    for m in results[0]["metrics"]:
        extra = sorted({k for r in results for k in r["metrics"][m] if k.startswith("spe_") and k not in METHODS})
        for method in (*METHODS, *extra):  # extra: other segmenters' rows (spe_<name>)
            rows = [r["metrics"][m].get(method) for r in results]
            if any(row is None for row in rows):
                continue
            d = 1 if m == "hd95" else 3
            cells = [
                _ms([row[k] for row in rows], 3 if k == "pearson_r" else d)
                for k in ("pearson_r", "mae", "final_abs_error")
            ]
            # every method is scored on the checkpoints where all have a value: say how many that was
            scored = " / ".join(f"{row.get('n_scored', '?')} of {row.get('n_checkpoints', '?')}" for row in rows)
            lines.append(f"| {m} | {method} | " + " | ".join(cells) + f" | {scored} |")
    t = [r["timing"] for r in results]
    ratio = [x["spe_s"] / x["train_s"] for x in t]
    per_ckpt = [v for x in t for v in x["spe_s_per_checkpoint"].values()]
    lines.append("")
    lines.append(f"SPE overhead (SPE s / training s): {_ms(ratio, 2)}; SPE s per checkpoint: {_ms(per_ckpt, 1)}")
    return "\n".join(lines)


def figure(result: dict, path: str, metric: str = "dice", mapping: str = "linear") -> None:
    """Calibration pseudo vs real with G; estimated vs real target metric per checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = next(iter(result["records"].values()))
    x = series(records, "pseudo", CALIBRATION, metric)
    y = series(records, "real", CALIBRATION, metric)
    g, _ = fit_mapping(mapping, x, y, metric)
    est = fit_and_estimate(records, ["extra_test"], [metric], mapping)["by_checkpoint"]["extra_test"][metric]
    paper = fit_and_estimate(records, ["extra_test"], [metric], mapping, anchored=False)["by_checkpoint"]["extra_test"]
    real_t = series(records, "real", "extra_test", metric)
    epochs = [r["epoch"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.scatter(x, y, c=epochs, cmap="viridis", s=22, label="calibration checkpoints")
    grid = np.linspace(np.nanmin(x), np.nanmax(x), 100)
    a.plot(grid, g.predict(grid), color="C3", label=f"G ({mapping})")
    a.set(
        xlabel=f"pseudo {metric} (reverse segmentation)", ylabel=f"real {metric}", title="calibration: pseudo vs real"
    )
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(epochs, real_t, "o-", ms=3, label="real extra_test")
    b.plot(epochs, [np.nan if v is None else v for v in est], "s--", ms=3, label="SPE estimate (anchored, default)")
    b.plot(epochs, [np.nan if v is None else v for v in paper[metric]], "^:", ms=3, label="paper's G(pseudo)")
    b.plot(epochs, y, ":", color="0.5", label="calibration score")
    b.set(xlabel="epoch", ylabel=metric, title=f"{result['dataset']}: extra_test {metric} per checkpoint")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--figure", default=None, help="PNG for the first file's run")
    p.add_argument("--mapping", default="linear")
    p.add_argument("--target", default=None, help="score this target of the records (default: extra_test)")
    a = p.parse_args()
    results = [json.loads(Path(f).read_text()) for f in a.files]
    for r in results:  # score every run with the current estimators (the records are what was measured)
        paper_metrics(r)
        if a.target:
            r["metrics"] = r["metrics_by_target"][a.target]
    if a.target:
        print(f"target: {a.target} (across the recorded checkpoints)")
    print(table(results, a.target or "extra_test"))
    if a.figure:
        figure(results[0], a.figure, mapping=a.mapping)


if __name__ == "__main__":
    main()
