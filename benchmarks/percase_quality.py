"""Per-case quality regressor vs RCA vs the model's confidence (BUSI extra_test; JSRT lungs -> covid_cxr).

Protocol (as benchmarks/percase_busi.py): the segmentation model is trained on ``ROOT/train`` (cached with
its early checkpoints under ``--workdir``); references = ``ROOT/train``; calibration = ``ROOT/test``;
targets (masks only score the result) = ``ROOT/extra_test`` (and covid_cxr for JSRT). The quality
regressor (:mod:`spe_lightning.percase.regressor`) is fitted on the references (their true masks degraded,
plus the early checkpoints' and the final model's predictions on them) and calibrated on the test split;
RCA (label fusion, k=16) and the confidence get an isotonic map score -> Dice there too. The regressor's
calibration variant (map kind, + confidence, + synthetic or shifted development pairs) is chosen on
random halves of the test split and their synthetic shifts (:func:`choose_calibration`); ``--tune``
compares regressor settings on the test split. extra sets are never used to choose anything. Dataset
level: the mean per-case estimate vs the real mean Dice on every synthetic shift of extra_test
(spe_lightning.engine.shifts, severities 1-3).

    python benchmarks/percase_quality.py --dataset busi --tune     # settings, test split only
    python benchmarks/percase_quality.py --dataset busi             # -> results/percase_quality_busi.json
    python benchmarks/percase_quality.py --dataset jsrt             # -> results/percase_quality_jsrt.json
    python benchmarks/percase_quality.py --dataset busi --print     # tables of a saved result
    python benchmarks/percase_quality.py --dataset jsrt --development --workdir /tmp/sites_cache \
        --styling histogram_noise_blur                              # the per-case folds with another recipe

**The restyling recipe's per-case side (written before either run).** Three development seeds prefer the recipe
``histogram_noise_blur`` for the styled calibration score and the styled anchor (styling_dev.py,
styled_anchor_dev.py); the per-target per-case maps are built from the same styled sets, so the recipe may
change for both only if, on the per-case development folds of JSRT and of BUSI (``--development``, each recipe
on the same cached model and regressor), ``histogram_noise_blur``'s chosen stack has a held-out MAE on the
matched folds at most 0.005 above v1's, and its picked interval (at its fitted width factor) covers the
mismatched and the content folds at most 0.02 below v1's.

**Result: refused on JSRT** (``percase_quality_jsrt_development{,_histogram_noise_blur}.json``, same model,
regressor ``early_final`` and folds): the chosen stack (regressor + RCA both times) has held-out MAE 0.035 against
v1's 0.026 (+0.009), and the product's interval (held-out, width factor 1.25) covers the mismatched folds 0.800
against 0.957 and the content folds 0.540 against 0.917. The per-case maps need the styled cases to look like
the target *and* keep their score-to-Dice relation; v1's Fourier swap keeps more of it. BUSI was not run: one
failed dataset refuses the change. The recipe stays v1 for the per-case maps, and so (one recipe per run) for
the styled score and anchor too.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _reference_model import train_reference_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
EARLY = (1, 2, 4, 8)
#: late epochs kept for per-case checkpoint agreement (mean pairwise Dice of their masks and the final model's)
LATE = (26, 27, 28, 29)


def load(root: Path, split: str, class_index: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Gray images ``[N,1,128,128]`` (per-image percentile scaling, as SPE's working rows), bool masks, ids."""
    from spe_lightning.data import FolderSegmentationDataset

    ds = FolderSegmentationDataset(root, split, class_index, 128)
    items = [ds[i] for i in range(len(ds))]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["label"] for it in items]) > 0.5
    return images, masks, list(ds.ids)


