"""Should a target's interval span the estimate anchored on its styled calibration set? Development data only.

SPE anchors an estimate on the calibration set: ``real_c + move(p_t - p_c)``. At fit end it also restyles the
calibration set like each target (docs/other_sites.md), a labelled set whose real score is known and which looks
more like the target: ``real_c + d_real_s + move(p_t - p_c - d_pseudo_s)`` is a second candidate, anchored there.

This reads ``styling_dev_pairs.json`` (``benchmarks/styling_dev.py --pairs``: train/test splits only; half A of
the test split plays the calibration set, half B clean and its 6 shift families x 3 severities the targets; one
model state, label fusion) and scores both anchors per task. The move is a slope through 0 fitted on the true
pairs of the *other* shift families (what SPE's pairs' slope does), so no target predicts itself. Printed per
task and recipe: each anchor's mean |error|, how often each is the closer one, how often the truth lies between
the two, and the mean distance between them (what spanning both costs in width).

    python benchmarks/styled_anchor_dev.py benchmarks/results/styling_dev_pairs.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from spe_lightning.engine.estimate import pair_family


def score(task: dict, recipe: str) -> dict[str, float]:
    """Both anchors' errors on one task's development targets, for one styling recipe."""
    targets = task["targets"]
    names = list(targets)
    cal, sty = [], []
    for n in names:
        others = [k for k in names if pair_family(k) != pair_family(n)]
        x = np.array([targets[k]["true"][0] for k in others])
        y = np.array([targets[k]["true"][1] for k in others])
        m = max(0.0, float(x @ y / (x @ x)))
        dp_t, dr_t = targets[n]["true"]
        dp_s, dr_s = targets[n][recipe]
        cal.append(m * dp_t - dr_t)
        sty.append(dr_s + m * (dp_t - dp_s) - dr_t)
    c, s = np.asarray(cal), np.asarray(sty)
    return {
        "n": len(names),
        "mae_calibration_anchor": float(np.mean(np.abs(c))),
        "mae_styled_anchor": float(np.mean(np.abs(s))),
        "styled_closer": float(np.mean(np.abs(s) < np.abs(c))),
        "truth_between": float(np.mean(np.sign(c) != np.sign(s))),
        "mean_gap": float(np.mean(np.abs(c - s))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", help="styling_dev_pairs.json")
    data = json.load(open(ap.parse_args().pairs))
    columns = ["task", "recipe", "n", "MAE calibration anchor", "MAE styled anchor", "styled closer"]
    columns += ["truth between", "mean gap"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for task, rows in data.items():
        recipes = [k for k in next(iter(rows["targets"].values())) if k != "true"]
        for recipe in recipes:
            r = score(rows, recipe)
            print(
                f"| {task} | {recipe} | {r['n']} | {r['mae_calibration_anchor']:.3f} | {r['mae_styled_anchor']:.3f} "
                f"| {r['styled_closer']:.2f} | {r['truth_between']:.2f} | {r['mean_gap']:.3f} |"
            )


if __name__ == "__main__":
    main()
