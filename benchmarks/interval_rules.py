"""Choose the interval rule on development data: the labelled calibration pairs.

Each recorded shift run holds the calibration pairs its run measured at fit end (calibration =
the test split, i.e. development data; no extra_test, shifted copy or other site is read). Held
out one pair family at a time (a shift family, or all random subsets together), the interval model
is fitted on the other pairs and asked to cover the held-out pair's real difference. Printed per
rule (``fitted``: the scale fitted per run; ``s0=...``: the proportional scale ``s0 + |move|``):
coverage of the 90% interval and its median, mean and max width, over all runs' pairs.

    python benchmarks/interval_rules.py benchmarks/results/select_*.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, pair_family
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series


def _rules(s0_values: list[float]) -> dict[str, dict]:
    """Rule name -> keyword arguments of ``fit_interval_model``."""
    rules = {"fitted": {"rule": "fitted"}, "fitted, G's move only": {"rule": "fitted", "move": "g"}}
    rules.update({f"s0={s:g}": {"rule": "proportional", "s0": s} for s in s0_values})
    return rules


def held_out(result: dict, s0_values: list[float], level: float = 0.9, metric: str = "dice") -> dict:
    """Per rule: lists of (covered, width) over held-out pairs of every segmenter of one result."""
    rules = _rules(s0_values)
    out: dict[str, list[tuple[bool, float, float]]] = {r: [] for r in rules}
    for seg, raw in result["shift_raw"].items():
        records = result["records"][seg]
        pseudo, real = series(records, "pseudo", CALIBRATION, metric), series(records, "real", CALIBRATION, metric)
        g, _ = fit_mapping("linear", pseudo, real, metric)
        p_c, r_c = raw["calibration"]["pseudo"].get(metric), raw["calibration"]["real"].get(metric)
        if g is None or p_c is None or r_c is None:
            continue
        pairs = raw["pairs"]
        for fam in sorted({pair_family(p["name"]) for p in pairs}):
            train = [p for p in pairs if pair_family(p["name"]) != fam]
            test = [p for p in pairs if pair_family(p["name"]) == fam]
            for rule, kwargs in rules.items():
                model = fit_interval_model(train, metric, g, p_c, **kwargs)
                for p in test:
                    dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
                    if dp is None or dr is None or model is None:
                        continue
                    e = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model)
                    if e["lower"] is None:
                        continue
                    covered = e["lower"] <= r_c + dr <= e["upper"]
                    out[rule].append((covered, e["upper"] - e["lower"], abs(e["value"] - r_c - dr)))
    return out


def _row(name: str, rule: str, v: list[tuple[bool, float, float]]) -> str:
    w = [x for _, x, _ in v]
    cov = np.mean([c for c, _, _ in v])
    mae = np.mean([a for _, _, a in v])
    return (
        f"| {name} | {rule} | {len(v)} | {mae:.4f} | {cov:.2f} | {np.median(w):.3f} | {np.mean(w):.3f} | {max(w):.3f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--s0", type=float, nargs="+", default=[0.01, 0.05, 0.1, 1.0, 100.0])
    a = ap.parse_args()
    pooled: dict[str, list[tuple[bool, float, float]]] = {r: [] for r in _rules(a.s0)}
    print("| file | rule | held-out pairs | MAE | coverage | median width | mean width | max width |")
    print("|---|---|---|---|---|---|---|---|")
    for f in a.files:
        for rule, v in held_out(json.load(open(f)), a.s0).items():
            pooled[rule] += v
            if v:
                print(_row(f.rsplit("/", 1)[-1], rule, v))
    for rule, v in pooled.items():
        if v:
            print(_row("all", rule, v))


if __name__ == "__main__":
    main()