def train(root: Path, epochs: int, seed: int, out: Path) -> Path:
    """Train SegmentationModel on ``root/train`` once (as percase_busi.py), saving early-epoch weights too."""
    import lightning.pytorch as pl

    ckpt = out / f"model_e{epochs}_s{seed}.ckpt"
    if ckpt.exists():
        return ckpt

    class Early(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            epoch = trainer.current_epoch + 1
            if epoch in EARLY or epoch in LATE:
                torch.save(module.state_dict(), out / f"early_e{epoch}.pt")

    out.mkdir(parents=True, exist_ok=True)
    train_reference_model(root, ckpt, epochs, seed, callbacks=[Early()])
    return ckpt


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks (probability > 0.5) and soft-Dice confidence, as SPE's predictor computes them."""
    masks, conf = [], []
    for i in range(0, len(images), 32):
        p = torch.sigmoid(model(images[i : i + 32]))
        m = p > 0.5
        inter, den = (p * m).flatten(1).sum(1), (p + m).flatten(1).sum(1)
        conf.append(torch.where(den > 0, 2 * inter / den.clamp_min(1e-8), torch.ones_like(den)))
        masks.append(m)
    return torch.cat(masks), torch.cat(conf)


def dice(pred: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    from spe_lightning.engine.metrics import per_image_metrics

    return per_image_metrics(pred, truth, ("dice",))["dice"].numpy()


def gray(images: torch.Tensor) -> torch.Tensor:
    from spe_lightning.data.adapters import to_gray01

    return to_gray01(images)


def rca_scores(ref_g: torch.Tensor, ref_m: torch.Tensor, g: torch.Tensor, m: torch.Tensor, empty_score: Any) -> Any:
    from spe_lightning.percase.rca import case_scores
    from spe_lightning.reverse import make_segmenter

    return case_scores(make_segmenter("label_fusion"), g, m, ref_g, ref_m, k=16, empty_score=empty_score)


def per_case_stats(
    score: np.ndarray, real: np.ndarray, cal: dict[str, Any], conf: np.ndarray | None = None, cut: float = 0.7
) -> dict[str, Any]:
    """Ranking and calibrated-estimate quality of one per-case score on a target (``conf`` for combined maps)."""
    from spe_lightning.percase.rca import auroc, spearman
    from spe_lightning.percase.regressor import quality_estimates

    bad = real < cut
    q = quality_estimates(cal, score, conf)
    flag = q["flagged"]
    out: dict[str, Any] = {"spearman": spearman(q["score"], real), "auroc": auroc(-q["score"], bad)}
    out.update(
        mae=float(np.mean(np.abs(q["estimate"] - real))),
        coverage=float(np.mean((real >= q["lower"] - 1e-9) & (real <= q["upper"] + 1e-9))),
        interval_width=float(np.mean(q["upper"] - q["lower"])),
        median_width=float(np.median(q["upper"] - q["lower"])),
        sensitivity=float((flag & bad).sum() / max(bad.sum(), 1)),
        specificity=float((~flag & ~bad).sum() / max((~bad).sum(), 1)),
        n_flagged=int(flag.sum()),
        mean_estimate=float(np.mean(q["estimate"])),
        mean_real=float(np.mean(real)),
        estimate=[float(v) for v in q["estimate"]],
    )
    return out


def fit_regressor(settings: dict[str, Any], ref: tuple, extras: list[torch.Tensor], seed: int) -> Any:
    from spe_lightning.percase.regressor import QualityRegressor, QualitySettings

    reg = QualityRegressor(QualitySettings(**settings))
    reg.fit(ref[0], ref[1], extra_candidates=extras, seed=seed)
    return reg


#: regressor settings compared by --tune (fit on train, scored on the model's test predictions); DEFAULT chosen there.
#: ``extras``: which real imperfect masks of the references join the synthetic candidates.
CANDIDATE_SETTINGS: dict[str, dict[str, Any]] = {
    "early_only": {"size": 64, "widths": (8, 16, 32, 64), "epochs": 6, "extras": "early"},
    "early_final": {"size": 64, "widths": (8, 16, 32, 64), "epochs": 6, "extras": "early+final"},
    "early_final_e10": {"size": 64, "widths": (8, 16, 32, 64), "epochs": 10, "extras": "early+final"},
    "early_final_rep3": {
        "size": 64,
        "widths": (8, 16, 32, 64),
        "epochs": 6,
        "extras": "early+final",
        "extra_repeat": 3,
    },
}
DEFAULT = "early_final_e10"
#: per-case calibration variants, chosen by held-out MAE over random halves of the calibration (test) split
VARIANTS: dict[str, dict[str, Any]] = {
    f"{kind}{'+confidence' if conf else ''}{'+' + extra if extra else ''}": {
        "kind": kind,
        "confidence": conf,
        "extra": extra,
    }
    for kind in ("isotonic", "linear")
    for conf in (False, True)
    for extra in (None, "synthetic", "shifted")
    if not (conf and extra == "synthetic")
}
MIN_COVERAGE = 0.85  # a calibration variant must keep 90% intervals at >= 85% held-out coverage to be chosen
MIN_BAD = 5  # with fewer calibration cases below the cut, the map needs synthetic or shifted pairs to reach bad cases


def extras_for(ctx: dict[str, Any], which: str) -> list[torch.Tensor]:
    tr = ctx["sets"]["train"]
    return {"none": [], "early": ctx["early"], "early+final": [*ctx["early"], tr["pred"]]}[which]


def setup(dataset: str, workdir: Path, epochs: int, seed: int, targets: bool = True) -> dict[str, Any]:
    """Model, its early checkpoints' reference predictions, and every split's images/masks/predictions
    (``targets=False``: train and test only, so nothing of a target is even loaded)."""
    from spe_lightning.models import SegmentationModel

    root = SHARED / dataset
    out = workdir / dataset
    ckpt = train(root, epochs, seed, out)
    model = SegmentationModel.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    sets: dict[str, Any] = {}
    names = {"train": (root, "train"), "test": (root, "test")}
    if targets:
        names["extra_test"] = (root, "extra_test")
    if targets and dataset == "jsrt":
        names["covid_cxr"] = (SHARED / "covid_cxr", "extra_test")
    for name, (r, split) in names.items():
        img, m, ids = load(r, split)
        pred, conf = predict(model, img)
        sets[name] = {"images": img, "gray": gray(img), "truth": m, "ids": ids, "pred": pred, "conf": conf}
        sets[name]["real"] = dice(pred, m)
    early = []
    for e in EARLY:  # LATE epochs are the checkpoint-agreement signal (sites())
        path = out / f"early_e{e}.pt"
        if path.exists():
            net = SegmentationModel(**model.hparams)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            early.append(predict(net.eval(), sets["train"]["images"])[0])
    return {"model": model, "sets": sets, "early": early, "root": root, "workdir": out}


def tune(ctx: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fit each candidate setting on train; score the model's test predictions (Spearman, AUROC)."""
    from spe_lightning.percase.rca import auroc, spearman

    tr, te = ctx["sets"]["train"], ctx["sets"]["test"]
    res = {}
    for name, st in CANDIDATE_SETTINGS.items():
        st = dict(st)
        reg = fit_regressor(st, (tr["gray"], tr["truth"]), extras_for(ctx, st.pop("extras")), seed)
        raw = reg.predict(te["gray"], te["pred"]).numpy()
        res[name] = {
            "spearman": spearman(raw, te["real"]),
            "auroc": auroc(-raw, te["real"] < 0.7),
            "fit_seconds": reg.history["seconds"],
        }
        print(name, {k: None if v is None else round(v, 3) for k, v in res[name].items()}, flush=True)
    return res


def _calibrate(reg: Any, variant: str, t: dict[str, Any], pos: np.ndarray, seed: int) -> dict[str, Any]:
    """Calibrate ``variant`` on the calibration cases at ``pos`` (and their synthetic/shifted pairs)."""
    from spe_lightning.percase.regressor import calibrate_quality, synthetic_pairs

    v = VARIANTS[variant]
    pairs = None
    if v["extra"] == "synthetic":
        pairs = synthetic_pairs(reg, t["gray"][pos], t["truth"][pos], seed=seed)
    elif v["extra"] == "shifted":
        pairs = tuple(t[f"shift_{k}"][:, pos].ravel() for k in ("raw", "real", "conf"))
    conf = t["conf"].numpy()[pos] if v["confidence"] else None
    return calibrate_quality(t["raw"][pos], t["real"][pos], v["kind"], confidence=conf, extra_pairs=pairs)


def shifted_pairs(ctx: dict[str, Any], reg: Any, t: dict[str, Any], seed: int) -> None:
    """The model's predictions on every synthetic shift of the calibration images: raw, real Dice, confidence."""
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, apply_shift

    out: dict[str, list[np.ndarray]] = {"raw": [], "real": [], "conf": []}
    for fam in SHIFT_FAMILIES:
        for sev in (1, 2, 3):
            imgs = torch.stack(
                [apply_shift(x, fam, sev, seed=seed * 100_000 + 50_000 + i) for i, x in enumerate(t["images"])]
            )
            pred, conf = predict(ctx["model"], imgs)
            out["raw"].append(reg.predict(gray(imgs), pred).numpy())
            out["real"].append(dice(pred, t["truth"]))
            out["conf"].append(conf.numpy())
    for k, v in out.items():
        t[f"shift_{k}"] = np.stack(v)  # [families x severities, N]


def choose_calibration(reg: Any, t: dict[str, Any], seed: int, splits: int = 10) -> dict[str, Any]:
    """Held-out errors of every calibration variant over random halves of the calibration set.

    Each variant is calibrated on one half (its cases, and its synthetic or shifted pairs) and scored on
    the other half's cases *and their shifted copies* (development data only): MAE and interval coverage
    over both, Spearman and AUROC over the unshifted cases.
    """
    from spe_lightning.percase.rca import auroc, spearman
    from spe_lightning.percase.regressor import quality_estimates

    rng = np.random.default_rng(seed)
    n = len(t["real"])
    rows: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    for _ in range(splits):
        perm = rng.permutation(n)
        a, b = perm[: n // 2], perm[n // 2 :]
        raw_b = np.concatenate([t["raw"][b], t["shift_raw"][:, b].ravel()])
        conf_b = np.concatenate([t["conf"].numpy()[b], t["shift_conf"][:, b].ravel()])
        real_b = np.concatenate([t["real"][b], t["shift_real"][:, b].ravel()])
        for v in VARIANTS:
            cal = _calibrate(reg, v, t, a, seed)
            q = quality_estimates(cal, raw_b, conf_b if VARIANTS[v]["confidence"] else None)
            clean = slice(0, len(b))
            sp = spearman(q["score"][clean], real_b[clean])
            au = auroc(-q["score"][clean], real_b[clean] < 0.7)
            rows[v].append(
                [
                    float(np.mean(np.abs(q["estimate"] - real_b))),
                    float(np.mean((real_b >= q["lower"]) & (real_b <= q["upper"]))),
                    np.nan if sp is None else sp,
                    np.nan if au is None else au,
                ]
            )
    out = {}
    for v, r in rows.items():
        arr = np.array(r, dtype=float)
        m = [float(np.nanmean(col)) if np.isfinite(col).any() else np.nan for col in arr.T]
        out[v] = {
            k: (float(x) if np.isfinite(x) else None) for k, x in zip(("mae", "coverage", "spearman", "auroc"), m)
        }
    return out


def evaluate(
    ctx: dict[str, Any],
    setting: str,
    seed: int,
    shifts: bool = True,
    sites_too: bool = True,
    site_rule: list[str] | None = None,
) -> dict[str, Any]:
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, apply_shift
    from spe_lightning.percase.rca import calibrate_flags
    from spe_lightning.percase.regressor import calibrate_quality, quality_estimates

    sets = ctx["sets"]
    tr, te = sets["train"], sets["test"]
    st = dict(CANDIDATE_SETTINGS[setting])
    cache = ctx["workdir"] / f"regressor_{setting}_s{seed}.pt"
    if cache.exists():  # the same model and setting: the fit is deterministic, reuse it
        from spe_lightning.percase.regressor import QualityRegressor

        reg = QualityRegressor.from_state(torch.load(cache, map_location="cpu", weights_only=True))
        st.pop("extras")
    else:
        reg = fit_regressor(st, (tr["gray"], tr["truth"]), extras_for(ctx, st.pop("extras")), seed)
        torch.save(reg.state_tensors(), cache)
    print(f"regressor fitted in {reg.history['seconds']:.0f}s on {reg.history['n_candidates']} candidates", flush=True)
    te["raw"] = reg.predict(te["gray"], te["pred"]).numpy()
    shifted_pairs(ctx, reg, te, seed)
    n_bad = int((te["real"] < 0.7).sum())
    allowed = [v for v in VARIANTS if VARIANTS[v]["extra"] or n_bad >= MIN_BAD]
    dev = choose_calibration(reg, te, seed)

    def best(names: list[str]) -> str:
        """Lowest held-out MAE among variants whose held-out coverage reaches MIN_COVERAGE (else best coverage)."""
        ok = [v for v in names if (dev[v]["coverage"] or 0.0) >= MIN_COVERAGE]
        return min(ok, key=lambda v: dev[v]["mae"]) if ok else max(names, key=lambda v: dev[v]["coverage"] or 0.0)

    pick = {
        "regressor": best([v for v in allowed if not VARIANTS[v]["confidence"]]),
        "regressor+confidence": best([v for v in allowed if VARIANTS[v]["confidence"]]),
    }
    pick["selected"] = best(list(pick.values()))
    print("development choice:", pick, flush=True)
    all_pos = np.arange(len(te["real"]))
    cals = {row: _calibrate(reg, v, te, all_pos, seed) for row, v in pick.items() if v}
    cal_conf = calibrate_quality(te["conf"].numpy(), te["real"])
    start = time.perf_counter()
    rca_cal = rca_scores(tr["gray"], tr["truth"], te["gray"], te["pred"], None)
    flags = calibrate_flags(rca_cal.score.numpy(), te["real"], rca_cal.empty.numpy())
    rca_s = rca_cal.score.numpy().copy()
    if flags["empty_score"] is not None:
        rca_s[rca_cal.empty.numpy()] = flags["empty_score"]
    cal_rca = calibrate_quality(rca_s, te["real"])
    rca_seconds = time.perf_counter() - start
    result: dict[str, Any] = {
        "setting": setting,
        "settings": reg.settings.to_dict(),
        "fit": reg.history,
        "development": {"calibration_variants": dev, "picked": pick, "n_calibration_below_0.7": n_bad},
        "calibration": {**cals, "confidence": cal_conf, "rca": cal_rca},
        "rca_seconds_calibration": rca_seconds,
        "targets": {},
    }
    calib_score = float(np.mean(te["real"]))  # the calibration-score baseline of the dataset level
    for name in [n for n in sets if n not in ("train", "test")]:
        t = sets[name]
        start = time.perf_counter()
        raw = reg.predict(t["gray"], t["pred"]).numpy()
        reg_seconds = time.perf_counter() - start
        conf = t["conf"].numpy()
        rs = rca_scores(tr["gray"], tr["truth"], t["gray"], t["pred"], flags["empty_score"]).score.numpy()
        row: dict[str, Any] = {
            "n_cases": len(t["real"]),
            "n_below_0.7": int((t["real"] < 0.7).sum()),
            "mean_real_dice": float(np.mean(t["real"])),
            "regressor_seconds": reg_seconds,
        }
        for key, cal in cals.items():
            row[key] = per_case_stats(raw, t["real"], cal, conf if cal.get("weights") else None)
        row["confidence"] = per_case_stats(conf, t["real"], cal_conf)
        row["rca"] = per_case_stats(rs, t["real"], cal_rca)
        row.update(ids=t["ids"], real_dice=[float(v) for v in t["real"]], regressor_raw=[float(v) for v in raw])
        result["targets"][name] = row
    if shifts:
        base = sets["extra_test"]
        rows = {}
        for fam in SHIFT_FAMILIES:
            for sev in (1, 2, 3):
                imgs = torch.stack(
                    [apply_shift(x, fam, sev, seed=seed * 100_000 + i) for i, x in enumerate(base["images"])]
                )
                pred, conf = predict(ctx["model"], imgs)
                raw = reg.predict(gray(imgs), pred).numpy()
                r = {"real": float(dice(pred, base["truth"]).mean()), "calibration_score": calib_score}
                for key, cal in cals.items():
                    r[key] = float(
                        quality_estimates(cal, raw, conf.numpy() if cal.get("weights") else None)["estimate"].mean()
                    )
                r["confidence"] = float(quality_estimates(cal_conf, conf.numpy())["estimate"].mean())
                rows[f"{fam}_{sev}"] = r
        methods = [*cals, "confidence", "calibration_score"]
        fams = {
            fam: {
                m: float(np.mean([abs(rows[f"{fam}_{s}"][m] - rows[f"{fam}_{s}"]["real"]) for s in (1, 2, 3)]))
                for m in methods
            }
            for fam in SHIFT_FAMILIES
        }
        result["shift"] = {"sets": rows, "mae_by_family": fams}
    if sites_too:
        result["sites"] = sites(ctx, reg, flags["empty_score"], seed, site_rule)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("busi", "jsrt"), default="busi")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/wt17_cache")
    p.add_argument("--setting", default=DEFAULT, choices=tuple(CANDIDATE_SETTINGS))
    p.add_argument("--tune", action="store_true")
    p.add_argument("--print", dest="show", action="store_true", help="print the tables of the saved result")
    p.add_argument("--no-shifts", action="store_true")
    p.add_argument(
        "--site-rule", default=None, help="e.g. regressor+rca: skip the per-case development folds, stack these"
    )
    p.add_argument("--timing", action="store_true", help="regressor fit + per-case scoring of 600 cases, timed")
    p.add_argument(
        "--development", action="store_true", help="per-case interval rules on development folds only (no target)"
    )
    p.add_argument("--threads", type=int, default=1 if os.getloadavg()[0] > 1.0 else 2)
    p.add_argument("--styling", default="v1", help="the styled sets' recipe (SPEConfig.styling; default v1)")
    a = p.parse_args()
    global STYLING
    STYLING = a.styling
    tag = "" if a.styling == "v1" else f"_{a.styling}"
    if a.show:
        print_tables(
            json.loads((Path(__file__).resolve().parent / "results" / f"percase_quality_{a.dataset}.json").read_text())
        )
        return
    torch.set_num_threads(a.threads)
    if a.timing:
        res = timing(a.dataset, Path(a.workdir), a.epochs, a.setting, a.seed)
        out = Path(__file__).resolve().parent / "results" / f"percase_quality_{a.dataset}_timing.json"
        out.write_text(json.dumps(res, indent=2))
        print(json.dumps(res, indent=2), f"\n-> {out}")
        return
    if a.development:
        dev = development_only(a.dataset, Path(a.workdir), a.epochs, a.setting, a.seed)
        dev.update(threads=a.threads, load=os.getloadavg(), styling=a.styling)
        out = Path(__file__).resolve().parent / "results" / f"percase_quality_{a.dataset}_development{tag}.json"
        out.write_text(json.dumps(dev, indent=2))
        print(f"-> {out}")
        return
    ctx = setup(a.dataset, Path(a.workdir), a.epochs, a.seed)
    results = Path(__file__).resolve().parent / "results"
    load_avg = os.getloadavg()
    if a.tune:
        res = {"tune": tune(ctx, a.seed), "dataset": a.dataset, "load_before": load_avg, "threads": a.threads}
        (results / f"percase_quality_{a.dataset}_tune.json").write_text(json.dumps(res, indent=2))
        return
    site_rule = a.site_rule.split("+") if a.site_rule else None
    res = evaluate(ctx, a.setting, a.seed, shifts=not a.no_shifts, site_rule=site_rule)
    res.update(dataset=a.dataset, epochs=a.epochs, seed=a.seed, threads=a.threads, load_before=load_avg)
    res["load_after"] = os.getloadavg()
    out = results / f"percase_quality_{a.dataset}.json"
    out.write_text(json.dumps(res, indent=2))
    print_tables(res)
    print(f"-> {out}")
    print(f"development choice: {res['development']['picked']}; regressor fit {res['fit']['seconds']:.0f}s")


def print_tables(res: dict[str, Any]) -> None:
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for name, t in res["targets"].items():
        print(
            f"\n{res['dataset']} -> {name}: {t['n_cases']} cases ({t['n_below_0.7']} below 0.7), "
            f"mean Dice {t['mean_real_dice']:.3f}"
        )
        print("| score | Spearman | AUROC (Dice<0.7) | MAE | 90% coverage | width | sens | spec | mean est |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in [k for k in ("regressor", "regressor+confidence", "confidence", "rca") if k in t]:
            r = t[s]
            print(
                f"| {s} | {f(r['spearman'])} | {f(r['auroc'])} | {f(r.get('mae'))} | {f(r.get('coverage'))} | "
                f"{f(r.get('interval_width'))} | {f(r.get('sensitivity'))} | {f(r.get('specificity'))} | "
                f"{f(r.get('mean_estimate'))} |"
            )
    if "shift" in res:
        print("\nshifted extra_test, dataset-level |mean estimate - real mean Dice| (mean over severities 1-3)")
        methods = [m for m in next(iter(res["shift"]["mae_by_family"].values())) if m != "selected"]
        print("| family | " + " | ".join(methods) + " |\n" + "|---" * (len(methods) + 1) + "|")
        for fam, r in res["shift"]["mae_by_family"].items():
            print(f"| {fam} | " + " | ".join(f"{r[m]:.3f}" for m in methods) + " |")
    if "sites" in res:
        print_sites(res)


def print_sites(res: dict[str, Any]) -> None:
    """Issue 27's table: before (today's calibration-set map), calibration-only stack, after (styled pairs)."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    st = res["sites"]
    folds = st["development"].get("n_folds", "none: rule given")
    print(f"\nper-case rule (development folds, {folds}): {'+'.join(st['development']['rule'])}")
    print("| rule | held-out MAE | coverage | median width |\n|---|---|---|---|")
    for rule, r in st["development"]["scores"].items():
        print(f"| {rule} | {f(r['mae'])} | {f(r['coverage'])} | {f(r['median_width'])} |")
    if "intervals" in st["development"]:
        print_intervals(st["development"])
    print(
        "\n| target | map | Spearman | AUROC (Dice<0.7) | AUROC confidence | MAE | 90% coverage | median width "
        "| beyond calibrated (coverage there) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, t in st["targets"].items():
        b = res["targets"][name].get("selected") or {}
        conf = t["styled"]["auroc_confidence"]
        print(
            f"| {name} | before: calibration-set map | {f(b.get('spearman'))} | {f(b.get('auroc'))} | {f(conf)} | "
            f"{f(b.get('mae'))} | {f(b.get('coverage'))} | {f(_median_width(b))} | - |"
        )
        rows = (
            ("calibration_only", "stack, calibration only"),
            ("styled", "stop 8: stack + styled pairs"),
            ("styled_mismatch_rule", "after: stack + styled pairs, interval rule of the development folds"),
        )
        for key, label in [(k, v) for k, v in rows if k in t]:
            r = t[key]
            print(
                f"| {name} | {label} | {f(r['spearman'])} | {f(r['auroc'])} | {f(conf)} | {f(r['mae'])} | "
                f"{f(r['coverage'])} | {f(r['median_width'])} | "
                f"{r['n_beyond_calibrated']} ({f(r['coverage_beyond'])}) |"
            )


def print_intervals(dev: dict[str, Any]) -> None:
    """The interval rules on the development folds: mean held-out coverage / median width at factor 1 and at
    the factor each kind of fold needs for 90%."""
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print("\n| interval rule | folds | coverage (factor 1) | median width | factor for 90% | coverage | median width |")
    print("|---|---|---|---|---|---|---|")
    for iv, kinds in dev["intervals"].items():
        for kind, fit in kinds.items():
            one, at = fit["scores"]["1"], fit["scores"][f"{fit['factor']:g}"]
            print(
                f"| {iv} | {kind} | {f(one['coverage'])} | {f(one['median_width'])} | {fit['factor']:g} | "
                f"{f(at['coverage'])} | {f(at['median_width'])} |"
            )
    if "picked_interval" in dev:
        print(f"picked on the mismatched and content folds: {dev['picked_interval']}")


def _median_width(row: dict[str, Any]) -> float | None:
    return row.get("median_width", row.get("interval_width"))


# ---- issue 27: per-case quality recalibrated per target (spe_lightning.percase.sites) ----
SITE_SPLITS = 2  # random halves of the calibration split for the rule choice
SITE_SEVERITY = 2  # shifted copies of the held-out half: the development stand-ins for another site


def cached(images: torch.Tensor, masks: torch.Tensor | None = None, name: str = "set") -> Any:
    """A CachedSet of working-size images (as SPE caches a 2D dataset)."""
    from spe_lightning.engine.cached_set import CachedSet

    return CachedSet(name, list(images), None if masks is None else list(masks), gray(images))


def case_signals(ctx: dict[str, Any], images: torch.Tensor, truth: torch.Tensor | None, groups: Any = None) -> Any:
    """Every per-case signal of the model on ``images``: regressor raw, RCA, confidence (= Soft Dice Confidence
    here), checkpoint agreement (late epochs + final), the label-free features, and the real Dice if ``truth``."""
    from spe_lightning.engine.agreement import pairwise_agreement
    from spe_lightning.engine.distance import image_features
    from spe_lightning.percase.sites import CaseSignals

    tr = ctx["sets"]["train"]
    pred, conf = predict(ctx["model"], images)
    g = gray(images)
    raw = ctx["reg"].predict(g, pred).numpy()
    rca = rca_scores(tr["gray"], tr["truth"], g, pred, ctx["empty_score"]).score.numpy()
    rca = np.nan_to_num(rca, nan=0.0)  # an empty prediction: the worst score
    late = [predict(net, images)[0] for net in ctx["late"]] + [pred]
    agree = pairwise_agreement([[m.flatten().numpy() for m in ms] for ms in late])
    feats = image_features(cached(images), list(pred), conf)
    sig = {"regressor": raw, "rca": rca, "confidence": conf.numpy().astype(float), "agreement": agree}
    real = None if truth is None else dice(pred, truth)
    return CaseSignals(sig, feats, real, None if groups is None else np.asarray(groups))


#: the content the styling cannot copy (development folds): one smooth bright patch per image, centred on a
#: random foreground pixel, of this width (fraction of the image side) and strength (towards white)
OPACITY_SIGMA = 0.12
OPACITY_STRENGTH = 0.6


def opacify(image: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``image`` ``[C,H,W]`` in [0, 1] with one bright smooth patch over its foreground (an opacity the model
    may miss): new *content*, which restyling the calibration images cannot imitate."""
    h, w = image.shape[-2:]
    g = torch.Generator().manual_seed(int(seed))
    fg = torch.nonzero(mask.reshape(h, w))
    cy, cx = fg[torch.randint(len(fg), (1,), generator=g).item()].tolist() if len(fg) else (h // 2, w // 2)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=image.dtype), torch.arange(w, dtype=image.dtype), indexing="ij")
    blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (OPACITY_SIGMA * h) ** 2))
    return image + OPACITY_STRENGTH * blob * (1 - image)


#: the restyling recipe of the styled sets (``SPEConfig.styling``; ``--styling``)
STYLING = "v1"


def site_folds(ctx: dict[str, Any], cal: Any, seed: int) -> dict[str, list[tuple[Any, Any, Any]]]:
    """Development folds (calibration data only): half A of the calibration split restyled like a shifted copy
    of half B (every shift family at SITE_SEVERITY). ``matched``: scored on that copy (the styling imitates
    the 'site' perfectly); ``mismatched``: scored on half B shifted by every *other* family (the pairs imitate
    the site's appearance imperfectly); ``content``: half B given an opacity (:func:`opacify`) then shifted,
    A styled like that and scored on it (the pairs imitate the appearance but cannot copy the content)."""
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, apply_shift
    from spe_lightning.engine.styled_pairs import styled_set

    te = ctx["sets"]["test"]
    n = len(te["real"])
    rng = np.random.default_rng(seed)
    folds: dict[str, list[tuple[Any, Any, Any]]] = {"matched": [], "mismatched": [], "content": []}
    for s in range(SITE_SPLITS):
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
        made = {}
        for fam in SHIFT_FAMILIES:
            imgs_b = torch.stack(
                [apply_shift(te["images"][i], fam, SITE_SEVERITY, seed=seed * 100_000 + 70_000 + i) for i in b]
            )
            held = case_signals(ctx, imgs_b, te["truth"][b], b)
            cal_a = cached(te["images"][a], te["truth"][a], "cal_a")
            sty, _ = styled_set(cal_a, cached(imgs_b, None, fam), seed + s, styling=STYLING)
            styled = case_signals(ctx, torch.stack(sty.inputs), te["truth"][a], a)
            made[fam] = (styled, held)
            imgs_c = torch.stack(
                [
                    apply_shift(
                        opacify(te["images"][i], te["truth"][i], seed * 100_000 + 90_000 + i),
                        fam,
                        SITE_SEVERITY,
                        seed=seed * 100_000 + 70_000 + i,
                    )
                    for i in b
                ]
            )
            held_c = case_signals(ctx, imgs_c, te["truth"][b], b)
            sty_c, _ = styled_set(cal_a, cached(imgs_c, None, fam), seed + s, styling=STYLING)
            folds["content"].append(
                (cal.subset(a), case_signals(ctx, torch.stack(sty_c.inputs), te["truth"][a], a), held_c)
            )
        folds["matched"] += [(cal.subset(a), sty_f, held_f) for sty_f, held_f in made.values()]
        folds["mismatched"] += [
            (cal.subset(a), made[f1][0], made[f2][1]) for f1 in SHIFT_FAMILIES for f2 in SHIFT_FAMILIES if f1 != f2
        ]
    return folds


def site_stats(q: dict[str, np.ndarray], real: np.ndarray, conf: np.ndarray, cut: float = 0.7) -> dict[str, Any]:
    """Ranking, error and interval quality of per-case estimates ``q`` (SiteCalibration.estimate)."""
    from spe_lightning.percase.rca import auroc, spearman

    bad = real < cut
    inside = (real >= q["lower"] - 1e-9) & (real <= q["upper"] + 1e-9)
    far = q["beyond_calibrated"]
    return {
        "spearman": spearman(q["estimate"], real),
        "auroc": auroc(-q["estimate"], bad),
        "auroc_confidence": auroc(-conf, bad),
        "mae": float(np.mean(np.abs(q["estimate"] - real))),
        "coverage": float(np.mean(inside)),
        "median_width": float(np.median(q["upper"] - q["lower"])),
        "n_beyond_calibrated": int(far.sum()),
        "coverage_beyond": float(np.mean(inside[far])) if far.any() else None,
        "coverage_within": float(np.mean(inside[~far])) if (~far).any() else None,
        "mean_estimate": float(np.mean(q["estimate"])),
        "mean_real": float(np.mean(real)),
        "estimate": [float(v) for v in q["estimate"]],
        "lower": [float(v) for v in q["lower"]],
        "upper": [float(v) for v in q["upper"]],
        "distance": [float(v) for v in q["distance"]],
    }


def load_late(ctx: dict[str, Any], reg: Any, empty_score: Any) -> None:
    """What case_signals needs beside the model: the regressor, RCA's empty score, the late checkpoints."""
    from spe_lightning.models import SegmentationModel

    ctx.update(reg=reg, empty_score=empty_score)
    ctx["late"] = []
    for e in LATE:
        path = ctx["workdir"] / f"early_e{e}.pt"
        if path.exists():
            net = SegmentationModel(**ctx["model"].hparams)
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            ctx["late"].append(net.eval())


#: the development folds where the styled pairs imitate the site imperfectly: the interval rule is chosen there
IMPERFECT = ("mismatched", "content")


def pick_interval(intervals: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The interval rule and width factor for the product: per rule, the smallest factor whose mean held-out
    coverage reaches 90% on *each* kind of imperfect-imitation folds (IMPERFECT); of those, the narrowest
    (mean median width over the kinds); ties keep the simpler rule (INTERVALS order)."""
    rows = []
    for order, (iv, kinds) in enumerate(intervals.items()):
        factor = max(kinds[k]["factor"] for k in IMPERFECT)
        reached = all(kinds[k]["reached"] for k in IMPERFECT)
        width = float(np.mean([kinds[k]["scores"][f"{factor:g}"]["median_width"] for k in IMPERFECT]))
        rows.append((not reached, round(width, 3), order, iv, factor))
    _, width, _, iv, factor = min(rows)
    return {"interval": iv, "width_factor": factor, "median_width": width, "reached": not min(rows)[0]}


def site_development(ctx: dict[str, Any], cal: Any, seed: int) -> dict[str, Any]:
    """The signals rule (matched folds, as stop 8) and every interval rule's coverage and fitted width factor on
    the mismatched folds (and, for comparison, the matched ones). Development data only."""
    from spe_lightning.percase.sites import INTERVALS, choose_rule, fit_width_factor

    start = time.perf_counter()
    folds = site_folds(ctx, cal, seed)
    # the linear stack only: the recorded development runs (and the interval rule fixed on them) predate the
    # monotone map the product may also choose (docs/per_case.md, "Where per-case Dice piles up")
    choice = choose_rule(folds["matched"], seed=seed, shapes=("linear",))
    print("per-case rule chosen on development folds:", choice["rule"], flush=True)
    intervals = {
        iv: {kind: fit_width_factor(folds[kind], choice["rule"], iv, seed=seed) for kind in folds} for iv in INTERVALS
    }
    for iv, r in intervals.items():
        for kind, fit in r.items():
            one, at = fit["scores"]["1"], fit["scores"][f"{fit['factor']:g}"]
            print(
                f"interval {iv} on {kind} folds: coverage {one['coverage']:.3f} (median width "
                f"{one['median_width']:.3f}) at factor 1; factor for 90%: {fit['factor']} "
                f"(coverage {at['coverage']:.3f}, median width {at['median_width']:.3f})",
                flush=True,
            )
    return {
        **choice,
        "picked_interval": pick_interval(intervals),
        "n_folds": len(folds["matched"]),
        "n_mismatched_folds": len(folds["mismatched"]),
        "n_content_folds": len(folds["content"]),
        "intervals": intervals,
        "seconds": time.perf_counter() - start,
    }


def sites(ctx: dict[str, Any], reg: Any, empty_score: Any, seed: int, rule: list[str] | None = None) -> dict[str, Any]:
    """Issue 27 on the same model: the rule chosen on development folds, then per target the calibration-only
    map, the stop-8 interval rule and the product's interval rule (fixed beforehand on development folds:
    spe_lightning.percase.sites.INTERVAL_RULE, WIDTH_FACTOR), each recalibrated with that target's styled pairs
    (final numbers; nothing chosen here)."""
    from spe_lightning.engine.styled_pairs import styled_set
    from spe_lightning.percase.sites import INTERVAL_RULE, WIDTH_FACTOR, fit_site_calibration

    load_late(ctx, reg, empty_score)
    te = ctx["sets"]["test"]
    start = time.perf_counter()
    cal = case_signals(ctx, te["images"], te["truth"], np.arange(len(te["real"])))
    per_case_seconds = (time.perf_counter() - start) / len(te["real"])
    # ``rule`` given (--site-rule): the development folds are skipped and that stack is used (say where it came from)
    dev = site_development(ctx, cal, seed) if rule is None else {"rule": list(rule), "given": True, "scores": {}}
    out: dict[str, Any] = {
        "development": dev,
        "interval_rule": {"interval": INTERVAL_RULE, "width_factor": WIDTH_FACTOR},
        "n_late_checkpoints": len(ctx["late"]),
        "signal_seconds_per_case": per_case_seconds,
        "targets": {},
    }
    rule = dev["rule"]
    variants = {
        "calibration_only": (False, "heldout", 1.0),
        "styled": (True, "heldout", 1.0),  # stop 8's rule
        "styled_mismatch_rule": (True, INTERVAL_RULE, WIDTH_FACTOR),
    }
    for name in [n for n in ctx["sets"] if n not in ("train", "test")]:
        t = ctx["sets"][name]
        tgt = case_signals(ctx, t["images"], t["truth"])
        cal_all = cached(te["images"], te["truth"], "calibration")
        sty, style = styled_set(cal_all, cached(t["images"], None, name), seed, styling=STYLING)
        styled = case_signals(ctx, torch.stack(sty.inputs), te["truth"], np.arange(len(te["real"])))
        conf = np.asarray(tgt.signals["confidence"])
        row: dict[str, Any] = {"style": {k: v for k, v in style.items() if k != "target_images"}}
        for key, (use, iv, factor) in variants.items():
            site = fit_site_calibration(cal, styled if use else None, rule, seed=seed, interval=iv, width_factor=factor)
            row[key] = {**site_stats(site.estimate(tgt), tgt.real, conf), "calibration": site.to_dict()}
            row[key]["calibration"].pop("calibrated_features")
        row["styled_real_mean"] = float(np.mean(styled.real))
        out["targets"][name] = row
    return out


def _reference_seconds(repeats: int = 20) -> float:
    """A fixed CPU task (1-thread float32 matmuls), timed: the yardstick that makes timings on a loaded machine
    comparable (report a timing as a multiple of it)."""
    x = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    for _ in range(repeats):
        x = torch.tanh(x @ x / 512.0)
    return time.perf_counter() - start


def timing(dataset: str, workdir: Path, epochs: int, setting: str, seed: int, n_cases: int = 600) -> dict[str, Any]:
    """Regressor fit + per-case scoring of ``n_cases`` cases (wall seconds), as a run does it: the regressor fitted
    on the references, then per case its raw output, the label-free features and a per-target map's estimate
    with its interval. The cases are the training images repeated (no target is read); the load and a fixed
    CPU task timed before and after are reported beside the seconds."""
    from spe_lightning.percase.site_fit import features_of
    from spe_lightning.percase.sites import INTERVAL_RULE, WIDTH_FACTOR, CaseSignals, fit_site_calibration

    ctx = setup(dataset, workdir, epochs, seed, targets=False)
    tr, te = ctx["sets"]["train"], ctx["sets"]["test"]
    load_before, ref_before = os.getloadavg(), _reference_seconds()
    st = dict(CANDIDATE_SETTINGS[setting])
    start = time.perf_counter()
    reg = fit_regressor(st, (tr["gray"], tr["truth"]), extras_for(ctx, st.pop("extras")), seed)
    fit_seconds = time.perf_counter() - start
    te_raw = reg.predict(te["gray"], te["pred"]).numpy()
    te_sig = CaseSignals(
        {"regressor": te_raw, "confidence": te["conf"].numpy().astype(float)},
        features_of(te["gray"], list(te["pred"]), te["conf"]),
        te["real"],
        np.arange(len(te["real"])),
    )
    site = fit_site_calibration(
        te_sig, None, ("regressor", "confidence"), seed=seed, interval=INTERVAL_RULE, width_factor=WIDTH_FACTOR
    )
    pos = np.arange(n_cases) % len(tr["real"])
    g, pred, conf = tr["gray"][pos], tr["pred"][pos], tr["conf"][pos]
    start = time.perf_counter()
    raw = reg.predict(g, pred).numpy()
    cases = CaseSignals({"regressor": raw, "confidence": conf.numpy().astype(float)}, features_of(g, list(pred), conf))
    site.estimate(cases)
    score_seconds = time.perf_counter() - start
    ref_after, load_after = _reference_seconds(), os.getloadavg()
    return {
        "dataset": dataset,
        "setting": setting,
        "n_references": len(tr["real"]),
        "n_cases": n_cases,
        "fit_seconds": fit_seconds,
        "scoring_seconds": score_seconds,
        "total_seconds": fit_seconds + score_seconds,
        "reference_task_seconds": [ref_before, ref_after],
        "total_in_reference_tasks": (fit_seconds + score_seconds) / float(np.mean([ref_before, ref_after])),
        "load_before": load_before,
        "load_after": load_after,
        "threads": torch.get_num_threads(),
    }


def development_only(dataset: str, workdir: Path, epochs: int, setting: str, seed: int) -> dict[str, Any]:
    """The per-case interval rules on development folds only (no target set is loaded): what fixed
    spe_lightning.percase.sites.INTERVAL_RULE and WIDTH_FACTOR."""
    from spe_lightning.percase.rca import calibrate_flags
    from spe_lightning.percase.regressor import QualityRegressor

    ctx = setup(dataset, workdir, epochs, seed, targets=False)
    cache = ctx["workdir"] / f"regressor_{setting}_s{seed}.pt"
    if not cache.exists():
        raise SystemExit(f"{cache} is missing: run the full benchmark once to fit the regressor.")
    reg = QualityRegressor.from_state(torch.load(cache, map_location="cpu", weights_only=True))
    tr, te = ctx["sets"]["train"], ctx["sets"]["test"]
    rca_cal = rca_scores(tr["gray"], tr["truth"], te["gray"], te["pred"], None)
    flags = calibrate_flags(rca_cal.score.numpy(), te["real"], rca_cal.empty.numpy())
    load_late(ctx, reg, flags["empty_score"])
    cal = case_signals(ctx, te["images"], te["truth"], np.arange(len(te["real"])))
    return {"dataset": dataset, "setting": setting, "seed": seed, "development": site_development(ctx, cal, seed)}


if __name__ == "__main__":
    main()
