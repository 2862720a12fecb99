"""The per-case map's shape (issue 27): a straight line or a monotone map of the signals' stack, on one model.

One fit per task and seed with ``SPECallback(quality_regressor=True)``; the per-target calibration's inputs
(the regressor, the model's predictions, the calibration set and each run target's styled set) are taken where
the run passes them to :func:`spe_lightning.percase.site_fit.fit_sites`. Reported:

- ``development``: the run's own choice on its development folds (random halves of the calibration images,
  fitted on one half and its styled copies, scored on the other half's), every rule's held-out MAE; this is
  what the product chooses on;
- ``target`` (final numbers, never chosen on): on the run target's real per-case Dice, each product rule with
  each shape (MAE, bias, 90% coverage and median width of the per-case map, before the set's uncertainty is
  added), fitted as the product fits it (calibration cases and the target's styled pairs);
- ``bound``: the stack and a monotone map fitted on the target's own labels, scored in-sample: an optimistic
  reference for any map of these signals (one fitted without those labels is not expected to beat it); of
  regressor + confidence, and (``*_mirror``) with the model's mirror consistency too.

    python benchmarks/percase_shape.py --task busi --seeds 0 1
    python benchmarks/percase_shape.py --table

Results: ``benchmarks/results/percase_shape_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from case_set_intervals import TASKS, _task  # noqa: E402  (the same tasks, models and epochs)

RESULTS = Path(__file__).resolve().parent / "results"


def run(task: str, seed: int, workdir: Path) -> dict[str, Any]:
    """One fit; the development choice, each shape on the run target, and the in-sample bound."""
    import lightning.pytorch as pl
    from scipy.stats import spearmanr
    from sklearn.isotonic import IsotonicRegression
    from sklearn.metrics import roc_auc_score

    from spe_lightning import SPECallback, SPEEstimator
    from spe_lightning.percase import site_fit
    from spe_lightning.percase.mirror import MIRROR, mirror_consistency
    from spe_lightning.percase.score_map import design, fit_stack
    from spe_lightning.percase.sites import (
        INTERVAL_RULE,
        SHAPES,
        WIDTH_FACTOR,
        fit_site_calibration,
        heldout_errors,
        rule_name,
    )
    from spe_lightning.testing import tiny_trainer

    seen: dict[str, Any] = {}
    fit_sites = site_fit.fit_sites

    def capture(raw, predict, real_dice, calibration, styled, level, seed_, splits=3):  # noqa: ANN001
        seen.update(raw=raw, predict=predict, real_dice=real_dice, cal=calibration, styled=dict(styled), level=level)
        out = fit_sites(raw, predict, real_dice, calibration, styled, level, seed_, splits)
        seen["sites"] = out
        return out

    site_fit.fit_sites = capture  # the scorer imports it at fit time
    try:
        pl.seed_everything(seed)
        dm, model, epochs = _task(task)
        cb = SPECallback(verbose=False, quality_regressor=True, log_dir=str(workdir / f"{task}_s{seed}"))
        trainer = tiny_trainer(workdir / "root", epochs, [cb], num_sanity_val_steps=2)
        start = time.perf_counter()
        trainer.fit(model, datamodule=dm)
        fit_s = time.perf_counter() - start
    finally:
        site_fit.fit_sites = fit_sites
    if "sites" not in seen:
        raise RuntimeError("the run fitted no per-target per-case calibration (no styled pairs?).")
    est = SPEEstimator.load(workdir / f"{task}_s{seed}" / "spe_estimator.pt")

    def signals(data: Any) -> Any:
        masks, conf = seen["predict"](data)
        mirror = mirror_consistency(seen["predict"], data, masks)
        return site_fit._signals(seen["raw"], data, masks, conf, seen["real_dice"](masks, data.masks), mirror=mirror)

    cal = signals(seen["cal"])
    out: dict[str, Any] = {
        "seed": seed,
        "epochs": epochs,
        "fit_s": round(fit_s, 1),
        "development": {k: seen["sites"][k] for k in ("rule", "shape", "scores")},
        "targets": {},
    }
    for name, data in dm.spe_datasets()["target"].items():
        if name not in seen["styled"]:
            continue
        styled, target = signals(seen["styled"][name]), signals(est.cache(data, name))
        rows = {}
        for rule in site_fit.PRODUCT_RULES:
            for shape in SHAPES:
                site = fit_site_calibration(
                    cal,
                    styled,
                    rule,
                    level=seen["level"],
                    seed=seed,
                    interval=INTERVAL_RULE,
                    width_factor=WIDTH_FACTOR,
                    shape=shape,
                )
                e = heldout_errors(site, target)
                point, real = site.point(target.signals), np.asarray(target.real, float)
                e["bias"] = float(np.mean(point - real))
                # ranking: a monotone map's flat steps tie cases, which may cost rank statistics
                e["spearman"] = float(spearmanr(point, real).statistic)
                bad = real < 0.7
                e["auroc"] = float(roc_auc_score(bad, -point)) if 0 < bad.sum() < len(bad) else None
                rows[rule_name(rule, shape)] = e
        real = np.asarray(target.real, float)
        bound = {}
        for key, stacked in (("", ("regressor", "confidence")), ("_mirror", ("regressor", "confidence", MIRROR))):
            x = design(target.signals, stacked)
            score = x @ fit_stack(x, real)
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(score, real)
            bound[f"linear{key}"] = float(np.mean(np.abs(np.clip(score, 0, 1) - real)))
            bound[f"isotonic{key}"] = float(np.mean(np.abs(iso.predict(score) - real)))
        out["targets"][name] = {
            "n": len(real),
            "mean_real": float(real.mean()),
            "share_below_0.1": float((real < 0.1).mean()),
            "rules": rows,
            "bound": bound,
        }
    return out


def table(result: dict[str, Any]) -> str:
    """Markdown: per seed, the development MAEs (the choice in bold) and each rule on the target."""
    lines = [f"Task `{result['task']}` (per-case map before the set's uncertainty; 90% intervals)", ""]
    for r in result["runs"]:
        dev = r["development"]
        chosen = "+".join(dev["rule"]) + ("" if dev["shape"] == "linear" else f"/{dev['shape']}")
        for name, t in r["targets"].items():
            lines += [
                f"Seed {r['seed']}, target `{name}` ({t['n']} cases, mean real Dice {t['mean_real']:.3f}, "
                f"{t['share_below_0.1']:.0%} below 0.1); chosen on development folds: **{chosen}**",
                "",
                "| rule | development MAE | target MAE | bias | coverage | median width | Spearman | AUROC (< 0.7) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for rule, e in t["rules"].items():
                d = dev["scores"].get(rule, {}).get("mae")
                mark = "**" if rule == chosen else ""
                rank = [e.get(k) for k in ("spearman", "auroc")]  # runs recorded before they were: n/a
                rho, auroc = ("n/a" if v is None else f"{v:.3f}" for v in rank)
                lines.append(
                    f"| {mark}{rule}{mark} | {'n/a' if d is None else f'{d:.4f}'} | {e['mae']:.4f} | "
                    f"{e['bias']:+.3f} | {e['coverage']:.3f} | {e['median_width']:.3f} | {rho} | {auroc} |"
                )
            b = t["bound"]
            lines += [
                "",
                f"Bound (regressor + confidence fitted on the target's own labels, in-sample): linear "
                f"{b['linear']:.4f}, monotone {b['isotonic']:.4f}"
                + (  # runs recorded before the mirror signal have no such bound
                    f"; with the mirror consistency: linear {b['linear_mirror']:.4f}, monotone "
                    f"{b['isotonic_mirror']:.4f}."
                    if "isotonic_mirror" in b
                    else "."
                ),
                "",
            ]
    lines.append(f"Made by `{result['command']}`; `python benchmarks/percase_shape.py --table` prints it.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="busi")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--table", action="store_true", help="print the table of every stored result file")
    a = p.parse_args(argv)
    if a.table:
        for path in sorted(RESULTS.glob("percase_shape_*.json")):
            print(f"`{path.name}`:", table(json.loads(path.read_text())), "", sep="\n")
        return
    os.environ.setdefault("SPE_NO_DOWNLOAD", "1")
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="spe_shape.") as tmp:
        runs = [run(a.task, s, Path(tmp)) for s in a.seeds]
    result = {
        "task": a.task,
        "command": f"python benchmarks/percase_shape.py --task {a.task} --seeds {' '.join(map(str, a.seeds))}",
        "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "runs": runs,
    }
    out = RESULTS / f"percase_shape_{a.task}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
