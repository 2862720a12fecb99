"""Interval widths of the demo (configs/synthetic.yaml) over seeds: the issue-23 stability target.

Reads the ``spe_report.json`` of demo runs made with different ``--seed_everything`` and prints, per
seed and target, the Dice estimate, truth and interval under the current rule (the report's) and
under the rule before issue 23 (conformal quantile of the pairs' normalised misses, no span of the
candidate moves, no distance widening), recomputed from the same records and pairs. Then each
target's mean width and the largest deviation from it (the target: within +-0.05).

    for s in 0 1 2; do spe-lightning fit --config configs/synthetic.yaml --seed_everything $s \\
        --trainer.default_root_dir /tmp/demo_s$s --trainer.logger.init_args.save_dir /tmp/demo_s$s; done
    python benchmarks/demo_widths.py /tmp/demo_s*/tb/version_0/spe_report.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np

from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series


def old_rule(report: dict, target: str, metric: str = "dice") -> dict:
    """The estimate of ``target`` under the interval rule before issue 23, from the report's records and pairs."""
    records = report["records"]
    x, y = series(records, "pseudo", CALIBRATION, metric), series(records, "real", CALIBRATION, metric)
    g, _ = fit_mapping(report["mapping"][metric]["kind"], x, y, metric)
    model = fit_interval_model(report["pairs"], metric, g, float(x[-1]), quantile="conformal")
    p_t = records[-1]["pseudo"][target][metric]
    return anchored_estimate(g, metric, p_t, float(x[-1]), float(y[-1]), report["level"], model, span=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--metric", default="dice")
    a = ap.parse_args()
    widths: dict[tuple[str, str], list[float]] = defaultdict(list)
    print("| run | target | true | rule | estimate [interval] | width | |error| | outside range | reliable |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in a.reports:
        report = json.load(open(path))
        for t, per_metric in report["estimates"].items():
            e, true = per_metric[a.metric], report["true"].get(t, {}).get(a.metric)
            said = e if e.get("value") is not None else e.get("withheld", e)
            for rule, est in (("current", said), ("before issue 23", old_rule(report, t, a.metric))):
                width = est["upper"] - est["lower"]
                widths[(t, rule)].append(width)
                err = "" if true is None else f"{abs(est['value'] - true):.3f}"
                print(
                    f"| {path.split('/')[2]} | {t} | {true:.3f} | {rule} | {est['value']:.3f} [{est['lower']:.3f}, "
                    f"{est['upper']:.3f}] | {width:.3f} | {err} | {e.get('outside_calibrated_range', '')} | "
                    f"{e.get('reliable', '')} |"
                )
    print("\n| target | rule | widths | mean | largest deviation from the mean |")
    print("|---|---|---|---|---|")
    for (t, rule), w in widths.items():
        dev = float(np.max(np.abs(np.asarray(w) - np.mean(w))))
        print(f"| {t} | {rule} | {', '.join(f'{v:.3f}' for v in w)} | {np.mean(w):.3f} | {dev:.3f} |")


if __name__ == "__main__":
    main()
