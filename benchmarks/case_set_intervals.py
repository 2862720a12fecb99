"""Per-case intervals that carry the set estimate's uncertainty (issue 27): coverage and width before and after.

One run per task and seed, the way a user gets per-case rows: a fit with ``SPECallback(quality_regressor=True,
case_set_uncertainty=False)``, then ``SPEEstimator.estimate`` on each run target (its masks only score the
result). Each target's rows are scored as the per-case map gives them (``cases_only``) and widened by SPE's own
Dice interval (``with_set``: :func:`spe_lightning.percase.set_agreement.with_set_uncertainty`, the product's
default). Per target: the rows' 90% coverage, median width, MAE and bias against the real per-case Dice,
SPE's set estimate and interval, the widening applied.

Tasks:

- ``demo`` (development): the demo's model and phantoms (configs/synthetic.yaml), targets ``target`` and
  ``target_noisy``; training seeds 0, 1, 2. **Decision rule, written before any run:** the widening
  becomes the default unless on some development target its median width exceeds 0.4 (issue 27's width cap)
  — widening can only raise coverage, so what it may cost is width.
- ``jsrt_lungs_covid`` (final numbers, never chosen on): JSRT lungs (class 1) trained on ``train``,
  calibration ``test``, target covid_cxr; 30 epochs, lr 1e-3 (configs/jsrt.yaml's model).
- ``busi`` (final numbers): BUSI lesion, target ``extra_test``; 30 epochs, lr 1e-3.

    python benchmarks/case_set_intervals.py --task demo --seeds 0 1 2
    python benchmarks/case_set_intervals.py --task jsrt_lungs_covid --seeds 0
    python benchmarks/case_set_intervals.py --table        # every stored task's table

Results: ``benchmarks/results/case_set_intervals_<task>.json`` (``--out`` for another file, e.g. more seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "benchmarks" / "results"
TASKS = ("demo", "jsrt_lungs_covid", "busi")


def _task(task: str) -> tuple[Any, Any, int]:
    """(data module, model, epochs) of a task, built after seeding."""
    from spe_lightning.data import FolderSegmentationDataModule, SyntheticShapesDataModule
    from spe_lightning.models import SegmentationModel

    if task == "demo":
        dm = SyntheticShapesDataModule(n_train=96, n_val=32, n_target=32, size=64, batch_size=4)
        return dm, SegmentationModel(channels=(8, 16, 32), strides=(2, 2), lr=0.003), 8
    if task == "jsrt_lungs_covid":
        dm = FolderSegmentationDataModule(
            str(SHARED / "jsrt"),
            class_index=1,
            image_size=128,
            batch_size=8,
            target_splits=[],
            extra_targets={"covid_cxr": str(SHARED / "covid_cxr")},
        )
        return dm, SegmentationModel(lr=1e-3), 30
    if task == "busi":
        dm = FolderSegmentationDataModule(str(SHARED / "busi"), class_index=1, image_size=128, batch_size=8)
        return dm, SegmentationModel(lr=1e-3), 30
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")


def score_rows(rows: list[Any]) -> dict[str, Any]:
    """Coverage, median width, MAE and bias of per-case rows against their real Dice."""
    keep = [r for r in rows if r.estimated_dice is not None and r.real_dice is not None]
    est = np.array([r.estimated_dice for r in keep], float)
    real = np.array([r.real_dice for r in keep], float)
    lo = np.array([r.estimated_dice_lower for r in keep], float)
    hi = np.array([r.estimated_dice_upper for r in keep], float)
    return {
        "n": len(keep),
        "coverage": float(np.mean((lo <= real) & (real <= hi))),
        "median_width": float(np.median(hi - lo)),
        "mae": float(np.mean(np.abs(est - real))),
        "bias": float(np.mean(est - real)),
    }


def run(task: str, seed: int, workdir: Path, styling: str | None = None) -> dict[str, Any]:
    """One fit of ``task`` with ``seed`` (``styling``: SPE's restyling recipe, None: its default); each run
    target's rows scored both ways."""
    import lightning.pytorch as pl

    from spe_lightning import SPECallback, SPEEstimator
    from spe_lightning.percase.set_agreement import with_set_uncertainty
    from spe_lightning.testing import tiny_trainer

    pl.seed_everything(seed)
    dm, model, epochs = _task(task)
    log_dir = workdir / f"{task}_s{seed}"
    extra = {} if styling is None else {"styling": styling}
    cb = SPECallback(verbose=False, quality_regressor=True, case_set_uncertainty=False, log_dir=str(log_dir), **extra)
    # Lightning's default sanity steps kept (they draw from the RNG): the stored runs had them
    trainer = tiny_trainer(workdir / "root", epochs, [cb], num_sanity_val_steps=2)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - start
    est = SPEEstimator.load(log_dir / "spe_estimator.pt")
    out: dict[str, Any] = {"seed": seed, "epochs": epochs, "fit_s": round(fit_s, 1), "targets": {}}
    sites = (est.quality or {}).get("sites") or {}
    if sites:  # the per-case rule the run chose on its development folds: signals, the map's shape, their MAEs
        out["per_case_rule"] = {k: sites.get(k) for k in ("rule", "shape", "scores")}
    for name, data in dm.spe_datasets()["target"].items():
        res = est.estimate(trainer.lightning_module, data, name=name)
        dice = res.estimates["dice"]
        widened, reach = with_set_uncertainty(res.cases, dice.lower, dice.upper)
        out["targets"][name] = {
            "spe": {
                "value": dice.value,
                "lower": dice.lower,
                "upper": dice.upper,
                "styled_anchor": dice.styled_anchor,
                "distance": dice.distance,
                "pairs_distance": dice.pairs_distance,
                "outside_calibrated_range": dice.outside_calibrated_range,
                "nearest_set_distance": dice.nearest_set_distance,
            },
            "reach": reach,
            "cases_only": score_rows(list(res.cases)),
            "with_set": score_rows(widened),
            "rows": [
                {
                    k: r.to_dict().get(k)
                    for k in ("id", "estimated_dice", "estimated_dice_lower", "estimated_dice_upper", "real_dice")
                }
                for r in res.cases
            ],
        }
    return out


def ranking(rows: list[dict[str, Any]], cut: float = 0.7) -> tuple[float, float | None]:
    """Spearman of the rows' estimated with their real Dice, and the AUROC of flagging real Dice < ``cut`` by a
    low estimate (None when every case is on one side of the cut)."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    keep = [r for r in rows if r["estimated_dice"] is not None and r["real_dice"] is not None]
    est = np.array([r["estimated_dice"] for r in keep], float)
    bad = np.array([r["real_dice"] < cut for r in keep])
    rho = float(spearmanr(est, [r["real_dice"] for r in keep]).statistic)
    auroc = float(roc_auc_score(bad, -est)) if 0 < bad.sum() < len(bad) else None
    return rho, auroc


def table(result: dict[str, Any]) -> str:
    """Markdown: per seed and target, SPE's set interval and the rows' coverage / median width / MAE both ways."""
    lines = [
        f"Task `{result['task']}` (per-case 90% intervals; {result['level_note']})",
        "",
        "| seed | target | SPE set Dice [interval] | mean real Dice | rows' bias | cases only: coverage / median width "
        "| with the set's uncertainty: coverage / median width | MAE | Spearman | AUROC (Dice < 0.7) | per-case map |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        chosen = r.get("per_case_rule") or {}  # runs recorded before it: not known
        rule = "n/a" if not chosen.get("rule") else "+".join(chosen["rule"]) + f" ({chosen.get('shape') or 'linear'})"
        for name, t in r["targets"].items():
            s, a, b = t["spe"], t["cases_only"], t["with_set"]
            spe = "n/a" if s["value"] is None else f"{s['value']:.3f} [{s['lower']:.3f}, {s['upper']:.3f}]"
            real = [row["real_dice"] for row in t["rows"] if row["real_dice"] is not None]
            true = f"{sum(real) / len(real):.3f}" if real else "n/a"
            rho, auroc = ranking(t["rows"])
            lines.append(
                f"| {r['seed']} | {name} | {spe} | {true} | {a['bias']:+.3f} | {a['coverage']:.3f} / "
                f"{a['median_width']:.3f} | {b['coverage']:.3f} / {b['median_width']:.3f} | {a['mae']:.3f} "
                f"| {rho:.3f} | {'n/a' if auroc is None else f'{auroc:.3f}'} | {rule} |"
            )
    lines += ["", f"Made by `{result['command']}`; `python benchmarks/case_set_intervals.py --table` prints it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None, help="default: results/case_set_intervals_<task>.json")
    p.add_argument("--table", action="store_true", help="print the table of every stored result file")
    p.add_argument("--keep", type=Path, default=None, help="keep each run's folder (reports, estimator) here")
    p.add_argument("--styling", default=None, help="SPE's restyling recipe (default: SPEConfig's)")
    a = p.parse_args(argv)
    if a.table:
        for path in sorted(RESULTS.glob("case_set_intervals_*.json")):
            print(f"`{path.name}`:", table(json.loads(path.read_text())), "\n", sep="\n")
        return
    os.environ.setdefault("SPE_NO_DOWNLOAD", "1")
    load_before = list(os.getloadavg())
    if a.keep is not None:
        runs = [run(a.task, s, a.keep, a.styling) for s in a.seeds]
    else:
        with tempfile.TemporaryDirectory(prefix="spe_case_set.") as tmp:
            runs = [run(a.task, s, Path(tmp), a.styling) for s in a.seeds]
    result = {
        "task": a.task,
        "command": f"python benchmarks/case_set_intervals.py --task {a.task} --seeds {' '.join(map(str, a.seeds))}"
        + (f" --styling {a.styling}" if a.styling else "")
        + (f" --out {a.out}" if a.out else ""),
        "level_note": "the per-case map's level and SPE's own, 0.9; rows scored against their real Dice",
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = a.out or RESULTS / f"case_set_intervals_{a.task}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
