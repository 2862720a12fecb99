"""Prediction-powered intervals with a few labelled target cases: coverage and width over random draws.

Per-case estimates come from the product's path: a model trained on ``ROOT/train`` (cached under
``--workdir``), an :class:`~spe_lightning.SPEEstimator` with label fusion over ``ROOT/train`` as references
and its per-case calibration on ``ROOT/test`` (as a finished run calibrates it), then
``SPEEstimator.estimate``'s per-case rows (``estimated_dice``) on each target. The targets' masks give each
case's real Dice, IoU, precision and recall; nothing is chosen on them. The rows are cached in
``results/ppi_cases_<dataset>.json`` so the draws can be rescored without retraining.

Targets: JSRT lungs -> covid_cxr; JSRT heart (class 2) -> extra_test and its 18 synthetic shifts
(:mod:`spe_lightning.engine.shifts`, severities 1-3, seed 0 as the shift benchmark); BUSI -> extra_test
and its shifts. Per target and k (10, 20, 40; below the target's size): ``--draws`` uniform random draws
of k labelled cases (:func:`~spe_lightning.percase.ppi.ppi_mean` beside the labelled-only interval), and as
many seeded draws of the suggested design (:func:`~spe_lightning.percase.ppi.stratified_design` +
:func:`~spe_lightning.percase.ppi.stratified_ppi_mean`). The method's settings (jackknife variance, strata
rule, uncertainty) were fixed on simulated targets (``synthetic``), never on these.

    python benchmarks/ppi_coverage.py collect --dataset jsrt_lungs   # -> results/ppi_cases_jsrt_lungs.json
    python benchmarks/ppi_coverage.py collect --dataset jsrt_heart
    python benchmarks/ppi_coverage.py collect --dataset busi
    python benchmarks/ppi_coverage.py score [--dataset NAME]         # -> results/ppi_coverage_<dataset>.json
    python benchmarks/ppi_coverage.py table                          # the markdown table of docs/few_labels.md
    python benchmarks/ppi_coverage.py synthetic                      # -> results/ppi_synthetic.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from _reference_model import train_reference_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
#: dataset -> (root, class index, epochs, targets: name -> (root, split))
DATASETS: dict[str, tuple[str, int, int, dict[str, tuple[str, str]]]] = {
    "jsrt_lungs": ("jsrt", 1, 30, {"covid_cxr": ("covid_cxr", "extra_test")}),
    "jsrt_heart": ("jsrt", 2, 30, {"extra_test": ("jsrt", "extra_test")}),
    "busi": ("busi", 1, 15, {"extra_test": ("busi", "extra_test")}),
}
#: targets whose 18 synthetic shifts are scored too
SHIFTED = {"jsrt_heart": "extra_test", "busi": "extra_test"}
KS = (10, 20, 40)
LEVEL = 0.9


def train(root: Path, class_index: int, epochs: int, seed: int, ckpt: Path) -> None:
    """Train the reference SegmentationModel on ``root/train`` (as benchmarks/percase_busi.py, any class)."""
    seconds = train_reference_model(root, ckpt, epochs, seed, class_index=class_index)
    print(f"trained {epochs} epochs in {seconds:.0f}s -> {ckpt}", flush=True)


def collect(dataset: str, workdir: Path, seed: int) -> dict[str, Any]:
    """Per-case rows of every target of ``dataset`` from ``SPEEstimator.estimate``, with the real metrics."""
    import torch

    from spe_lightning import SPEConfig, SPEEstimator
    from spe_lightning.data import FolderSegmentationDataset
    from spe_lightning.engine.metrics import per_item_metrics
    from spe_lightning.engine.predict import default_logits
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set
    from spe_lightning.estimator import FittedSPE, with_case_scorer
    from spe_lightning.models import SegmentationModel
    from spe_lightning.percase.labels import PPI_METRICS
    from spe_lightning.reverse import make_segmenter

    root_name, ci, epochs, targets = DATASETS[dataset]
    root = SHARED / root_name
    ckpt = workdir / f"{dataset}_e{epochs}_s{seed}.ckpt"
    if not ckpt.exists():
        train(root, ci, epochs, seed, ckpt)
    model = SegmentationModel.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    config = SPEConfig(segmenter="label_fusion", metrics=("dice",), support_size=64, working_size=128)
    est = SPEEstimator(FittedSPE(config, make_segmenter("label_fusion").spec()))
    est = est.with_reference_dataset(FolderSegmentationDataset(root, "train", ci, 128))
    est = with_case_scorer(est, model, est.rca_scorer(), FolderSegmentationDataset(root, "test", ci, 128))
    cal = est.cases
    print(f"{dataset}: per-case calibration on test: Spearman {cal['spearman']:.3f}", flush=True)
    sets: dict[str, tuple[Any, list[str]]] = {}
    for name, (r, split) in targets.items():
        ds = FolderSegmentationDataset(SHARED / r, split, ci, 128)
        data = est.cache(ds, name=name)
        sets[name] = (data, list(ds.ids))
        if SHIFTED.get(dataset) == name:
            for fam in SHIFT_FAMILIES:
                for sev in (1, 2, 3):
                    shifted = shift_set(data, fam, sev, seed=seed * 100_000)  # as benchmark.shift_targets
                    sets[shifted.name] = (shifted, list(ds.ids))
    out: dict[str, Any] = {
        "dataset": dataset,
        "class_index": ci,
        "epochs": epochs,
        "seed": seed,
        "calibration_spearman": cal["spearman"],
        "targets": {},
    }
    for name, (data, ids) in sets.items():
        start = time.perf_counter()
        # the per-case rows of SPEEstimator.estimate without its set-level reverse step (same code)
        rows = est.case_estimates(model, data)
        masks, _ = est.predict(model, data, torch.device("cpu"), default_logits)  # the masks estimate() predicts
        real = per_item_metrics(masks, data.masks, PPI_METRICS, select=lambda m: m > 0)
        out["targets"][name] = {
            "n": len(ids),
            "cases": [
                {
                    "id": ids[i],
                    "estimated_dice": row["estimated_dice"],
                    "estimated_dice_lower": row["estimated_dice_lower"],
                    "estimated_dice_upper": row["estimated_dice_upper"],
                    **{f"real_{m}": float(real[m][i]) for m in PPI_METRICS},
                }
                for i, row in enumerate(rows)
            ],
        }
        assert np.allclose([c["real_dice"] for c in rows], real["dice"].numpy(), atol=1e-6)
        print(f"  {name}: {len(ids)} cases, {time.perf_counter() - start:.0f}s", flush=True)
    return out


def _summary(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def score_target(rows: list[dict[str, Any]], k: int, draws: int, seed: int) -> dict[str, Any]:
    """Coverage and widths of PPI, the labelled-only and the suggested-design intervals over ``draws`` draws
    (each draw labels the same cases for every metric)."""
    from spe_lightning.percase.labels import PPI_METRICS, metric_predictions
    from spe_lightning.percase.ppi import (
        ppi_mean,
        stratified_design,
        stratified_ppi_mean,
        uncertainty_of,
    )
    from spe_lightning.percase.rca import spearman

    est = np.array([np.nan if r["estimated_dice"] is None else r["estimated_dice"] for r in rows], dtype=float)
    missing = ~np.isfinite(est)
    est[missing] = np.nanmean(est)  # as the estimator does: a fixed stand-in, computed without labels
    n = est.size
    rng = np.random.default_rng(seed)
    design_u = uncertainty_of(est)
    ys = {m: np.array([r[f"real_{m}"] for r in rows], dtype=float) for m in PPI_METRICS}
    fs = {m: metric_predictions(m, est) for m in PPI_METRICS}
    truth = {m: float(ys[m].mean()) for m in PPI_METRICS}
    keys = ("ppi", "classical", "suggested", "w_ppi", "w_classical", "w_suggested", "lam")
    acc: dict[str, dict[str, list[float]]] = {m: {key: [] for key in keys} for m in PPI_METRICS}
    for d in range(draws):
        lab = rng.choice(n, k, replace=False)
        unl = np.setdiff1d(np.arange(n), lab)
        design = stratified_design(design_u, k, seed=seed * 1_000_003 + d)
        for m in PPI_METRICS:
            f, y, a = fs[m], ys[m], acc[m]
            r = ppi_mean(f[unl], f[lab], y[lab], LEVEL)
            a["ppi"].append(r.lower <= truth[m] <= r.upper)
            a["classical"].append(r.classical_lower <= truth[m] <= r.classical_upper)
            a["w_ppi"].append(r.width)
            a["w_classical"].append(r.classical_width)
            a["lam"].append(r.lam)
            s = stratified_ppi_mean(f, design.strata, design.chosen, y[design.chosen], LEVEL)
            a["suggested"].append(s.lower <= truth[m] <= s.upper)
            a["w_suggested"].append(s.width)
    out: dict[str, Any] = {"k": k, "n": n, "draws": draws, "n_missing_estimates": int(missing.sum())}
    for m in PPI_METRICS:
        a = acc[m]
        w_ppi, w_cl, w_s = (_summary(a[key]) for key in ("w_ppi", "w_classical", "w_suggested"))
        out[m] = {
            "truth": truth[m],
            "spearman": spearman(fs[m], ys[m]),
            "coverage_ppi": float(np.mean(a["ppi"])),
            "coverage_classical": float(np.mean(a["classical"])),
            "coverage_suggested": float(np.mean(a["suggested"])),
            "median_width_ppi": w_ppi,
            "median_width_classical": w_cl,
            "median_width_suggested": w_s,
            "width_ratio_ppi_vs_classical": w_ppi / w_cl if w_cl > 0 else None,
            "width_ratio_suggested_vs_random": w_s / w_ppi if w_ppi > 0 else None,
            "median_lambda": _summary(a["lam"]),
        }
    return out


def score(dataset: str, draws: int, seed: int) -> dict[str, Any]:
    """Every cached target of ``dataset`` at every k below its size."""
    cached = json.loads((RESULTS / f"ppi_cases_{dataset}.json").read_text())
    result: dict[str, Any] = {"level": LEVEL, "draws": draws, "seed": seed, "ks": list(KS), "dataset": dataset}
    per: dict[str, Any] = {}
    for t, (name, target) in enumerate(cached["targets"].items()):
        per[name] = {
            str(k): score_target(target["cases"], k, draws, seed + 7919 * t + k) for k in KS if k < target["n"]
        }
        print(f"scored {dataset} / {name}", flush=True)
    result["targets"] = per
    return result


def merged() -> dict[str, Any]:
    """Every ``results/ppi_coverage_<dataset>.json`` as one result (``datasets``: name -> targets)."""
    parts = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("ppi_coverage_*.json"))]
    if not parts:
        raise SystemExit("no results/ppi_coverage_<dataset>.json yet: run `score --dataset NAME` first.")
    first = parts[0]
    return {
        "level": first["level"],
        "draws": first["draws"],
        "ks": first["ks"],
        "datasets": {p["dataset"]: p["targets"] for p in parts},
    }


def table(result: dict[str, Any], metric: str = "dice") -> str:
    """Markdown: per dataset and target (shifts pooled per dataset and k), coverage and median widths."""
    lines = [
        f"{metric}, {result['draws']} draws per row, {int(result['level'] * 100)}% intervals; "
        "'width ratio' = median PPI width / median labelled-only width; 'suggested / random' = median width of "
        "the suggested (stratified) draws / median PPI width of uniform draws.",
        "",
        "| dataset | target | N | Spearman | k | coverage PPI | coverage labelled-only | coverage suggested "
        "| width PPI | width labelled-only | width ratio | suggested / random |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, d: int = 3) -> str:
        return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{d}f}"

    for ds, targets in result["datasets"].items():
        for name, by_k in targets.items():
            for k, r in by_k.items():
                s = r[metric]
                lines.append(
                    f"| {ds} | {name} | {r['n']} | {f(s['spearman'], 2)} | {k} | {f(s['coverage_ppi'], 3)} "
                    f"| {f(s['coverage_classical'], 3)} | {f(s['coverage_suggested'], 3)} | {f(s['median_width_ppi'])} "
                    f"| {f(s['median_width_classical'])} | {f(s['width_ratio_ppi_vs_classical'], 2)} "
                    f"| {f(s['width_ratio_suggested_vs_random'], 2)} |"
                )
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    """Markdown: per dataset, metric and k over its targets: min/mean coverage, median width ratios, and the
    k=20 width ratio where the per-case Spearman is >= 0.7."""
    lines = [
        "| dataset | metric | k | targets | coverage PPI (min / mean) | coverage suggested (min / mean) "
        "| width ratio PPI / labelled-only (median, max) | suggested / random (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    from spe_lightning.percase.labels import PPI_METRICS

    for ds, targets in result["datasets"].items():
        for m in PPI_METRICS:
            for k in map(str, result["ks"]):
                rows = [by_k[k][m] for by_k in targets.values() if k in by_k]
                if not rows:
                    continue
                cov = [r["coverage_ppi"] for r in rows]
                cs = [r["coverage_suggested"] for r in rows]
                ratio = [r["width_ratio_ppi_vs_classical"] for r in rows if r["width_ratio_ppi_vs_classical"]]
                sug = [r["width_ratio_suggested_vs_random"] for r in rows if r["width_ratio_suggested_vs_random"]]
                lines.append(
                    f"| {ds} | {m} | {k} | {len(rows)} | {min(cov):.3f} / {np.mean(cov):.3f} "
                    f"| {min(cs):.3f} / {np.mean(cs):.3f} | {np.median(ratio):.2f}, {max(ratio):.2f} "
                    f"| {np.median(sug):.2f} |"
                )
    good = [
        (ds, name, by_k["20"]["dice"])
        for ds, targets in result["datasets"].items()
        for name, by_k in targets.items()
        if "20" in by_k and (by_k["20"]["dice"]["spearman"] or 0) >= 0.7
    ]
    lines.append("")
    if good:
        ratios = [r["width_ratio_ppi_vs_classical"] for _, _, r in good]
        lines.append(
            f"Dice at k=20 on the {len(good)} targets with per-case Spearman >= 0.7: width ratio median "
            f"{np.median(ratios):.2f}, max {max(ratios):.2f} (goal <= 0.70)."
        )
    else:
        lines.append("No target has per-case Spearman >= 0.7 for Dice.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ synthetic
def synthetic(draws: int, seed: int) -> dict[str, Any]:
    """Simulated targets (the only data the method's settings were chosen on): plug-in vs jackknife variance
    of the tuned estimator, and the strata rule, on predictions that are good, biased and noisy, or useless."""
    from spe_lightning.percase.ppi import ppi_mean, stratified_design, stratified_ppi_mean, uncertainty_of

    rng = np.random.default_rng(seed)
    n = 100
    f = rng.beta(6, 2, n)
    kinds = {
        "good": np.clip(f - 0.1 + rng.normal(0, 0.05, n), 0, 1),
        "biased_heteroscedastic": np.clip(0.6 * f + rng.normal(0, 0.3, n) * (1 - f), 0, 1),
        "useless": rng.beta(4, 2, n),
    }
    out: dict[str, Any] = {"n": n, "draws": draws, "seed": seed, "targets": {}}
    for kind, y in kinds.items():
        truth = float(y.mean())
        per: dict[str, Any] = {}
        for k in (10, 20, 40):
            hits: dict[str, list[bool]] = {}
            widths: dict[str, list[float]] = {}
            for d in range(draws):
                lab = rng.choice(n, k, replace=False)
                unl = np.setdiff1d(np.arange(n), lab)
                res = {"jackknife": ppi_mean(f[unl], f[lab], y[lab], LEVEL)}
                # the plug-in interval of the tuned estimator: lambda treated as fixed (what the jackknife replaced)
                plug = ppi_mean(f[unl], f[lab], y[lab], LEVEL, lam=res["jackknife"].lam)
                res["plug_in"] = plug
                for h in (1, 2, 4):
                    if k // h >= 2:
                        des = stratified_design(uncertainty_of(f), k, n_strata=h, seed=seed + d)
                        res[f"suggested_{h}_strata"] = stratified_ppi_mean(f, des.strata, des.chosen, y[des.chosen])
                for name, r in res.items():
                    hits.setdefault(name, []).append(r.lower <= truth <= r.upper)
                    widths.setdefault(name, []).append(r.width)
                hits.setdefault("labelled_only", []).append(plug.classical_lower <= truth <= plug.classical_upper)
                widths.setdefault("labelled_only", []).append(plug.classical_width)
            per[str(k)] = {
                name: {"coverage": float(np.mean(hits[name])), "median_width": float(np.median(widths[name]))}
                for name in hits
            }
            print(kind, k, {a: (round(b["coverage"], 3), round(b["median_width"], 3)) for a, b in per[str(k)].items()})
        out["targets"][kind] = per
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("collect", "score", "table", "synthetic"))
    p.add_argument("--dataset", choices=tuple(DATASETS))
    p.add_argument("--workdir", default="spe_runs/ppi")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.what == "collect":
        import torch

        torch.set_num_threads(a.threads)
        if a.dataset is None:
            p.error("collect needs --dataset")
        res = collect(a.dataset, Path(a.workdir), a.seed)
        res["load_average"] = os.getloadavg()[0]
        path = RESULTS / f"ppi_cases_{a.dataset}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"-> {path}")
    elif a.what == "score":
        names = [a.dataset] if a.dataset else [p.stem[len("ppi_cases_") :] for p in RESULTS.glob("ppi_cases_*.json")]
        for name in sorted(names):
            res = score(name, a.draws, a.seed)
            (RESULTS / f"ppi_coverage_{name}.json").write_text(json.dumps(res, indent=1))
        print(summary_table(merged()))
    elif a.what == "table":
        res = merged()
        print(summary_table(res) + "\n\n" + table(res))
    else:
        res = synthetic(a.draws, a.seed)
        (RESULTS / "ppi_synthetic.json").write_text(json.dumps(res, indent=1))
        print(f"-> {RESULTS / 'ppi_synthetic.json'}")


if __name__ == "__main__":
    main()
