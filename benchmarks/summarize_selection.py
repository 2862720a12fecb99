"""Label-free checkpoint selection and alert quality from `spe-lightning benchmark shift` results.

python benchmarks/summarize_selection.py benchmarks/results/shift_jsrt_seed*.json

Works on results written before ``--select-every`` existed (then only ``extra_test`` is selected
over checkpoints; the alerts use the final-weights shifted targets). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spe_lightning.benchmarking import selection_scores


def _pool(qs: list[dict]) -> str:
    tp, na, nc = (sum(q[k] for q in qs) for k in ("true_alerts", "alerts", "crossings"))
    p = "n/a" if not na else f"{tp / na:.2f}"
    r = "n/a" if not nc else f"{tp / nc:.2f}"
    return f"{p} | {r} | {tp}/{na} | {tp}/{nc}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    a = ap.parse_args()
    sels = []
    for path in a.results:
        res = json.loads(Path(path).read_text())
        sels.append((Path(path).stem, res.get("selection") or selection_scores(res)))
    print("| run | target | oracle Dice | SPE regret | SPE running (ModelCheckpoint) regret | validation regret |")
    print("|---|---|---|---|---|---|")
    for name, sel in sels:
        for t, r in sel["targets"].items():
            cells = [f"{r[k]['regret']:.4f} (ep {r[k]['epoch']})" if r[k]["regret"] is not None else "n/a"
                     for k in ("spe", "spe_running", "validation")]  # fmt: skip
            print(f"| {name} | {t} | {r['oracle']['real']:.3f} | " + " | ".join(cells) + " |")
    for scope in ("all", "shifted", "sites"):
        vals = {k: [s["summary"][scope][k] for _, s in sels if s["summary"][scope][k] is not None]
                for k in ("spe", "spe_running", "validation")}  # fmt: skip
        if any(vals.values()):
            cells = ", ".join(f"{k} {np.mean(v):.4f}" for k, v in vals.items() if v)
            print(f"\nmean regret over {scope} targets and runs: {cells}")
    print("\n| alert on | precision | recall | true/alerts | true/crossings |\n|---|---|---|---|---|")
    for on in ("estimate", "lower"):
        qs = [s["alerts"][on] for _, s in sels if "alerts" in s]
        if qs:
            print(f"| {on} | {_pool(qs)} |")


if __name__ == "__main__":
    main()
