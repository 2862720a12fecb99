"""The demo's numbers over seeds: what a user running ``bash scripts/demo.sh`` may see instead of one run's digits.

Runs ``spe-lightning fit --config configs/synthetic.yaml`` (the demo, no download: SPE_NO_DOWNLOAD=1) once per
training seed (``--seed_everything``; the data and SPE's own seed stay the config's), records every target's
estimate, interval and truth per metric in ``benchmarks/results/demo_spread.json`` and prints the markdown table
(mean and min–max over seeds, the largest error, the mean interval width, how often the truth was inside).

    python benchmarks/demo_spread.py                       # seeds 0 1 2, writes the JSON, prints the table
    python benchmarks/demo_spread.py --table-only          # the table of the stored JSON

The learned reverse step's fitted weights go to a fit cache private to this script (the same references and
SPE seed in every run, so later seeds reuse the first seed's fit, as a user's re-run would). Times are wall-clock
on the machine named in the JSON, with its load average: compare them only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic.yaml"
OUT = REPO / "benchmarks" / "results" / "demo_spread.json"
TABLE_METRICS = ("dice", "iou", "hd95")


def run_seed(seed: int, root: Path) -> dict[str, Any]:
    """One demo fit with ``seed_everything=seed``; estimates, intervals and truths per target and metric."""
    from spe_lightning.cli import cli

    folder = root / f"seed{seed}"
    start = time.perf_counter()
    cli(
        [
            "fit",
            "--config",
            str(CONFIG),
            f"--seed_everything={seed}",
            f"--trainer.default_root_dir={folder}",
            f"--trainer.logger.init_args.save_dir={folder}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    seconds = time.perf_counter() - start
    (path,) = folder.rglob("spe_report.json")
    report = json.loads(path.read_text())
    targets: dict[str, dict[str, Any]] = {}
    for t, est in report["estimates"].items():
        targets[t] = {
            m: {
                "estimate": e.get("value"),
                "lower": e.get("lower"),
                "upper": e.get("upper"),
                "true": (report.get("true") or {}).get(t, {}).get(m),
                "outside_calibrated_range": e.get("outside_calibrated_range"),
                "nearest_set_distance": e.get("nearest_set_distance"),
            }
            for m, e in est.items()
        }
    return {"seed": seed, "seconds": round(seconds, 1), "targets": targets}


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def table(result: dict[str, Any], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """Markdown: per target and metric, the estimate's and the truth's mean [min–max] over seeds, the largest
    |estimate − truth|, the mean interval width and the seeds whose interval held the truth."""
    runs = result["runs"]
    lines = [
        f"Demo (configs/synthetic.yaml) over training seeds {[r['seed'] for r in runs]}: mean [min–max]",
        "",
        "| target | metric | estimate | true | max abs error | interval width (mean) | truth inside |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in runs[0]["targets"]:
        for m in metrics:
            rows = [r["targets"][t].get(m) for r in runs if m in r["targets"].get(t, {})]
            rows = [x for x in rows if x and x["estimate"] is not None]
            if not rows:
                continue
            est = [x["estimate"] for x in rows]
            true = [x["true"] for x in rows if x["true"] is not None]
            err = [abs(x["estimate"] - x["true"]) for x in rows if x["true"] is not None]
            width = [x["upper"] - x["lower"] for x in rows if x["upper"] is not None and x["lower"] is not None]
            inside = sum(1 for x in rows if x["true"] is not None and x["lower"] <= x["true"] <= x["upper"])
            d = 1 if m == "hd95" else 3

            def span(v: list[float]) -> str:
                return "n/a" if not v else f"{_f(sum(v) / len(v), d)} [{_f(min(v), d)}–{_f(max(v), d)}]"  # noqa: B023

            lines.append(
                f"| {t} | {m} | {span(est)} | {span(true)} | {_f(max(err) if err else None, d)} "
                f"| {_f(sum(width) / len(width) if width else None, d)} | {inside}/{len(rows)} |"
            )
    m = result["machine"]
    times = ", ".join(f"seed {r['seed']} {r['seconds']:.0f} s" for r in runs)
    lines += [
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']} ({m['torch_threads']} thread(s)), load "
        f"average {m['load_before']} before the runs and {m.get('load_after')} after (other work shared the machine); "
        f"{times} "
        "(later seeds reuse the first one's fitted reverse step).",
        "Made by `python benchmarks/demo_spread.py` (`--table-only` prints this table from the JSON).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table-only", action="store_true", help="print the table of the stored JSON")
    a = p.parse_args(argv)
    if a.table_only:
        print(table(json.loads(Path(a.out).read_text())))
        return
    os.environ["SPE_NO_DOWNLOAD"] = "1"  # as scripts/demo.sh
    import torch

    import spe_lightning

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "spe_lightning": spe_lightning.__version__,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="spe_demo_spread.") as tmp:
        os.environ["SPE_CACHE_DIR"] = str(Path(tmp) / "fit_cache")
        runs = [run_seed(s, Path(tmp)) for s in a.seeds]
    machine["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result = {"config": str(CONFIG.relative_to(REPO)), "seeds": a.seeds, "machine": machine, "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
