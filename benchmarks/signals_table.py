"""The label-free signals of issue 23 beside SPE, from `spe-lightning benchmark shift` results.

python benchmarks/signals_table.py benchmarks/results/signals_jsrt_heart_seed0.json [--rescore]

Per result: Dice MAE on the synthetic shifted targets (coverage and median width where a row has an interval),
each other site's error on its own (a final number, never used to choose), each signal's error on the
calibration pairs (held out by family where the signal is fitted on pairs), the all-signal combination (item 4)
and the new signals' seconds as a share of SPE's. ``--rescore`` recomputes the scores from the stored raw
measurements with the current code (``shift_scores``, ``pair_errors``, ``all_signal_combination``) and writes
them back into the file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spe_lightning.benchmarking import all_signal_combination, all_signal_rows, pair_errors, shift_scores

ROWS = (
    "spe",
    "spe_without_styled",
    "spe_paper",
    "calibration_score",
    "confidence",
    "soft_dice_confidence",
    "styled_calibration_score",
    "agreement",
    "quality_regressor",
    "spe_combined",
    "all_signals",
)


def rescore(result: dict[str, Any]) -> dict[str, Any]:
    """The scores of ``result`` recomputed from its raw measurements by the current code."""
    result.update(shift_scores(result))
    result["pair_errors"] = pair_errors(result)
    result["all_signals"] = all_signal_combination(result)
    all_signal_rows(result)
    return result


def _f(v: Any, d: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def table(result: dict[str, Any]) -> str:
    """Markdown tables of one result."""
    dice = result["summary"]["dice"]
    sites = result.get("sites", {})
    errs = result.get("pair_errors", {})
    head = "| row | Dice MAE, shifted targets (n) | coverage / median width | held-out error on pairs (n) |"
    head += "".join(f" {s} error |" for s in sites)
    lines = [head, "|---|---|---|---|" + "---|" * len(sites)]
    for row in ROWS:
        s = dice.get(row)
        if not isinstance(s, dict):
            continue
        cov = f"{s['coverage']:.2f} / {s['median_width']:.3f}" if "coverage" in s else ""
        pe = errs.get(row)
        pair = f"{pe['mae']:.3f} ({pe['n']})" if isinstance(pe, dict) and "mae" in pe else ""
        cells = [f"| {row} | {_f(s['mae'])} ({s['n']}) | {cov} | {pair} |"]
        for site in sites:
            t = next(r for r in result["targets"] if r["name"] == site)
            e = (t.get(row) or {}).get("dice")
            v = e["value"] if isinstance(e, dict) else e
            real = t["real"].get("dice")
            cells.append(f" {_f(None if v is None or real is None else v - real, 3)} |")
        lines.append("".join(cells))
    combo = result.get("all_signals")
    if combo:
        w = ", ".join(f"{s} {x:.2f}" for s, x in zip(combo["signals"], combo["weights"]))
        lines += [
            "",
            f"all_signals: weights {w}; held-out MAE on {len(combo['pairs'])} shifted pairs "
            f"{combo['heldout_mae']:.3f} vs SPE {combo['spe_heldout_mae']:.3f}; half-width {combo['half_width']:.3f}; "
            f"{'beats' if combo['adopted'] else 'does not beat'} SPE in this run (not adopted: needs several runs).",
        ]
    t = result["timing"]
    sig = t.get("signals_s") or {}
    first = result["records"][result["segmenters"][0]]
    per_ckpt = sum(r["seconds"] for r in first) / max(1, len(first))
    n_targets = len(result["targets"])
    if sig:
        lines += [
            "",
            f"benchmark's signal work: styled pairs {sig.get('styled_pairs', 0):.1f}s for {n_targets} targets "
            f"({sig.get('styled_pairs', 0) / max(1, n_targets):.1f}s each; one SPE checkpoint {per_ckpt:.1f}s), "
            f"agreement from the weight snapshots {sig.get('agreement', 0):.1f}s",
        ]
    prod = t.get("product_signals_s")
    if prod:
        share = 100 * sum(prod.values()) / max(t["product_spe_s"], 1e-9)
        lines.append(
            "product's signal work in the same run: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in prod.items())
            + f" = {share:.1f}% of SPE's {t['product_spe_s']:.0f}s"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("--rescore", action="store_true", help="recompute the scores and write them back")
    a = p.parse_args()
    for path in a.results:
        result = json.loads(Path(path).read_text())
        if a.rescore:
            result = rescore(result)
            Path(path).write_text(json.dumps(result, indent=2))
        print(f"\n{path} ({result['dataset']}, class {result['class_index']}, seed {result['seed']})\n")
        print(table(result))


if __name__ == "__main__":
    main()
