"""Restyling of the calibration set chosen on development data (issue 23, item 1 follow-up).

SPE restyles the labelled calibration set like each unlabelled target (``engine/styled_pairs.py``) and uses
the model's real score on the styled set as a per-target pair and as the ``styled_calibration_score`` row.
This script measures, on development data only, which restyling makes that styled score predict a
target's real score:

- tasks: JSRT lungs (class 1), JSRT heart (class 2), BUSI lesion (class 1);
- models: the benchmark's ``SegmentationModel`` trained on the **train** split at 128 px (the data module and
  model ``benchmark shift`` trains, without its SPE callbacks), two states per task (epochs 8 and 25) so that
  quality varies; weights cached under ``/tmp/styling_dev``;
- the **test** split cut into two fixed halves by seed: A plays the calibration set, B the unlabelled
  target. Dev targets from B: clean, each family of :mod:`spe_lightning.engine.shifts` at severities 1-3,
  and (BUSI) B's ``meta.csv`` groups; their real Dice is known from B's masks;
- each restyling variant (:class:`~spe_lightning.engine.styled_pairs.Styling`) restyles A toward each target
  (the target's images only) and is scored by the MAE of (model's Dice on styled A) against (model's Dice on the
  target), per task and pooled, and the signed bias on the clean target.

extra_test, its shifted copies and other sites are never read.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/styling_dev.py --out benchmarks/results/styling_dev.json
    python benchmarks/styling_dev.py --table benchmarks/results/styling_dev.json
    python benchmarks/styling_dev.py --tasks jsrt_heart --pairs heart.json   # item 3: the styled pairs' position
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
CACHE = Path("/tmp/styling_dev")
#: task -> (dataset folder, class index)
TASKS: dict[str, tuple[str, int]] = {"jsrt_lungs": ("jsrt", 1), "jsrt_heart": ("jsrt", 2), "busi_lesion": ("busi", 1)}
#: the model states scored per task (epochs of one training run)
EPOCHS = (8, 25)
IMAGE_SIZE = 128
#: A is capped at this many images (the styled set's size; B keeps its whole half)
MAX_A = 40


def weights_path(task: str, epoch: int, seed: int) -> Path:
    return CACHE / f"{task}_seed{seed}_epoch{epoch}.pt"


def train_task(task: str, seed: int = 0) -> None:
    """Train the benchmark's model on ``task``'s train split and keep its weights at :data:`EPOCHS` (cached)."""
    if all(weights_path(task, e, seed).exists() for e in EPOCHS):
        return
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    from spe_lightning.benchmarking.training import BenchmarkConfig
    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.models import SegmentationModel

    folder, cls = TASKS[task]
    cfg = BenchmarkConfig(data=str(DATA / folder), class_index=cls, seed=seed, epochs=max(EPOCHS))

    class Keep(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            epoch = trainer.current_epoch + 1
            if epoch in EPOCHS:
                state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
                torch.save(state, weights_path(task, epoch, seed))
                print(f"[styling_dev] {task}: epoch {epoch} kept", flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    # as benchmarking.training.train builds them (same config defaults), without the SPE callbacks
    pl.seed_everything(cfg.seed)
    dm = FolderSegmentationDataModule(
        cfg.data, class_index=cfg.class_index, image_size=cfg.image_size, batch_size=cfg.batch_size, target_splits=[]
    )
    trainer = pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[Keep()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(SegmentationModel(lr=cfg.lr), datamodule=dm)
    print(f"[styling_dev] {task}: trained in {time.perf_counter() - start:.0f}s", flush=True)


#: the variants scored: FDA band x histogram matching x noise+blur (one target image per calibration image),
#: plus "several target images" (3 styled copies per calibration image) for the per-image recipes
BETAS = (0.0, 0.01, 0.02, 0.05)
HISTOGRAMS = ("off", "image", "pooled")


def variants(grid: str = "reduced") -> dict[str, Any]:
    """``{name: Styling}``. ``"full"``: FDA band x histogram x noise+blur, plus 3 target images per calibration
    image for today's recipe and its FDA-free version (26 variants, 30 set evaluations per target).
    ``"reduced"`` (what the CPU allowed for all three tasks): FDA band x histogram with noise+blur on, noise+blur
    off for four of them, and 3 target images for today's recipe (17 variants, 19 evaluations per target).
    ``b0_hoff_nb0_r1`` is A mapped into each target image's intensity range (about the calibration score)."""
    from spe_lightning.engine.styled_pairs import Styling

    if grid not in ("full", "reduced"):
        raise ValueError(f"grid must be 'full' or 'reduced', got {grid!r}.")
    full = grid == "full"
    out = {}
    for beta, hist, nb in itertools.product(BETAS, HISTOGRAMS, (False, True)):
        if full or nb or (beta, hist) in {(0.0, "off"), (0.0, "image"), (0.0, "pooled"), (0.05, "image")}:
            out[variant_name(beta, hist, nb, 1)] = Styling(beta, hist, nb, 1)
    for beta in (0.0, 0.05) if full else (0.05,):  # 3x the cost each
        out[variant_name(beta, "image", True, 3)] = Styling(beta, "image", True, 3)
    return out


