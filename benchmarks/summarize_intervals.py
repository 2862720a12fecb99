"""SPE's interval rows of recorded shift/selection results, per file: the numbers issue 23 asks for.

Per file (the rows ``spe`` of ``targets``, as :func:`spe_lightning.benchmarking.shift_scores` wrote them):
Dice MAE, coverage and median width over the synthetic shift targets (extra_test and its shifted
copies: final numbers, never used to choose a rule), the number of metrics SPE declared unreliable
and of targets flagged outside the calibrated range, the largest hd95 interval end, and each other
site's (covid_cxr) |error|, whether the truth is inside and the width.

    python benchmarks/summarize_intervals.py benchmarks/results/select_*.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def summarize(result: dict, method: str = "spe") -> dict:
    """The numbers of one result (see the module docstring)."""
    rows = [r for r in result["targets"] if not r.get("site")]
    errs, cover, widths = [], [], []
    for r in rows:
        e, real = r[method].get("dice") or {}, r["real"].get("dice")
        if e.get("value") is None or real is None:
            continue
        errs.append(abs(e["value"] - real))
        cover.append(e["lower"] <= real <= e["upper"])
        widths.append(e["upper"] - e["lower"])
    unreliable = sorted({m for r in result["targets"] for m, e in r[method].items() if e.get("reliable") is False})
    outside = sum(bool((r[method].get("dice") or {}).get("outside_calibrated_range")) for r in result["targets"])
    hd = [(r[method].get("hd95") or {}).get("upper") for r in result["targets"]]
    out = {
        "dice_mae": float(np.mean(errs)),
        "coverage": float(np.mean(cover)),
        "median_width": float(np.median(widths)),
        "unreliable": unreliable,
        "outside": outside,
        "max_hd95_upper": max((h for h in hd if h is not None), default=None),
        "sites": {},
    }
    for r in result["targets"]:
        if r.get("site"):
            e, real = r[method].get("dice") or {}, r["real"]["dice"]
            out["sites"][r["name"]] = {
                "error": e["value"] - real,
                "inside": e["lower"] <= real <= e["upper"],
                "width": e["upper"] - e["lower"],
                "interval": (e["lower"], e["upper"]),
                "outside_calibrated_range": e.get("outside_calibrated_range"),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    print("| file | Dice MAE | coverage | median width | unreliable metrics | outside range | max hd95 upper | site: "
          "error, inside, [interval] width |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for f in a.files:
        s = summarize(json.load(open(f)))
        sites = "; ".join(
            f"{n}: {v['error']:+.3f}, {'yes' if v['inside'] else 'NO'}, [{v['interval'][0]:.3f}, "
            f"{v['interval'][1]:.3f}] {v['width']:.3f}"
            for n, v in s["sites"].items()
        )
        hd = "" if s["max_hd95_upper"] is None else f"{s['max_hd95_upper']:.1f}"
        print(
            f"| {f.rsplit('/', 1)[-1]} | {s['dice_mae']:.4f} | {s['coverage']:.2f} | {s['median_width']:.3f} | "
            f"{', '.join(s['unreliable']) or '-'} | {s['outside']} | {hd} | {sites} |"
        )


if __name__ == "__main__":
    main()
