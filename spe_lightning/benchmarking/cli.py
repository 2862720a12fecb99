"""``spe-lightning benchmark paper|shift``: the arguments and the printed tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spe_lightning.benchmarking.paper import run_paper
from spe_lightning.benchmarking.scoring import ROW_FIELDS
from spe_lightning.benchmarking.shift import run_shift
from spe_lightning.benchmarking.training import BenchmarkConfig

__all__ = ["main", "parse_target", "print_paper", "print_shift", "print_selection"]


def main(argv: Sequence[str] | None = None) -> None:
    """``spe-lightning benchmark paper --data ROOT --class-index K --epochs N --seed S --out FILE.json``."""
    parser = argparse.ArgumentParser(prog="spe-lightning benchmark")
    sub = parser.add_subparsers(dest="which", required=True)
    parsers = [sub.add_parser("paper", help="the SPE paper's protocol with baselines")]
    parsers.append(sub.add_parser("shift", help="estimates on shifted copies of extra_test (same training)"))
    for p in parsers:
        add_common_arguments(p)
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
        targets=tuple(parse_target(t) for t in a.target),
        select_every=getattr(a, "select_every", 0),
        styling=a.styling,
    )
    res = (run_paper if a.which == "paper" else run_shift)(cfg, a.out)
    print_paper(res)
    if a.which == "shift":
        print_shift(res)
        print_selection(res["selection"])


def parse_target(text: str) -> tuple[str, str]:
    name, sep, root = text.partition("=")
    if not sep or not name or not root:
        raise ValueError(f"--target takes NAME=ROOT (e.g. covid_cxr=../shared/datasets/covid_cxr), got {text!r}.")
    if not Path(root).is_dir():
        raise ValueError(f"--target {name}: no folder {root}.")
    return name, root


def add_common_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--styling", default="v1", help="the target-styled sets' recipe (SPEConfig.styling)")
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=ROOT",
        help="another site's labelled images (ROOT/<split>/{images,masks}, all splits used) as an extra target; "
        "repeatable; reported as its own rows",
    )


def print_paper(res: dict[str, Any]) -> None:
    lo, hi = res["real_dice_range"]
    print(f"\n{res['dataset']}: real extra_test Dice over checkpoints {lo:.3f}-{hi:.3f}")
    print("| metric | method | pearson r | MAE | final abs err |\n|---|---|---|---|---|")
    for m, rows in res["metrics"].items():
        for method, s in rows.items():
            cells = ["n/a" if s[k] is None else f"{s[k]:.3f}" for k in ("pearson_r", "mae", "final_abs_error")]
            print(f"| {m} | {method} | " + " | ".join(cells) + " |")
    t = res["timing"]
    print(f"train {t['train_s']:.0f}s, SPE {t['spe_s']:.0f}s (overhead {t['spe_s'] / max(t['train_s'], 1e-9):.2f})")


def print_shift(res: dict[str, Any]) -> None:
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


def print_selection(sel: dict[str, Any]) -> None:
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