def variant_name(beta: float, hist: str, nb: bool, refs: int) -> str:
    return f"b{beta:g}_h{hist}_nb{int(nb)}_r{refs}"


def complexity(name: str) -> int:
    """Steps a variant runs (ties between variants keep the one with fewer)."""
    beta, hist, nb, refs = name.split("_")
    return int(beta != "b0") + int(hist != "hoff") + int(nb == "nb1") + int(refs != "r1")


def dev_sets(task: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """``(A, targets)``: the test split cut in two fixed halves by ``seed``; A (at most :data:`MAX_A` images)
    plays the calibration set; the targets are made from B (clean, every shift family at severities 1-3, the
    ``meta.csv`` groups of at least 5 images: ``benchmarking.targets.targets_from``, as the shift benchmark)."""
    from spe_lightning.benchmarking.targets import targets_from
    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.engine.cached_set import cache_dataset
    from spe_lightning.engine.shifts import subset

    folder, cls = TASKS[task]
    dm = FolderSegmentationDataModule(str(DATA / folder), class_index=cls, image_size=IMAGE_SIZE, target_splits=[])
    ds: Any = dm.spe_datasets()["calibration"]  # the test split
    assert ds.split == "test"
    test = cache_dataset("test", ds, working_size=64, require_masks=True)
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(perm) // 2
    a = subset(test, sorted(perm[:half])[:MAX_A], "calibration")
    b_pos = sorted(perm[half:])
    b = subset(test, b_pos, "B")
    targets = targets_from(b, ds.ids, ds.root, seed)
    return a, targets


def load_models(task: str, seed: int) -> dict[int, Any]:
    from spe_lightning.models import SegmentationModel

    models = {}
    for e in EPOCHS:
        m = SegmentationModel()
        m.load_state_dict(torch.load(weights_path(task, e, seed), weights_only=True))
        models[e] = m.eval()
    return models


@torch.no_grad()
def dice(model: Any, data: Any) -> float:
    """The model's mean per-image Dice on a labelled set (foreground: logit > 0, as the benchmark's model)."""
    from spe_lightning.engine.metrics import per_image_metrics

    values = []
    for pos, x in data.batches(32):
        pred = model(x.float()) > 0
        mask = torch.stack([data.masks[p] for p in pos]).bool()
        values.append(per_image_metrics(pred, mask, ["dice"])["dice"])
    return float(torch.cat(values).mean())


def run_task(task: str, seed: int, grid: dict[str, Any]) -> dict[str, Any]:
    """Real Dice of every dev target and the Dice of A restyled by every variant toward it, per model state."""
    from spe_lightning.engine.styled_pairs import styled_set, target_style

    a, targets = dev_sets(task, seed)
    models = load_models(task, seed)
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(targets["clean"]), "targets": {}}
    out["calibration_dice"] = {str(e): dice(m, a) for e, m in models.items()}  # the calibration score on A
    start = time.perf_counter()
    for i, (tname, target) in enumerate(targets.items()):
        st_seed = seed * 7919 + 31 * i
        style = target_style(a, target, st_seed)  # shared by the variants (target-only estimate)
        row: dict[str, Any] = {"style": style, "real": {}, "styled": {}}
        for e, m in models.items():
            row["real"][str(e)] = dice(m, target)
        for vname, recipe in grid.items():
            sset, _ = styled_set(a, target, seed=st_seed, styling=recipe, style=style)
            row["styled"][vname] = {str(e): dice(m, sset) for e, m in models.items()}
        out["targets"][tname] = row
        print(f"[styling_dev] {task} {tname}: real {row['real']} ({time.perf_counter() - start:.0f}s)", flush=True)
    out["seconds"] = time.perf_counter() - start
    return out


