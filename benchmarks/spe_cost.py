"""What SPE costs next to training, and what its estimates are worth, at the callback's defaults.

For the demo task (embedded phantoms, configs/synthetic.yaml's model and data) and, when the data is
there, the JSRT config (configs/jsrt.yaml's model and data), one fit with SPECallback: training time
(the fit minus SPE's own time), SPE's time per evaluation and for the calibration pairs at fit end,
SPE's share of the fit, and each target's estimate [interval] against its true Dice. When the
reverse segmenter learns (the offline default), each task is fitted twice with a fresh fit cache:
the first run pays the segmenter's fit, the re-run (same data: a user's next run) loads it.

    python benchmarks/spe_cost.py                                  # demo task, callback defaults
    python benchmarks/spe_cost.py --jsrt ../shared/datasets/jsrt --epochs 8
    python benchmarks/spe_cost.py --spe max_references=172 support_size=64   # other settings
    python benchmarks/spe_cost.py --segmenter learned_propagation:pretrained=true  # the shipped weights, adapted

Times are wall-clock on this machine; run it on an otherwise idle machine (under load the training
steps are starved more than SPE's work and the ratios come out far too favourable).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import lightning.pytorch as pl

from spe_lightning import SPECallback
from spe_lightning.data import FolderSegmentationDataModule, SyntheticShapesDataModule
from spe_lightning.models import SegmentationModel
from spe_lightning.reverse import segmenter_from_text
from spe_lightning.testing import tiny_trainer


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def fit(task: str, data: Any, make_model: Any, epochs: int, spe_kwargs: dict[str, Any]) -> dict[str, Any]:
    pl.seed_everything(0)
    model = make_model()  # after seeding: every run trains the same model
    spe_kwargs = dict(spe_kwargs)
    if isinstance(spe_kwargs.get("segmenter"), str) and ":" in spe_kwargs["segmenter"]:
        spe_kwargs["segmenter"] = segmenter_from_text(spe_kwargs["segmenter"])  # a fresh, unfitted instance per run
    spe = SPECallback(verbose=False, **spe_kwargs)
    trainer = tiny_trainer(f"/tmp/spe_cost/{task}", epochs, [spe], num_sanity_val_steps=2)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    total = time.perf_counter() - start
    run = spe.run
    report = spe.report
    targets = {
        t: {"value": e.value, "lower": e.lower, "upper": e.upper, "true": e.true}
        for t, e in ((t, per_key["dice"]) for t, per_key in report.estimates.items())
    }
    return {
        "task": task,
        "epochs": epochs,
        "settings": {
            k: v
            for k, v in spe.config.to_dict().items()
            if k in ("working_size", "support_size", "max_references", "segmenter")
        },
        "segmenter": run.segmenter_spec()["name"],
        "segmenter_spec": run.segmenter_spec(),
        "fit_s": total,
        "train_s": total - run.seconds,
        "spe_s": run.seconds,
        "spe_per_evaluation_s": sum(r.seconds for r in run.records) / max(len(run.records), 1),
        "pairs_s": run.pairs_seconds,
        "segmenter_fit_s": run.segmenter_fit_seconds,
        "from_fit_cache": run.segmenter_from_cache,
        "targets": targets,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jsrt", default=None, help="JSRT root (heart, class 2) for the second task")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the JSRT fit (the demo always trains 8)")
    p.add_argument("--spe", nargs="*", default=[], metavar="KEY=VALUE", help="SPECallback settings (JSON values)")
    p.add_argument(
        "--segmenter",
        default=None,
        help="reverse segmenter as name:key=value,... (e.g. learned_propagation:pretrained=true)",
    )
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--print", dest="show", nargs="+", default=None, metavar="FILE", help="print the tables of saved runs"
    )
    a = p.parse_args()
    if a.show:
        for path in a.show:
            print(f"\n{path}")
            tables(json.loads(open(path).read()))
        return
    os.environ.setdefault("SPE_NO_DOWNLOAD", "1")
    spe_kwargs = {k: _value(v) for k, _, v in (s.partition("=") for s in a.spe)}
    if a.segmenter:
        spe_kwargs["segmenter"] = a.segmenter
    tasks = [
        (
            "demo",
            lambda: SyntheticShapesDataModule(n_train=96, n_val=32, n_target=32, size=64, batch_size=4),
            lambda: SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=0.003),
            8,
        )
    ]
    if a.jsrt:
        tasks.append(
            (
                "jsrt heart",
                lambda: FolderSegmentationDataModule(a.jsrt, class_index=2, image_size=128, batch_size=8),
                lambda: SegmentationModel(lr=1e-3),
                a.epochs,
            )
        )
    rows = []
    for task, make_data, make_model, epochs in tasks:
        with tempfile.TemporaryDirectory() as cache:  # a cold fit cache per task, then the re-run on it
            kwargs = {"fit_cache": cache, **spe_kwargs}
            rows.append(fit(task, make_data(), make_model, epochs, kwargs))
            if rows[-1]["segmenter_fit_s"] > 0:
                rows.append(fit(task, make_data(), make_model, epochs, kwargs))
    tables(rows)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=2)


def tables(rows: list[dict[str, Any]]) -> None:
    """Print the cost table and the estimates table of ``rows``."""
    print(
        "| task | run | epochs | segmenter | training s | SPE s | SPE / training | per evaluation s | pairs s "
        "(share of SPE) | segmenter fit s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        run = "re-run (fit cache)" if r.get("from_fit_cache") else "first"
        print(
            f"| {r['task']} | {run} | {r['epochs']} | {r['segmenter']} | {r['train_s']:.0f} | {r['spe_s']:.0f} | "
            f"{r['spe_s'] / r['train_s']:.2f} | {r['spe_per_evaluation_s']:.1f} | {r['pairs_s']:.0f} "
            f"({100 * r['pairs_s'] / max(r['spe_s'], 1e-9):.0f}%) | {r.get('segmenter_fit_s', 0.0):.0f} |"
        )
    print("\n| task | run | target | Dice estimate [90% interval] | true Dice | error |\n|---|---|---|---|---|---|")
    for r in rows:
        run = "re-run" if r.get("from_fit_cache") else "first"
        for t, e in r["targets"].items():
            if e["value"] is None:
                print(f"| {r['task']} | {run} | {t} | n/a | {e['true']} | |")
                continue
            err = "" if e["true"] is None else f"{e['value'] - e['true']:+.3f}"
            print(
                f"| {r['task']} | {run} | {t} | {e['value']:.3f} [{e['lower']:.3f}, {e['upper']:.3f}] | "
                f"{e['true'] if e['true'] is None else round(e['true'], 3)} | {err} |"
            )


if __name__ == "__main__":
    main()
