"""CPU seconds of the learned reverse step's fit, for several segmenter specs in one process.

Process CPU time (``time.process_time``, 1 torch thread by default) follows the work done far more closely
than wall time on a shared machine, so the ratios between rows hold under load; wall time is recorded beside
it. The fits run
one after another on JSRT's training images, the references ``reverse_sensitivity.py`` fits on. The first spec
is the baseline of ``cpu_ratio``.

    python benchmarks/reverse_fit_cost.py --out benchmarks/results/reverse_sensitivity_lodo_fit_cpu.json \\
        --specs learned_propagation:pretrained=true \\
                learned_propagation:pretrained=true,weights=/tmp/pt3/synth_busi_2500.pt \\
                learned_propagation:pretrained=true,weights=/tmp/pt3/synth_busi_2500.pt,adapt_steps=130 \\
                learned_propagation:pretrained=true,weights=/tmp/pt3/synth_busi_2500.pt,adapt_steps=190
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import reverse_sensitivity as rs
import torch


def measure(specs: list[str], dataset: str, n_query: int, shared: Path) -> list[dict]:
    """One row per spec: CPU and wall seconds of ``segmenter_from_text(spec).fit`` on the dataset's references."""
    base = rs.import_reverse()
    images, masks, _, _ = rs.load_dataset(dataset, shared, n_query, 64, 0)
    q_img, q_msk = torch.from_numpy(images)[:, None], torch.from_numpy(masks)[:, None].float()
    rows: list[dict] = []
    for spec in specs:
        seg = base.segmenter_from_text(spec)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        seg.fit(q_img, q_msk)
        row = {"segmenter": spec, "cpu_s": round(time.process_time() - cpu0, 2)}
        row["wall_s"] = round(time.perf_counter() - wall0, 2)
        row["cpu_ratio"] = round(row["cpu_s"] / rows[0]["cpu_s"], 3) if rows else 1.0
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--specs", nargs="+", required=True, help="segmenter specs; the first is the ratio's baseline")
    p.add_argument("--dataset", default="jsrt")
    p.add_argument("--n-query", type=int, default=172, help="references to fit on (JSRT's train split: 172)")
    p.add_argument("--shared", type=Path, default=rs.ROOT.parent / "shared")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU-time ratios that hold under load)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    load_before = list(os.getloadavg())
    rows = measure(a.specs, a.dataset, a.n_query, a.shared)
    meta = {
        "what": f"learned reverse step fit cost, {a.dataset}'s {a.n_query} references, fits one after another",
        "command": "python benchmarks/reverse_fit_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": a.threads,
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
    }
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