def scores(result: dict[str, Any]) -> dict[str, Any]:
    """Per variant: MAE of styled vs real Dice per task and pooled (mean of the tasks), signed bias on clean."""
    tasks = result["tasks"]
    # the variants every task has (a task run on the full grid has more)
    names = [
        v
        for v in next(iter(next(iter(tasks.values()))["targets"].values()))["styled"]
        if all(v in row["styled"] for tr in tasks.values() for row in tr["targets"].values())
    ]
    out: dict[str, Any] = {}
    for v in names:
        per_task, bias = {}, {}
        for task, tr in tasks.items():
            errs = [row["styled"][v][e] - row["real"][e] for row in tr["targets"].values() for e in row["real"]]
            per_task[task] = sum(abs(x) for x in errs) / len(errs)
            clean = tr["targets"]["clean"]
            bias[task] = sum(clean["styled"][v][e] - clean["real"][e] for e in clean["real"]) / len(clean["real"])
        out[v] = {
            "mae": per_task,
            "pooled_mae": sum(per_task.values()) / len(per_task),
            "clean_bias": bias,
            "complexity": complexity(v),
        }
    return out


#: variants within this pooled MAE of the best are tied; the tie keeps the fewest steps (then the lower MAE)
TIE = 0.003


def choose(sc: dict[str, Any]) -> str:
    best = min(s["pooled_mae"] for s in sc.values())
    tied = [v for v, s in sc.items() if s["pooled_mae"] <= best + TIE]
    return min(tied, key=lambda v: (sc[v]["complexity"], sc[v]["pooled_mae"]))


def table(result: dict[str, Any]) -> str:
    sc = scores(result)
    tasks = list(result["tasks"])
    chosen, v1 = choose(sc), variant_name(0.05, "image", True, 1)
    head = (
        "| variant | "
        + " | ".join(f"MAE {t}" for t in tasks)
        + " | pooled MAE | "
        + " | ".join(f"clean bias {t}" for t in tasks)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 * len(tasks) + 2)]
    for v in sorted(sc, key=lambda v: sc[v]["pooled_mae"]):
        s = sc[v]
        tag = " (chosen)" if v == chosen else (" (v1, today)" if v == v1 else "")
        tag += " (= A unstyled)" if v == "b0_hoff_nb0_r1" else ""
        lines.append(
            f"| {v}{tag} | "
            + " | ".join(f"{s['mae'][t]:.3f}" for t in tasks)
            + f" | {s['pooled_mae']:.3f} | "
            + " | ".join(f"{s['clean_bias'][t]:+.3f}" for t in tasks)
            + " |"
        )
    n = {t: len(result["tasks"][t]["targets"]) * len(EPOCHS) for t in tasks}
    lines.append("")
    lines.append(f"rows per task (targets x model states): {n}; chosen: {chosen} (ties within {TIE} keep fewer steps)")
    lines += ["", by_family(result, [chosen, v1, "b0_hoff_nb0_r1"])]
    return "\n".join(lines)


def family(target: str) -> str:
    """``noise_2`` -> ``noise``; ``clean`` and ``group_*`` stay as they are (groups pooled as ``groups``)."""
    if target.startswith("group_"):
        return "groups"
    head, _, sev = target.rpartition("_")
    return head if sev in ("1", "2", "3") else target


