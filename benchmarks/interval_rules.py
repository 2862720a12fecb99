"""Choose the interval scale floor ``s0`` on development data: the labelled calibration pairs.

Each recorded shift run holds the calibration pairs its run measured at fit end (calibration =
the test split, i.e. development data; no extra_test, shifted copy or other site is read). Held
out one pair family at a time (a shift family, or all random subsets together), the interval model
is fitted on the other pairs and asked to cover the held-out pair's real difference. Printed per
``s0``: coverage of the 90% interval and its median width, over all runs' pairs.

    python benchmarks/interval_rules.py benchmarks/results/shift_*.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series


def _family(name: str) -> str:
    return "subset" if name.startswith("subset") else name.rsplit("_", 1)[0]


def held_out(result: dict, s0_values: list[float], level: float = 0.9, metric: str = "dice") -> dict:
    """Per s0: lists of (covered, width) over held-out pairs of every segmenter of one result."""
    out: dict[float, list[tuple[bool, float]]] = {s: [] for s in s0_values}
    for seg, raw in result["shift_raw"].items():
        records = result["records"][seg]
        pseudo, real = series(records, "pseudo", CALIBRATION, metric), series(records, "real", CALIBRATION, metric)
        g, _ = fit_mapping("linear", pseudo, real, metric)
        p_c, r_c = raw["calibration"]["pseudo"].get(metric), raw["calibration"]["real"].get(metric)
        if g is None or p_c is None or r_c is None:
            continue
        pairs = raw["pairs"]
        for fam in sorted({_family(p["name"]) for p in pairs}):
            train = [p for p in pairs if _family(p["name"]) != fam]
            test = [p for p in pairs if _family(p["name"]) == fam]
            for s0 in s0_values:
                model = fit_interval_model(train, metric, g, p_c, s0=s0)
                for p in test:
                    dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
                    if dp is None or dr is None or model is None:
                        continue
                    e = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model)
                    if e["lower"] is None:
                        continue
                    out[s0].append((e["lower"] <= r_c + dr <= e["upper"], e["upper"] - e["lower"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--s0", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 1.0, 100.0])
    a = ap.parse_args()
    pooled: dict[float, list[tuple[bool, float]]] = {s: [] for s in a.s0}
    print("| file | s0 | held-out pairs | coverage | median width |\n|---|---|---|---|---|")
    for f in a.files:
        res = held_out(json.load(open(f)), a.s0)
        for s0, v in res.items():
            pooled[s0] += v
            if v:
                cov, wid = np.mean([c for c, _ in v]), np.median([w for _, w in v])
                print(f"| {f.rsplit('/', 1)[-1]} | {s0:g} | {len(v)} | {cov:.2f} | {wid:.3f} |")
    for s0, v in pooled.items():
        cov, wid = np.mean([c for c, _ in v]), np.median([w for _, w in v])
        print(f"| all | {s0:g} | {len(v)} | {cov:.2f} | {wid:.3f} |")


if __name__ == "__main__":
    main()
