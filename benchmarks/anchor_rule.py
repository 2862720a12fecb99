"""Could the data choose between the anchored estimate and the paper's G(pseudo), per run?

Issue 14 asked to let each run decide. The only labelled evidence a run has about its targets is
its calibration pairs (subsets and shifted copies of the calibration split: development data). On
a pair, the paper's estimate misses by the anchored miss plus a constant, ``c = G(p_c) - r_c``
(G's residual at the calibration set), so the rule is: use the paper's G when that constant
lowers the pairs' mean absolute miss. Printed per recorded shift run: ``c``, both pair MAEs, the
choice, and the Dice MAE over the synthetic shifts (and another site's error) of anchored, paper
and the chosen rule, all on the same targets.

    python benchmarks/anchor_rule.py benchmarks/results/select_*.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from spe_lightning.benchmarking import shift_scores
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series


def choose(result: dict) -> tuple[float, float, float, bool]:
    """``(c, anchored pair MAE, paper pair MAE, use paper)`` for a run's first segmenter (Dice)."""
    seg = next(iter(result["shift_raw"]))
    raw, records = result["shift_raw"][seg], result["records"][seg]
    pseudo, real = series(records, "pseudo", CALIBRATION, "dice"), series(records, "real", CALIBRATION, "dice")
    g, _ = fit_mapping("linear", pseudo, real, "dice")
    p_c, r_c = raw["calibration"]["pseudo"]["dice"], raw["calibration"]["real"]["dice"]
    base = float(g.predict([p_c])[0])
    c = base - r_c
    misses = np.array(
        [
            float(g.predict([p_c + p["d_pseudo"]["dice"]])[0]) - base - p["d_real"]["dice"]
            for p in raw["pairs"]
            if p["d_pseudo"].get("dice") is not None and p["d_real"].get("dice") is not None
        ]
    )
    anchored, paper = float(np.mean(np.abs(misses))), float(np.mean(np.abs(misses + c)))
    return c, anchored, paper, paper < anchored


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    files = ap.parse_args().files
    print(
        "| run | c | pair MAE anchored | pair MAE paper | choice | MAE anchored | MAE paper | MAE chosen "
        + "| site error anchored / chosen |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    pooled: dict[str, list[float]] = defaultdict(list)
    for f in files:
        result = json.load(open(f))
        c, pa, pp, use_paper = choose(result)
        errs: dict[str, list[float]] = defaultdict(list)
        for row in shift_scores(result)["targets"]:
            real = row["real"]["dice"]
            a, p = row["spe"]["dice"]["value"], row["spe_paper"]["dice"]["value"]
            if None in (real, a, p):
                continue
            chosen = p if use_paper else a
            if row["site"]:
                errs["site"].append(f"{a - real:+.3f} / {chosen - real:+.3f}")
                continue
            errs["anchored"].append(abs(a - real))
            errs["paper"].append(abs(p - real))
            errs["chosen"].append(abs(chosen - real))
        for k in ("anchored", "paper", "chosen"):
            pooled[k] += errs[k]
        site = "; ".join(errs["site"]) or ""
        print(
            f"| {f.rsplit('/', 1)[-1]} | {c:+.3f} | {pa:.4f} | {pp:.4f} | {'paper' if use_paper else 'anchored'} | "
            f"{np.mean(errs['anchored']):.4f} | {np.mean(errs['paper']):.4f} | {np.mean(errs['chosen']):.4f} | {site} |"
        )
    print(
        f"| all | | | | | {np.mean(pooled['anchored']):.4f} | {np.mean(pooled['paper']):.4f} "
        f"| {np.mean(pooled['chosen']):.4f} | |"
    )


if __name__ == "__main__":
    main()
