"""``spe-lightning benchmark paper``: the SPE paper's evaluation protocol on a folder dataset.

Train the reference model on ``ROOT/train`` with SPE (reference = train without augmentation,
calibration = ``ROOT/test``, target = ``ROOT/extra_test``, whose masks only score the result),
then compare estimated and real extra_test metrics across the recorded checkpoints for SPE
(one row per reverse segmenter) and for the baselines a user would try instead:

- ``calibration_score``: extra_test scores what the calibration split scores at that checkpoint;
- ``confidence``: the model's soft-Dice confidence on the target, mapped by a G of the same kind.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BenchmarkConfig",
    "main",
    "run_paper",
    "run_shift",
    "score_records",
    "selection_scores",
    "selection_targets",
    "shift_scores",
]


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _scores(est: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    if est.size == 0:
        return {"pearson_r": None, "mae": None, "final_abs_error": None}
    ok = np.isfinite(est) & np.isfinite(real)
    return {
        "pearson_r": _pearson(est, real),
        "mae": float(np.mean(np.abs(est[ok] - real[ok]))) if ok.any() else None,
        "final_abs_error": float(abs(est[-1] - real[-1])) if np.isfinite(est[-1]) and np.isfinite(real[-1]) else None,
    }


def checkpoint_series(
    records: Sequence[dict], target: str, metrics: Sequence[str], mapping: str = "linear", anchored: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Per metric, the per-checkpoint estimate of SPE, the calibration score and the confidence, and the truth."""
    from spe_lightning.engine.records import CALIBRATION, fit_and_estimate, fit_mapping, series

    fitted = fit_and_estimate(records, [target], metrics, mapping, anchored=anchored)
    conf_cal = series(records, "confidence", CALIBRATION, None)
    conf_t = series(records, "confidence", target, None)
    out: dict[str, dict[str, np.ndarray]] = {}
    for m in metrics:
        by_ckpt = fitted["by_checkpoint"][target].get(m) or [None] * len(records)  # absent when G could not fit
        cal = series(records, "real", CALIBRATION, m)
        g_conf, _ = fit_mapping(mapping, conf_cal, cal, m)
        out[m] = {
            "spe": np.asarray([np.nan if v is None else v for v in by_ckpt], dtype=float),
            "calibration_score": cal,
            "confidence": g_conf.predict(conf_t) if g_conf else np.full(len(records), np.nan),
            "real": series(records, "real", target, m),
        }
    return out


def score_on_common_checkpoints(rows: dict[str, np.ndarray], real: np.ndarray) -> dict[str, dict[str, Any]]:
    """Every method scored on the same checkpoints: those where the truth and every method have a value.

    A method without a value somewhere would otherwise be scored on easier checkpoints (e.g. SPE has
    none while no predicted mask is usable early in training); each row says how many were used.
    """
    ok = np.isfinite(real)
    for values in rows.values():
        if np.isfinite(values).any():  # a method never measured on this target (e.g. a selection target
            ok &= np.isfinite(values)  # measured for the first segmenter only) has no row, not an empty scoring
    n = len(real)
    # the final checkpoint keeps its place at the end: final_abs_error is still the last common checkpoint
    return {
        k: {**_scores(v[ok], real[ok]), "n_scored": int(ok.sum()), "n_checkpoints": n}
        for k, v in rows.items()
        if np.isfinite(v).any()
    }