def by_family(result: dict[str, Any], names: list[str]) -> str:
    """MAE per target family (all tasks, model states and severities pooled) of the variants ``names``."""
    fams: dict[str, dict[str, list[float]]] = {}
    for tr in result["tasks"].values():
        for tname, row in tr["targets"].items():
            f = fams.setdefault(family(tname), {v: [] for v in names})
            for v in names:
                f[v] += [abs(row["styled"][v][e] - row["real"][e]) for e in row["real"]]
    lines = ["| family (tasks pooled) | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for fam, errs in fams.items():
        lines.append(f"| {fam} | " + " | ".join(f"{sum(errs[v]) / len(errs[v]):.3f}" for v in names) + " |")
    return "\n".join(lines)


def pair_check(task: str, seed: int, names: list[str], epoch: int = EPOCHS[-1]) -> dict[str, Any]:
    """Item 3: does a recipe's styled pair ``(pseudo diff, real diff)`` (styled A minus A) lie closer to the
    target's true pair (target minus A)? SPE's reverse step ``label_fusion`` (50 references from the train split),
    the model at ``epoch``; the dev targets of :func:`dev_sets` rebuilt from the run's own cached B."""
    import dataclasses

    from torch.utils.data import Subset

    from spe_lightning import SPEConfig, SPERun
    from spe_lightning.data import FolderSegmentationDataModule
    from spe_lightning.engine.shifts import SHIFT_FAMILIES, shift_set
    from spe_lightning.engine.styled_pairs import styled_set, target_style
    from spe_lightning.reverse.base import segmenter_from_text

    folder, cls = TASKS[task]
    dm = FolderSegmentationDataModule(str(DATA / folder), class_index=cls, image_size=IMAGE_SIZE, target_splits=[])
    spe = dm.spe_datasets()
    test: Any = spe["calibration"]
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(perm) // 2
    a_idx, b_idx = sorted(perm[:half])[:MAX_A], sorted(perm[half:])
    config = SPEConfig(max_references=50, seed=seed, metrics=("dice",), verbose=False)
    run = SPERun(config, segmenter=segmenter_from_text("label_fusion"))
    run.prepare(spe["reference"], Subset(test, a_idx), {"clean": Subset(test, b_idx)})
    model = load_models(task, seed)[epoch]
    a, b = run.sets["calibration"], run.sets["clean"]
    targets = {"clean": b}
    for fam in SHIFT_FAMILIES:
        for sev in (1, 2, 3):
            t = shift_set(b, fam, sev, seed=seed * 100_000)
            targets[t.name] = t
    start = time.perf_counter()
    base = run.evaluate(model)
    rec = run.evaluate(model, sets={n: t for n, t in targets.items() if n != "clean"})
    styled = {}
    for i, (tname, t) in enumerate(targets.items()):
        st_seed = seed * 7919 + 31 * i
        style = target_style(a, t, st_seed)
        for v in names:
            sset, _ = styled_set(a, t, seed=st_seed, styling=v, style=style)
            styled[f"{v}/{tname}"] = dataclasses.replace(sset, name=f"{v}/{tname}")
    srec = run.evaluate(model, sets=styled, from_calibration=True)

    def value(r: dict[str, Any], kind: str, n: str) -> float:
        return float(r[kind][n]["dice"])

    p0, r0 = value(base, "pseudo", "calibration"), value(base, "real", "calibration")
    out: dict[str, Any] = {"epoch": epoch, "calibration": {"pseudo": p0, "real": r0}, "targets": {}}
    for tname in targets:
        r = base if tname == "clean" else rec
        row = {"true": [value(r, "pseudo", tname) - p0, value(r, "real", tname) - r0]}
        for v in names:
            row[v] = [value(srec, "pseudo", f"{v}/{tname}") - p0, value(srec, "real", f"{v}/{tname}") - r0]
        out["targets"][tname] = row
    summary = {}
    for v in names:
        rows = list(out["targets"].values())
        dp = [abs(x[v][0] - x["true"][0]) for x in rows]
        dr = [abs(x[v][1] - x["true"][1]) for x in rows]
        summary[v] = {
            "pseudo_diff_mae": sum(dp) / len(dp),
            "real_diff_mae": sum(dr) / len(dr),
            "distance": sum(math.hypot(x, y) for x, y in zip(dp, dr)) / len(dp),
        }
    out["summary"], out["seconds"] = summary, time.perf_counter() - start
    print(f"[styling_dev] pairs {task}: {summary} ({out['seconds']:.0f}s)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-only", action="store_true", help="only train and cache the models")
    p.add_argument("--tasks", nargs="*", default=list(TASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", choices=("full", "reduced"), default="reduced")
    p.add_argument("--out", default="benchmarks/results/styling_dev.json")
    p.add_argument("--table", metavar="JSON", help="print the table of a result file and exit")
    p.add_argument("--pairs", metavar="JSON", help="item 3: write the pair check of v1 and the chosen recipe here")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    torch.set_num_threads(1)
    for t in a.tasks:
        train_task(t, a.seed)
    if a.pairs:
        names = ["v1", "histogram_noise_blur"]
        Path(a.pairs).write_text(json.dumps({t: pair_check(t, a.seed, names) for t in a.tasks}, indent=1))
        return
    if a.train_only:
        return
    grid = variants(a.grid)
    result: dict[str, Any] = {
        "protocol": {
            "seed": a.seed,
            "epochs": list(EPOCHS),
            "image_size": IMAGE_SIZE,
            "max_a": MAX_A,
            "grid": a.grid,
            "variants": {n: r.to_dict() for n, r in grid.items()},
            "splits": "train (models), test halves A (calibration) / B (targets); nothing else read",
        },
        "tasks": {},
    }
    for t in a.tasks:  # each task's result is cached, so tasks can run in parallel processes and be merged
        cached = CACHE / f"{t}_seed{a.seed}_result.json"
        old = json.loads(cached.read_text()) if cached.exists() else None
        if old is None or not set(result["protocol"]["variants"]) <= set(old.get("variants", {})):
            old = {"variants": result["protocol"]["variants"], "result": run_task(t, a.seed, grid)}
            cached.write_text(json.dumps(old))
        result["tasks"][t] = old["result"]
    result["seconds"] = {t: result["tasks"][t]["seconds"] for t in a.tasks}
    result["scores"] = scores(result)
    result["chosen"] = choose(result["scores"])
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