def score_records(
    records: Sequence[dict], target: str, metrics: Sequence[str], mapping: str = "linear", anchored: bool = True
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per metric: SPE / calibration_score / confidence vs the target's real metric, on common checkpoints."""
    out = {}
    for m, rows in checkpoint_series(records, target, metrics, mapping, anchored).items():
        real = rows.pop("real")
        out[m] = score_on_common_checkpoints(rows, real)
    return out


@dataclass(frozen=True)
class BenchmarkConfig:
    """What one benchmark run trains and how SPE is set up (shared by :func:`run_paper` and :func:`run_shift`).

    ``segmenters``: ``"auto"`` or ``"name[:key=value,...]"`` each; the first one is the ``spe`` row.
    """

    data: str
    class_index: int = 1
    epochs: int = 30
    seed: int = 0
    segmenters: tuple[str, ...] = ("auto",)
    image_size: int = 128
    lr: float = 1e-3
    batch_size: int = 8
    support_size: int | None = None  # None: each segmenter's own (see SPECallback)
    max_references: int | None = None
    accelerator: str = "auto"
    log_dir: str = "spe_runs/benchmark"
    #: other sites as extra targets, ``(name, root)``: every split under the root, scored beside extra_test
    targets: tuple[tuple[str, str], ...] = ()
    select_every: int = 0  # shift: measure the selection targets at every k-th epoch (0: off)


def _train(cfg: BenchmarkConfig) -> tuple[Any, Any, list[Any], dict[int, Any], float]:
    """Train the reference model with one SPECallback per segmenter: ``(model, datamodule, callbacks,
    weights by recorded epoch, seconds)``."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from spe_lightning.callback import SPECallback
    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.models import SegmentationModel
    from spe_lightning.reverse.base import segmenter_from_text

    pl.seed_everything(cfg.seed)
    dm = FolderSegmentationDataModule(
        cfg.data,
        class_index=cfg.class_index,
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        target_splits=["extra_test"],
        extra_targets=dict(cfg.targets),
    )
    callbacks = [
        SPECallback(
            segmenter=s if s == "auto" else segmenter_from_text(s),
            support_size=cfg.support_size,
            max_references=cfg.max_references,
            seed=cfg.seed,
            verbose=i == 0,
        )
        for i, s in enumerate(cfg.segmenters)
    ]
    extra = [_selection_callback(callbacks[0], dm, cfg.seed, cfg.select_every)] if cfg.select_every > 0 else []
    snapshots = weight_snapshots(callbacks[0])  # for the quality regressor's row per checkpoint (issue 17)
    extra.append(snapshots)
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=1,
        logger=TensorBoardLogger(cfg.log_dir, name=Path(cfg.data).name),
        callbacks=[*callbacks, *extra],  # Lightning appends its own callbacks to this list
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    model = SegmentationModel(lr=cfg.lr)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return model, dm, callbacks, snapshots.weights, time.perf_counter() - start


def weight_snapshots(spe: Any) -> Any:
    """Benchmark only: a callback keeping a copy of the model's weights (CPU tensors, by epoch) at every
    epoch ``spe`` recorded, for the quality regressor's row per checkpoint."""
    from lightning.pytorch.callbacks import Callback

    class WeightSnapshots(Callback):
        def __init__(self) -> None:
            self.weights: dict[int, dict[str, Any]] = {}

        def take(self, trainer: Any, pl_module: Any) -> None:
            epoch, records = trainer.current_epoch, spe.run.records
            if records and records[-1]["epoch"] == epoch and epoch not in self.weights:
                self.weights[epoch] = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.take(trainer, pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.take(trainer, pl_module)

    return WeightSnapshots()


def fit_regressor(run: Any, model: Any, datamodule: Any, settings: Any = None) -> tuple[Any, float]:
    """The per-case quality regressor fitted on the run's references, calibrated on its calibration set at
    ``model``'s weights (as the callback does at fit end): ``(estimator, seconds)``. ``settings``: a
    :class:`~spe_lightning.percase.regressor.QualitySettings` (None: the product's)."""
    from spe_lightning.engine.records import CALIBRATION
    from spe_lightning.estimator import fit_estimator, with_case_scorer
    from spe_lightning.percase.regressor import RegressorScorer

    start = time.perf_counter()
    reference = datamodule.spe_datasets()["reference"]
    est = fit_estimator(run.outcome(), None)  # the run's artifact without per-case calibration
    est = with_case_scorer(est, model, RegressorScorer(settings), run.sets[CALIBRATION], reference)
    return est, time.perf_counter() - start


def _regressor_mean(est: Any, model: Any, data: Any) -> float | None:
    rows = est.case_estimates(model, data)
    values = [r["estimated_dice"] for r in rows if r["estimated_dice"] is not None]
    return float(np.mean(values)) if values else None


def regressor_by_checkpoint(est: Any, model: Any, run: Any, weights: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The quality regressor's mean per-case Dice estimate of every target of ``run`` at each recorded
    checkpoint (``weights`` by epoch), for the paper protocol's ``quality_regressor`` row. The regressor is
    fitted once, at the final weights, as a user fits it after training; ``model`` ends at its final weights."""
    from spe_lightning.engine.records import CALIBRATION

    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    targets = {n: d for n, d in run.sets.items() if n != CALIBRATION}
    means: dict[str, list[float | None]] = {n: [] for n in targets}
    epochs = sorted(weights)
    try:
        for epoch in epochs:
            model.load_state_dict(weights[epoch])
            for n, data in targets.items():
                means[n].append(_regressor_mean(est, model, data))
    finally:
        model.load_state_dict(final)
    return {"epochs": epochs, "means": means}


def _paper_result(cfg: BenchmarkConfig, callbacks: list, total: float) -> dict[str, Any]:
    segmenters = list(cfg.segmenters)
    spe_s = sum(r["seconds"] for cb in callbacks for r in cb.records)
    result: dict[str, Any] = {
        "dataset": Path(cfg.data).name,
        "class_index": cfg.class_index,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "settings": {k: v for k, v in asdict(cfg).items() if k != "log_dir"},
        "metrics": {},
        "segmenters": segmenters,
        "timing": {
            "train_s": total - spe_s,
            "spe_s": spe_s,
            "spe_s_per_checkpoint": {
                s: float(np.mean([r["seconds"] for r in cb.records])) for s, cb in zip(segmenters, callbacks)
            },
        },
    }
    result["records"] = {s: cb.records for s, cb in zip(segmenters, callbacks)}
    return paper_metrics(result)


def paper_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """Fill ``result["metrics"]`` (extra_test), ``metrics_by_target`` (every target) and ``real_dice_range``.

    Rows: ``spe`` (the callback's default, anchored), ``spe_paper`` (the paper's G(pseudo)),
    ``spe_huber`` / ``spe_isotonic`` (anchored with those kinds of G), ``spe_<segmenter>`` for
    extra segmenters, ``calibration_score``, ``confidence`` and, for Dice when measured,
    ``quality_regressor`` (mean per-case estimate); all scored on the same checkpoints.
    """
    from spe_lightning.engine.metrics import PAPER_METRICS

    segs = list(result["records"])
    first = result["records"][segs[0]]
    targets = [t for t in first[-1]["pseudo"] if t != "calibration"]
    main = "extra_test" if "extra_test" in targets else targets[0]  # the protocol's target
    real_dice = [v for r in first if (v := r["real"].get(main, {}).get("dice")) is not None]
    result["real_dice_range"] = [min(real_dice), max(real_dice)] if real_dice else [None, None]
    result["metrics_by_target"] = {}
    for target in targets:
        series_by_row: dict[str, dict[str, np.ndarray]] = {}  # metric -> row -> value per checkpoint
        for i, s in enumerate(segs):
            for m, rows in checkpoint_series(result["records"][s], target, PAPER_METRICS).items():
                table = series_by_row.setdefault(m, {"real": rows["real"]})
                table["spe" if i == 0 else f"spe_{s}"] = rows["spe"]
                if i == 0:
                    table["calibration_score"] = rows["calibration_score"]
                    table["confidence"] = rows["confidence"]
        for m, rows in checkpoint_series(first, target, PAPER_METRICS, anchored=False).items():
            series_by_row[m]["spe_paper"] = rows["spe"]
        for kind in ("huber", "isotonic"):
            for m, rows in checkpoint_series(first, target, PAPER_METRICS, kind).items():
                series_by_row[m][f"spe_{kind}"] = rows["spe"]
        by_ckpt = result.get("quality_regressor_by_checkpoint")
        if by_ckpt and target in by_ckpt["means"] and "dice" in series_by_row:  # the regressor estimates Dice only
            at = dict(zip(by_ckpt["epochs"], by_ckpt["means"][target]))
            values = [at.get(r["epoch"]) for r in first]
            series_by_row["dice"]["quality_regressor"] = np.asarray([np.nan if v is None else v for v in values])
        scored = {}
        for m, rows in series_by_row.items():
            real = rows.pop("real")
            scored[m] = score_on_common_checkpoints(rows, real)
        result["metrics_by_target"][target] = scored
    result["metrics"] = result["metrics_by_target"][main]
    return result


def _write(result: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))


def _with_regressor(
    result: dict[str, Any], model: Any, datamodule: Any, callbacks: list, weights: dict[int, Any]
) -> tuple[dict[str, Any], tuple[Any, float]]:
    """Add the quality regressor's per-checkpoint means (``quality_regressor_by_checkpoint``) and its row;
    returns the result and ``(fitted regressor, fit seconds)`` for the shift targets."""
    spe = callbacks[0]
    est, fit_s = fit_regressor(spe.run, model, datamodule)
    start = time.perf_counter()
    result["quality_regressor_by_checkpoint"] = {
        **regressor_by_checkpoint(est, model, spe.run, weights),
        "fit_s": fit_s,
        "eval_s": time.perf_counter() - start,
    }
    return paper_metrics(result), (est, fit_s)


def run_paper(cfg: BenchmarkConfig, out: str | None = None) -> dict[str, Any]:
    """Run the paper protocol; returns (and writes to ``out``) the JSON result."""
    model, dm, callbacks, weights, total = _train(cfg)
    result, _ = _with_regressor(_paper_result(cfg, callbacks, total), model, dm, callbacks, weights)
    _write(result, out)
    return result


def _measure(run: Any, model: Any, sets: dict[str, Any]) -> dict[str, Any]:
    """Pseudo metrics, real metrics and confidence of each of ``sets`` under ``model``'s weights (the run's path)."""
    rec = run.evaluate(model, sets=sets)
    return {
        name: {
            "pseudo": rec["pseudo"][name],
            "real": rec["real"].get(name, {}),
            "confidence": rec["confidence"][name],
            "n_support": rec["n_support"][name],
            "n_images": len(data),
            "distance": rec.get("distance", {}).get(name),  # label-free, to the calibration set (engine/distance.py)
        }
        for name, data in sets.items()
    }


def _regressor_means(regressor: tuple[Any, float], model: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """Per target, the mean of the fitted quality regressor's per-case Dice estimates, with its fit's seconds."""
    est, fit_s = regressor
    return {"means": {name: _regressor_mean(est, model, data) for name, data in targets.items()}, "fit_s": fit_s}


def shift_targets(run: Any, datamodule: Any, seed: int = 0) -> dict[str, Any]:
    """The benchmark's targets built from the run's ``extra_test``: clean, synthetic shifts, ``meta.csv`` groups."""
    from spe_lightning.data.folder import read_meta
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set, subset

    base = run.sets["extra_test"]
    targets = {"clean": subset(base, range(len(base)), "clean")}
    for fam in SHIFT_FAMILIES:
        for sev in (1, 2, 3):
            t = shift_set(base, fam, sev, seed=seed * 100_000)
            targets[t.name] = t
    ds = datamodule.spe_datasets()["target"]["extra_test"]
    meta = read_meta(datamodule.root)
    groups: dict[str, list[int]] = {}
    for pos, i in enumerate(base.indices):
        g = meta.get(ds.ids[i], {}).get("group")
        if g:
            groups.setdefault(g, []).append(pos)
    for g, members in sorted(groups.items()):
        if len(groups) > 1 and len(members) >= 5:
            targets[f"group_{g}"] = subset(base, members, f"group_{g}")
    return targets


#: the shifted targets measured at every k-th checkpoint for checkpoint selection (``--select-every``)
SELECTION_SEVERITY = "_2"


def selection_targets(run: Any, datamodule: Any, seed: int = 0) -> dict[str, Any]:
    """The targets scored for checkpoint selection: the synthetic shifts at severity 2 and the meta.csv groups."""
    every = shift_targets(run, datamodule, seed)
    return {n: t for n, t in every.items() if n.endswith(SELECTION_SEVERITY) or n.startswith("group_")}


def _selection_callback(spe: Any, datamodule: Any, seed: int, every: int) -> Any:
    """Benchmark only: a callback that, after SPE's record of every ``every``-th epoch, measures the selection
    targets (:func:`selection_targets`) at the same weights and adds them to that record (pseudo, real,
    confidence), so that each can be selected over checkpoints.

    Cost: one prediction and one reverse step per selection target and measured epoch (about the cost
    of one SPE target each, ~12 s per target on BUSI at 128 px on 2 CPU cores).
    """
    from lightning.pytorch.callbacks import Callback

    class SelectionTargets(Callback):
        def __init__(self) -> None:
            self.targets: dict[str, Any] | None = None

        def merge(self, trainer: Any, pl_module: Any) -> None:
            records = spe.run.records
            epoch = trainer.current_epoch
            if not records or records[-1]["epoch"] != epoch or (epoch + 1) % every or records[-1].get("selection"):
                return
            if self.targets is None:
                self.targets = selection_targets(spe.run, datamodule, seed)
            record = records[-1]
            for name, m in _measure(spe.run, pl_module, self.targets).items():
                record["pseudo"][name], record["real"][name] = m["pseudo"], m["real"]
                record["confidence"][name] = m["confidence"]
            record["selection"] = sorted(self.targets)

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.merge(trainer, pl_module)

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.merge(trainer, pl_module)

    return SelectionTargets()


def selection_scores(result: dict[str, Any], metric: str = "dice") -> dict[str, Any]:
    """Checkpoint selection per target (:func:`~spe_lightning.monitoring.selection.selection_regret`) and alert quality.

    Targets: every labelled set of the records but calibration: ``extra_test``, the run's other targets
    (``sites``) and the shifted targets measured at several checkpoints (``shifted``, ``--select-every``).
    Alerts: on the shifted targets at the final weights, threshold = final calibration Dice - 0.1, the
    estimate (``estimate``) or its lower bound (``lower``) against the real Dice crossing it.
    """
    from spe_lightning.engine.records import CALIBRATION
    from spe_lightning.monitoring.selection import alert_quality, selection_regret, selection_summary

    seg = next(iter(result["records"]))
    records = result["records"][seg]
    measured = sorted({n for r in records for n in r.get("selection", [])})
    labelled = {n for r in records for n, v in r["real"].items() if v and n != CALIBRATION}
    sites = sorted(labelled - set(measured) - {"extra_test"})  # other targets of the run (e.g. --target sites)
    names = [n for n in ["extra_test", *sites, *measured] if n in labelled]
    per_target = {t: selection_regret(records, t, metric) for t in names}
    out: dict[str, Any] = {
        "targets": per_target,
        "summary": {
            "all": selection_summary(per_target),
            "shifted": selection_summary(per_target, measured),
            "sites": selection_summary(per_target, sites),
        },
    }
    raw = result.get("shift_raw", {}).get(seg)
    if raw is not None and result.get("targets"):
        threshold = raw["calibration"]["real"][metric] - 0.1
        rows = [r for r in result["targets"] if r["name"] != "clean" and not r.get("site")]
        real = [r["real"].get(metric) for r in rows]
        out["alerts"] = {
            on: alert_quality([(r["spe"].get(metric) or {}).get(key) for r in rows], real, threshold)
            for on, key in (("estimate", "value"), ("lower", "lower"))
        }
    return out


def run_shift(cfg: BenchmarkConfig, out: str | None = None) -> dict[str, Any]:
    """Train as :func:`run_paper`, then estimate shifted versions of ``extra_test`` with the final weights.

    The result holds the paper-protocol scores too (same training), the raw measurements per
    target, the calibration set's final record and the product's calibration pairs (measured by
    the run at fit end, as the callback ships them), and every method's estimates (:func:`shift_scores`).
    """
    from spe_lightning.engine.records import CALIBRATION

    model, dm, callbacks, weights, total = _train(cfg)
    result, regressor = _with_regressor(_paper_result(cfg, callbacks, total), model, dm, callbacks, weights)
    start = time.perf_counter()
    targets = shift_targets(callbacks[0].run, dm, cfg.seed)
    sites = [name for name, _ in cfg.targets]
    targets.update({name: callbacks[0].run.sets[name] for name in sites})  # another site: its own rows
    result["site_targets"] = sites
    raw: dict[str, Any] = {}
    signals = _signals(callbacks[0].run, model, targets, weights, regressor)  # the new signals (issue 23)
    for s, cb in zip(cfg.segmenters, callbacks):
        last = cb.run.records[-1]
        raw[s] = {
            "calibration": {kind: last[kind][CALIBRATION] for kind in ("pseudo", "real", "confidence")},
            "targets": _measure(cb.run, model, targets),
            "pairs": cb.run.pairs,
        }
        if s == cfg.segmenters[0]:  # the per-case quality regressor's mean estimate per target (issue 17)
            raw[s]["quality_regressor"] = _regressor_means(regressor, model, targets)
            # and on the calibration pairs' sets (development data), to choose its combination with SPE
            dev = _regressor_means(regressor, model, cb.run.pair_sets())
            raw[s]["quality_regressor"]["dev_means"] = dev["means"]
            raw[s]["quality_regressor"]["heldout_dev_means"] = signals.pop("regressor_heldout_means")
            raw[s].update(signals)
        print(f"[shift] {s}: {len(targets)} targets evaluated; {len(raw[s]['pairs'])} calibration pairs")
    result["timing"]["shift_eval_s"] = time.perf_counter() - start
    result["shift_raw"] = raw
    result.update(shift_scores(result))
    result["pair_errors"] = pair_errors(result)
    result["all_signals"] = all_signal_combination(result)
    _all_signal_rows(result)
    # the benchmark's own signal work (a styled pair for every benchmark target, the snapshots' masks) and the
    # product's (one styled pair per run target, the masks kept at each record) for the same run
    result["timing"]["signals_s"] = raw[cfg.segmenters[0]].get("seconds", {})
    result["timing"]["product_signals_s"] = dict(callbacks[0].run.signal_seconds)
    result["timing"]["product_spe_s"] = callbacks[0].run.seconds - sum(callbacks[0].run.signal_seconds.values())
    result["selection"] = selection_scores(result)
    _write(result, out)
    return result


def _masks_by_epoch(
    run: Any, model: Any, sets: dict[str, Any], weights: dict[int, Any], epochs: Sequence[int]
) -> dict[str, list[list[Any]]]:
    """Each set's predicted masks at each of ``epochs`` (weights from the benchmark's snapshots); ``model``
    gets its own weights back afterwards."""
    from spe_lightning.engine.predict import model_device, predict_labels

    c = run.config
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, list[list[Any]]] = {n: [] for n in sets}
    device = model_device(model)
    try:
        for e in epochs:
            model.load_state_dict(weights[e])
            for n, data in sets.items():
                masks, _ = predict_labels(
                    model,
                    data,
                    device,
                    c.batch_size,
                    run.logits_fn,
                    c.activation,
                    c.threshold,
                    c.foreground_class,
                    c.class_indices or None,
                )
                out[n].append([(m > 0).reshape(-1).numpy() for m in masks])
    finally:
        model.load_state_dict(final)
    return out


def _signals(run: Any, model: Any, targets: dict[str, Any], weights: dict[int, Any], regressor: Any) -> dict[str, Any]:
    """The new signals of every benchmark target at the final weights (issue 23), with their seconds:

    - ``styled_pairs``: per target, the labelled pair of the calibration set restyled as that target
      (``engine/styled_pairs.py``; the product makes it for its own targets at fit end);
    - ``agreement``: per target and per calibration pair set, the mean pairwise Dice of the masks of the last
      ``AGREEMENT_K`` recorded checkpoints (the benchmark's targets are built after training, so their masks at
      those checkpoints come from the weight snapshots), and the map fitted on the calibration cases;
    - ``regressor_heldout_means``: the regressor's mean estimate on each shifted pair set with its calibration
      map refitted without that shift family (so the combination is chosen on data it was not fitted on).
    """
    from spe_lightning.engine.agreement import AGREEMENT_K, pairwise_agreement
    from spe_lightning.engine.calibration_pairs import pairs_from_record
    from spe_lightning.engine.records import CALIBRATION
    from spe_lightning.engine.signals import agreement_fit
    from spe_lightning.engine.styled_pairs import styled_name, styled_set
    from spe_lightning.estimator import heldout_regressor_means

    out: dict[str, Any] = {"seconds": {}}
    cal = run.sets[CALIBRATION]
    start = time.perf_counter()
    styled, styles = {}, {}
    for i, (n, data) in enumerate(targets.items()):
        sset, style = styled_set(cal, data, seed=run.config.seed * 7919 + 31 * i)
        styled[sset.name], styles[n] = sset, {k: v for k, v in style.items() if k != "target_images"}
    record = run.evaluate(model, sets=styled)
    last = run.records[-1]
    for kind in ("pseudo", "real"):
        record[kind][CALIBRATION] = last[kind].get(CALIBRATION, {})
    names = {styled_name(n): n for n in targets}
    out["styled_pairs"] = {p["target"]: p for p in pairs_from_record(record, CALIBRATION, list(styled), names)}
    out["styles"] = styles
    out["seconds"]["styled_pairs"] = time.perf_counter() - start
    print(f"[shift] styled pairs for {len(styled)} targets ({out['seconds']['styled_pairs']:.1f}s)")

    start = time.perf_counter()
    epochs = sorted(weights)[-AGREEMENT_K:]
    pair_sets = run.pair_sets()
    masks = _masks_by_epoch(run, model, {CALIBRATION: cal, **targets, **pair_sets}, weights, epochs)
    per_case = {n: pairwise_agreement(m) for n, m in masks.items()}
    fit = agreement_fit(run.history, cal)  # the product's map: calibration cases at the final record
    mean = {n: (float(np.nanmean(v)) if np.isfinite(v).any() else None) for n, v in per_case.items()}
    out["agreement"] = {
        "epochs": epochs,
        "map": fit,
        "calibration": mean[CALIBRATION],
        "calibration_run": run.history.agreement(CALIBRATION),  # the product's own (should equal "calibration")
        "targets": {n: mean[n] for n in targets},
        "pairs": {n: mean[n] for n in pair_sets},
    }
    out["seconds"]["agreement"] = time.perf_counter() - start
    print(f"[shift] agreement over epochs {epochs} ({out['seconds']['agreement']:.1f}s)")
    out["regressor_heldout_means"] = heldout_regressor_means(regressor[0], model, cal, pair_sets, run.logits_fn)
    return out


def _interval(est: dict[str, Any]) -> dict[str, Any]:
    """``{value, lower, upper}`` of an estimate (the benchmark's rows keep only these), with the flags of
    issue 23 where set: ``reliable`` (False: value None, the numbers under ``withheld``) and
    ``outside_calibrated_range``."""
    out = {k: est[k] for k in ("value", "lower", "upper")}
    out.update({k: est[k] for k in ("reliable", "outside_calibrated_range", "withheld") if est.get(k) is not None})
    return out


def shift_scores(result: dict[str, Any], level: float = 0.9) -> dict[str, Any]:
    """Per target and metric the estimate of every method, and a summary (MAE, coverage, false alarms).

    Methods: ``spe`` (the callback's default: anchored estimate, intervals from the calibration
    pairs; a synthetic target's own shift family is left out of its interval model),
    ``spe_paper`` (the paper's ``G(pseudo)`` with G's leave-one-out interval),
    ``calibration_score`` and ``confidence``; extra segmenters add ``spe_<name>`` rows.
    """
    from spe_lightning.engine.agreement import agreement_estimate
    from spe_lightning.engine.calibration_pairs import pairs_for_target
    from spe_lightning.engine.estimate import estimate, finite_or_none, fit_interval_model
    from spe_lightning.engine.metrics import PAPER_METRICS
    from spe_lightning.engine.records import CALIBRATION, fit_mapping, series
    from spe_lightning.percase.combination import combined_value

    segs = list(result["shift_raw"])
    raw0 = result["shift_raw"][segs[0]]
    names = list(raw0["targets"])
    sites = set(result.get("site_targets", []))
    rows: list[dict[str, Any]] = [
        {
            "name": n,
            "site": n in sites,
            "real": raw0["targets"][n]["real"],
            "spe": {},
            "calibration_score": {},
            "confidence": {},
        }
        for n in names
    ]
    combination = None
    for i, seg in enumerate(segs):
        raw, records = result["shift_raw"][seg], result["records"][seg]
        tag = "" if i == 0 else f"_{seg}"
        conf_cal = series(records, "confidence", CALIBRATION, None)
        cal = raw["calibration"]
        for m in PAPER_METRICS:
            real_cal = series(records, "real", CALIBRATION, m)
            g, _ = fit_mapping("linear", series(records, "pseudo", CALIBRATION, m), real_cal, m)
            g_conf, _ = fit_mapping("linear", conf_cal, real_cal, m)
            p_c, r_c = cal["pseudo"].get(m), cal["real"].get(m)
            if i == 0 and m == "dice":
                combination = _combination(raw, g, p_c, r_c)
            side = result.get("settings", {}).get("image_size")  # hd95 ends at the image diagonal (2D here)
            bounds = (0.0, float(side) * 2**0.5) if m == "hd95" and side else None
            for row, n in zip(rows, names):
                t = raw["targets"][n]
                p_t = t["pseudo"].get(m)
                family = n.rsplit("_", 1)[0] + "_" if n.rsplit("_", 1)[-1] in ("1", "2", "3") else None
                generic = pairs_for_target(raw["pairs"], None)  # the run's own targets' styled pairs left out
                styled = (raw.get("styled_pairs") or {}).get(n)  # this target's styled pair (first segmenter)
                with_styled = generic + ([styled] if styled else [])

                fit_kw: dict[str, Any] = {"exclude": family, "bounds": bounds, "level": level}
                est_kw: dict[str, Any] = {"distance": t.get("distance"), "bounds": bounds}
                model = fit_interval_model(with_styled, m, g, p_c, **fit_kw) if g is not None else None
                anchor = (p_c, r_c, model)
                row.setdefault(f"spe{tag}", {})[m] = _interval(estimate(g, m, p_t, level, anchor=anchor, **est_kw))
                if i == 0 and styled:  # SPE as before issue 23: generic pairs only
                    model = fit_interval_model(generic, m, g, p_c, **fit_kw) if g is not None else None
                    row.setdefault("spe_without_styled", {})[m] = _interval(
                        estimate(g, m, p_t, level, anchor=(p_c, r_c, model), **est_kw)
                    )
                if i == 0 and styled and r_c is not None and styled["d_real"].get(m) is not None:
                    row.setdefault("styled_calibration_score", {})[m] = r_c + styled["d_real"][m]
                if i == 0 and m == "dice" and "agreement" in raw:
                    agree = raw["agreement"]
                    row["soft_dice_confidence"] = {"dice": finite_or_none(t["confidence"])}
                    row["agreement"] = {"dice": agreement_estimate(agree["map"], agree["targets"].get(n))}
                if i == 0:
                    row.setdefault("spe_paper", {})[m] = _interval(estimate(g, m, p_t, level))
                    row["calibration_score"][m] = r_c
                    if m == "dice" and "quality_regressor" in raw:  # the regressor estimates Dice only
                        row.setdefault("quality_regressor", {})[m] = raw["quality_regressor"]["means"].get(n)
                    c = g_conf.predict([t["confidence"]])[0] if g_conf and t["confidence"] is not None else None
                    row["confidence"][m] = finite_or_none(c)
    if combination is not None:
        w = combination["weight"]
        for row in rows:
            spe_v, reg_v = (row["spe"].get("dice") or {}).get("value"), (row.get("quality_regressor") or {}).get("dice")
            value = combined_value(w, reg_v, spe_v)
            row["spe_combined"] = {"dice": value}
    for row in rows:  # a method without a value for this target still gets its (empty) entry
        for meth in {k for r in rows for k in r if k not in ROW_FIELDS}:
            row.setdefault(meth, {})
    methods = [k for k in rows[0] if k not in ROW_FIELDS]
    # another site's rows are reported on their own, never averaged with the synthetic shifts
    summary = _summary([r for r in rows if not r["site"]], methods)
    site_summary = {r["name"]: _summary([r], methods) for r in rows if r["site"]}
    return {"targets": rows, "summary": summary, "sites": site_summary, "level": level, "combination": combination}


def _combination(raw: dict[str, Any], g: Any, p_c: float | None, r_c: float | None) -> dict[str, Any] | None:
    """The weight of the regressor in ``w * regressor + (1 - w) * spe`` (Dice), chosen on development data only
    (:func:`~spe_lightning.percase.combination.combination_from_pairs`: the calibration pairs' sets at the final
    weights). None when the run did not measure the regressor on them."""
    from spe_lightning.percase.combination import combination_from_pairs

    q = raw.get("quality_regressor") or {}
    dev = q.get("heldout_dev_means", q.get("dev_means"))  # older results: the means on the fitted families
    return combination_from_pairs(raw["pairs"], dev or {}, g, p_c, r_c)


def pair_errors(result: dict[str, Any]) -> dict[str, Any]:
    """Each signal's Dice error on the calibration pairs' sets (development data, real Dice known), every
    pair predicted without its own family where the signal is fitted on pairs: ``spe`` (its move rule fitted
    on the other families), ``quality_regressor`` (its map refitted without the family; subsets skipped);
    ``calibration_score``, ``soft_dice_confidence``, ``confidence`` (its G across checkpoints) and
    ``agreement`` (its map from the calibration cases) are not fitted on pairs. Per signal: ``mae`` over the
    pairs where it has a value, ``n`` and the error per pair."""
    from spe_lightning.engine.agreement import agreement_estimate
    from spe_lightning.engine.calibration_pairs import pairs_for_target
    from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, pair_family
    from spe_lightning.engine.records import CALIBRATION, fit_mapping, series

    seg = next(iter(result["shift_raw"]))
    raw, records = result["shift_raw"][seg], result["records"][seg]
    real_cal = series(records, "real", CALIBRATION, "dice")
    g, _ = fit_mapping("linear", series(records, "pseudo", CALIBRATION, "dice"), real_cal, "dice")
    g_conf, _ = fit_mapping("linear", series(records, "confidence", CALIBRATION, None), real_cal, "dice")
    p_c, r_c = raw["calibration"]["pseudo"].get("dice"), raw["calibration"]["real"].get("dice")
    if g is None or p_c is None or r_c is None:
        return {}
    pairs = pairs_for_target(raw["pairs"], None)
    reg = (raw.get("quality_regressor") or {}).get("heldout_dev_means") or {}
    agree = raw.get("agreement") or {}
    errors: dict[str, dict[str, float]] = {}
    predicted: dict[str, dict[str, float]] = {}
    truth: dict[str, float] = {}
    for p in pairs:
        dp, dr = p["d_pseudo"].get("dice"), p["d_real"].get("dice")
        if dp is None or dr is None:
            continue
        real = r_c + dr
        fam = pair_family(p["name"])
        model = fit_interval_model([q for q in pairs if pair_family(q["name"]) != fam], "dice", g, p_c)
        values = {
            "spe": anchored_estimate(g, "dice", p_c + dp, p_c, r_c, interval_model=model)["value"],
            "calibration_score": r_c,
            "soft_dice_confidence": p.get("confidence"),
            "confidence": float(g_conf.predict([p["confidence"]])[0]) if g_conf and p.get("confidence") else None,
            "quality_regressor": reg.get(p["name"]),
            "agreement": agreement_estimate(agree["map"], agree["pairs"].get(p["name"])) if agree else None,
        }
        truth[p["name"]] = float(real)
        for k, v in values.items():
            if v is not None and np.isfinite(v):
                errors.setdefault(k, {})[p["name"]] = float(abs(v - real))
                predicted.setdefault(k, {})[p["name"]] = float(v)
    out: dict[str, Any] = {
        k: {"mae": float(np.mean(list(e.values()))), "n": len(e), "by_pair": e, "values": predicted[k]}
        for k, e in errors.items()
    }
    out["real"] = truth
    return out


#: the signals item 4 of issue 23 may combine, the simplest first (SPE alone)
COMBINED_SIGNALS = ("spe", "quality_regressor", "agreement")


def _weight_grid(n: int, step: float = 0.25) -> list[tuple[float, ...]]:
    """Weights on the simplex over ``n`` signals in steps of ``step``, the simplest (SPE alone) first, then by
    how many signals they mix."""
    k = int(round(1 / step))
    grid = [tuple(c / k for c in combo) for combo in np.ndindex(*(k + 1,) * n) if sum(combo) == k]
    return sorted(grid, key=lambda w: (sum(v > 0 for v in w), -w[0]))


def all_signal_combination(result: dict[str, Any], level: float = 0.9) -> dict[str, Any] | None:
    """Item 4 of issue 23: one Dice estimate ``sum_k w_k * signal_k`` over :data:`COMBINED_SIGNALS`, the weights
    chosen on the calibration pairs' shifted families only (every signal held out as in :func:`pair_errors`).

    ``heldout_mae``: each family predicted with weights chosen on the other families (nested), against SPE's
    own held-out error on the same pairs; ``weights``: chosen on every family (ties keep the simpler rule);
    ``half_width``: the split-conformal ``level`` quantile of the nested held-out misses. ``adopted``: whether
    it beat SPE on the held-out families of this run (adoption needs it across development runs).
    """
    from spe_lightning.engine.estimate import pair_family

    errs = result.get("pair_errors") or {}
    real = errs.get("real") or {}
    names = [
        n
        for n in real
        if not n.startswith("subset") and all(n in (errs.get(s) or {}).get("values", {}) for s in COMBINED_SIGNALS)
    ]
    if len({pair_family(n) for n in names}) < 3:
        return None
    x = np.asarray([[errs[s]["values"][n] for s in COMBINED_SIGNALS] for n in names])
    y = np.asarray([real[n] for n in names])
    fam = np.asarray([pair_family(n) for n in names])
    grid = _weight_grid(len(COMBINED_SIGNALS))

    def choose(mask: np.ndarray) -> tuple[float, ...]:
        maes = [float(np.mean(np.abs(x[mask] @ np.asarray(w) - y[mask]))) for w in grid]
        best = min(maes)
        return grid[next(i for i, m in enumerate(maes) if m <= best + 1e-12)]  # ties: the simpler rule

    pred = np.zeros(len(y))
    for f in np.unique(fam):
        out = fam == f
        pred[out] = x[out] @ np.asarray(choose(~out))
    miss = np.abs(pred - y)
    spe_miss = np.abs(x[:, 0] - y)
    q = np.sort(miss)[min(len(miss), int(np.ceil((len(miss) + 1) * level))) - 1]
    weights = choose(np.ones(len(y), bool))
    return {
        "signals": list(COMBINED_SIGNALS),
        "weights": [float(w) for w in weights],
        "pairs": names,
        "heldout_mae": float(miss.mean()),
        "spe_heldout_mae": float(spe_miss.mean()),
        "half_width": float(q),
        "adopted": bool(miss.mean() < spe_miss.mean()),
    }


def _all_signal_rows(result: dict[str, Any]) -> None:
    """Add the ``all_signals`` row (item 4, with its conformal interval) to every target and rescore the
    summaries. It is a row beside SPE's, never in its place: adoption needs it to win across development runs."""
    combo = result.get("all_signals")
    if not combo:
        return
    w = combo["weights"]
    for row in result["targets"]:
        vals = [(row.get(s) or {}).get("dice") for s in combo["signals"]]
        vals = [v["value"] if isinstance(v, dict) else v for v in vals]
        if any(v is None for v in vals):
            row["all_signals"] = {"dice": None}
            continue
        v = float(np.dot(w, [float(x) for x in vals if x is not None]))
        h = combo["half_width"]
        row["all_signals"] = {"dice": {"value": v, "lower": max(0.0, v - h), "upper": min(1.0, v + h)}}
    methods = [k for k in result["targets"][0] if k not in ROW_FIELDS]
    result["summary"] = _summary([r for r in result["targets"] if not r["site"]], methods)
    result["sites"] = {r["name"]: _summary([r], methods) for r in result["targets"] if r["site"]}


#: the fields of a shift-benchmark row that are not methods
ROW_FIELDS = ("name", "real", "site")


def unshifted(name: str) -> bool:
    """Whether a shift-benchmark target is unshifted: ``clean`` or a ``group_*`` of extra_test (not a
    synthetic shift ``<family>_<severity>``, not another site)."""
    return name == "clean" or name.startswith("group_")


#: a Dice false alarm: on an unshifted target whose real Dice is at most this far below the calibration
#: score, the estimate is more than ``ALARM_DROP`` below the calibration score
ALARM_TOLERANCE, ALARM_DROP = 0.02, 0.05


def _summary(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per metric and method over ``rows``: MAE, max error, interval coverage and widths, Dice false alarms
    (an estimate more than ``ALARM_DROP`` below the calibration score on an unshifted target whose real
    Dice stayed within ``ALARM_TOLERANCE`` of it: a user told to act for nothing)."""
    from spe_lightning.engine.metrics import PAPER_METRICS

    summary: dict[str, Any] = {}
    for m in PAPER_METRICS:
        summary[m] = {}
        for meth in methods:
            errs, cover, widths, alarms = [], [], [], 0
            for r in rows:
                real = r["real"].get(m)
                e = r[meth].get(m)
                v = e["value"] if isinstance(e, dict) else e
                if real is None or v is None:
                    continue
                errs.append(abs(v - real))
                if isinstance(e, dict) and e["lower"] is not None:
                    cover.append(e["lower"] <= real <= e["upper"])
                    widths.append(e["upper"] - e["lower"])
                cal = (r.get("calibration_score") or {}).get(m)
                if m == "dice" and cal is not None and unshifted(r["name"]) and not r.get("site"):
                    alarms += int(real >= cal - ALARM_TOLERANCE and v < cal - ALARM_DROP)
            summary[m][meth] = {
                "mae": float(np.mean(errs)) if errs else None,
                "max_abs_error": float(np.max(errs)) if errs else None,
                "n": len(errs),
            }
            flags = [r[meth].get(m) for r in rows if isinstance(r[meth].get(m), dict)]
            if any("reliable" in e for e in flags):  # issue 23: rows SPE declared unreliable (no value)
                summary[m][meth]["n_unreliable"] = sum(e.get("reliable") is False for e in flags)
            if cover:
                summary[m][meth].update(
                    coverage=float(np.mean(cover)),
                    median_width=float(np.median(widths)),
                    max_width=float(np.max(widths)),
                )
            if m == "dice":
                summary[m][meth]["false_alarms"] = alarms
        summary[m]["coverage"] = summary[m].get("spe", {}).get("coverage")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """``spe-lightning benchmark paper --data ROOT --class-index K --epochs N --seed S --out FILE.json``."""
    parser = argparse.ArgumentParser(prog="spe-lightning benchmark")
    sub = parser.add_subparsers(dest="which", required=True)
    parsers = [sub.add_parser("paper", help="the SPE paper's protocol with baselines")]
    parsers.append(sub.add_parser("shift", help="estimates on shifted copies of extra_test (same training)"))
    for p in parsers:
        _add_common(p)
    parsers[1].add_argument(
        "--select-every",
        type=int,
        default=0,
        help="measure the severity-2 shifts and meta.csv groups at every k-th epoch, for label-free checkpoint "
        "selection per target (0: only extra_test is selected over checkpoints)",
    )
    a = parser.parse_args(argv)
    cfg = BenchmarkConfig(
        data=a.data,
        class_index=a.class_index,
        epochs=a.epochs,
        seed=a.seed,
        segmenters=tuple(a.segmenters),
        image_size=a.image_size,
        lr=a.lr,
        batch_size=a.batch_size,
        max_references=a.max_references,
        accelerator=a.accelerator,
        targets=tuple(_parse_target(t) for t in a.target),
        select_every=getattr(a, "select_every", 0),
    )
    res = (run_paper if a.which == "paper" else run_shift)(cfg, a.out)
    _print_paper(res)
    if a.which == "shift":
        _print_shift(res)
        _print_selection(res["selection"])


def _parse_target(text: str) -> tuple[str, str]:
    name, sep, root = text.partition("=")
    if not sep or not name or not root:
        raise ValueError(f"--target takes NAME=ROOT (e.g. covid_cxr=../shared/datasets/covid_cxr), got {text!r}.")
    if not Path(root).is_dir():
        raise ValueError(f"--target {name}: no folder {root}.")
    return name, root


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset root: <root>/{train,test,extra_test}/{images,masks}")
    p.add_argument("--class-index", type=int, default=1)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--segmenters", nargs="+", default=["auto"], help="first one is 'spe'; others are extra rows")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the recorded runs used 1e-3")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-references", type=int, default=None)
    p.add_argument("--accelerator", default="auto")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=ROOT",
        help="another site's labelled images (ROOT/<split>/{images,masks}, all splits used) as an extra target; "
        "repeatable; reported as its own rows",
    )


def _print_paper(res: dict[str, Any]) -> None:
    lo, hi = res["real_dice_range"]
    print(f"\n{res['dataset']}: real extra_test Dice over checkpoints {lo:.3f}-{hi:.3f}")
    print("| metric | method | pearson r | MAE | final abs err |\n|---|---|---|---|---|")
    for m, rows in res["metrics"].items():
        for method, s in rows.items():
            cells = ["n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("pearson_r", "mae", "final_abs_error")]
            print(f"| {m} | {method} | " + " | ".join(cells) + " |")
    t = res["timing"]
    print(f"train {t['train_s']:.0f}s, SPE {t['spe_s']:.0f}s (overhead {t['spe_s'] / max(t['train_s'], 1e-9):.2f})")


def _print_shift(res: dict[str, Any]) -> None:
    methods = [k for k in res["targets"][0] if k not in ROW_FIELDS]
    print("\n| target | real dice | " + " | ".join(methods) + " |\n|" + "---|" * (len(methods) + 2))
    for r in res["targets"]:
        cells = []
        for meth in methods:
            e = r[meth].get("dice")
            v = e["value"] if isinstance(e, dict) else e
            cells.append("n/a" if v is None else f"{v:.3f}")
        real = r["real"].get("dice")
        print(f"| {r['name']} | {'n/a' if real is None else f'{real:.3f}'} | " + " | ".join(cells) + " |")
    print("\n| metric | method | MAE | max abs err | coverage | false alarms |\n|---|---|---|---|---|---|")
    for m, per in res["summary"].items():
        for meth, s in per.items():
            if not isinstance(s, dict):
                continue
            mae = "n/a" if s["mae"] is None else f"{s['mae']:.3f}"
            mx = "n/a" if s["max_abs_error"] is None else f"{s['max_abs_error']:.3f}"
            cov = f"{s['coverage']:.2f}" if "coverage" in s else ""
            print(f"| {m} | {meth} | {mae} | {mx} | {cov} | {s.get('false_alarms', '')} |")


def _print_selection(sel: dict[str, Any]) -> None:
    print("\n| target | oracle Dice | SPE regret | SPE (running) regret | validation regret |\n|---|---|---|---|---|")
    for t, r in sel["targets"].items():

        def f(rule: str, r: dict[str, Any] = r) -> str:
            v = r[rule]["regret"]
            return "n/a" if v is None else f"{v:.4f} (ep {r[rule]['epoch']})"

        real = "n/a" if r["oracle"]["real"] is None else f"{r['oracle']['real']:.3f}"
        print(f"| {t} | {real} | {f('spe')} | {f('spe_running')} | {f('validation')} |")
    for name, s in sel["summary"].items():
        cells = ", ".join(
            f"{k} {'n/a' if s[k] is None else f'{s[k]:.4f}'}" for k in ("spe", "spe_running", "validation")
        )
        print(f"mean regret over {name} targets ({s['n_targets']}): {cells}")
    for on, q in sel.get("alerts", {}).items():
        p = "n/a" if q["precision"] is None else f"{q['precision']:.2f}"
        r = "n/a" if q["recall"] is None else f"{q['recall']:.2f}"
        print(
            f"alerts on the {on} (threshold {q['threshold']:.3f}): precision {p}, recall {r} "
            f"({q['true_alerts']} of {q['alerts']} alerts, {q['crossings']} real crossings)"
        )
