"""Choose the interval rules on development data: the labelled calibration pairs.

Each recorded shift run holds the calibration pairs its run measured at fit end (calibration =
the test split, i.e. development data; no extra_test, shifted copy or other site is read). Held
out one pair family at a time (a shift family, or all random subsets together), the interval model
is fitted on the other pairs and asked to cover the held-out pair's real difference.

Printed, over all runs' held-out pairs, per rule:

- coverage of the 90% interval, its median/mean/max width and the held-out MAE of the estimate;
- ``width sd over seeds``: per dataset, segmenter and metric the half-width of the model fitted on all
  pairs at the pairs' median move, its standard deviation over the seeds (averaged): how stable a width is;
- the reliability rule (``--reliability``): per run, segmenter and metric the rule fitted without a family,
  against whether SPE beat "estimate = calibration score" on that family (a confusion table).

Rules: ``old`` (conformal quantile, no span: the rule before issue 23), ``conformal + span``,
``normal`` (Student-t quantile of the normalised misses), ``normal + span`` (the default), and the
proportional scales ``s0=...`` kept from the first study.

    python benchmarks/interval_rules.py benchmarks/results/select_*.json
    python benchmarks/interval_rules.py --reliability benchmarks/results/select_*.json

The distance rule needs pairs that carry their label-free distance (runs made since issue 23; the
recorded select_*.json do not). ``--distance`` reads run reports (``spe_report.json``) and compares,
on held-out families farther than every remaining pair, no widening with widening by the distance
ratio (the default) and by its square root:

    python benchmarks/interval_rules.py --distance /tmp/demo_s*/tb/version_0/spe_report.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import numpy as np

from spe_lightning.engine.estimate import anchored_estimate, fit_interval_model, metric_range, pair_family
from spe_lightning.engine.interval_model import half_width as _half_width
from spe_lightning.engine.metrics import PAPER_METRICS
from spe_lightning.engine.records import CALIBRATION, fit_mapping, series

#: rule name -> (keyword arguments of ``fit_interval_model``, span the candidate moves)
RULES: dict[str, tuple[dict, bool]] = {
    "old (conformal)": ({"quantile": "conformal"}, False),
    "conformal + span": ({"quantile": "conformal"}, True),
    "normal": ({"quantile": "normal"}, False),
    "normal + span (default)": ({"quantile": "normal"}, True),
    "normal + span, G's move only": ({"quantile": "normal", "move": "g"}, True),
    "max(normal, conformal) + span": ({"quantile": "max"}, True),
}


def _runs(result: dict, metric: str):
    """Per segmenter: (G, p_c, r_c, pairs) of one recorded result."""
    for seg, raw in result["shift_raw"].items():
        records = result["records"][seg]
        pseudo, real = series(records, "pseudo", CALIBRATION, metric), series(records, "real", CALIBRATION, metric)
        g, _ = fit_mapping("linear", pseudo, real, metric)
        p_c, r_c = raw["calibration"]["pseudo"].get(metric), raw["calibration"]["real"].get(metric)
        if g is not None and p_c is not None and r_c is not None:
            yield seg, g, p_c, r_c, raw["pairs"]


def held_out(result: dict, rules: dict, level: float = 0.9, metric: str = "dice") -> dict:
    """Per rule: (covered, width, |error|) over held-out pairs of every segmenter of one result."""
    out: dict[str, list[tuple[bool, float, float]]] = {r: [] for r in rules}
    for _, g, p_c, r_c, pairs in _runs(result, metric):
        for fam in sorted({pair_family(p["name"]) for p in pairs}):
            train = [p for p in pairs if pair_family(p["name"]) != fam]
            test = [p for p in pairs if pair_family(p["name"]) == fam]
            for rule, (kwargs, span) in rules.items():
                model = fit_interval_model(train, metric, g, p_c, **kwargs)
                for p in test:
                    dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
                    if dp is None or dr is None or model is None:
                        continue
                    e = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model, span=span)
                    if e["lower"] is None:
                        continue
                    covered = e["lower"] <= r_c + dr <= e["upper"]
                    out[rule].append((covered, e["upper"] - e["lower"], abs(e["value"] - r_c - dr)))
    return out


def half_widths(result: dict, rules: dict, level: float = 0.9, metric: str = "dice") -> dict:
    """Per rule and segmenter: the half-width (all pairs) at the pairs' median anchored move, divided by the
    metric's range (hd95: by the calibration score)."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for seg, g, p_c, r_c, pairs in _runs(result, metric):
        moves = [abs(float(g.predict([p_c + p["d_pseudo"][metric]])[0]) - float(g.predict([p_c])[0]))
                 for p in pairs if p["d_pseudo"].get(metric) is not None]  # fmt: skip
        for rule, (kwargs, _) in rules.items():
            model = fit_interval_model(pairs, metric, g, p_c, **kwargs)
            if model is None:
                continue
            span = metric_range(metric) or max(abs(r_c), 1e-9)
            out[rule][seg] = _half_width(model, float(np.median(moves)), level) / span
    return out


def _row(name: str, rule: str, v: list[tuple[bool, float, float]]) -> str:
    w = [x for _, x, _ in v]
    cov = np.mean([c for c, _, _ in v])
    mae = np.mean([a for _, _, a in v])
    return (
        f"| {name} | {rule} | {len(v)} | {mae:.4f} | {cov:.2f} | {np.median(w):.3f} | {np.mean(w):.3f} | {max(w):.3f} |"
    )


def reliability(files: list[str], level: float = 0.9) -> None:
    """The reliability rule, fitted without each family, against SPE vs no move on that family."""
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # flag-unreliable & worse, flag & better, ...
    full: dict[str, list[str]] = defaultdict(list)
    for f in files:
        result = json.load(open(f))
        side = result.get("settings", {}).get("image_size")
        for metric in PAPER_METRICS:
            # as shift_scores and the run: hd95 ranges up to the image diagonal
            bounds = (0.0, float(side) * 2**0.5) if metric == "hd95" and side else None
            for seg, g, p_c, r_c, pairs in _runs(result, metric):
                model = fit_interval_model(pairs, metric, g, p_c, level=level, bounds=bounds)
                if model is not None:
                    r = model["reliability"]
                    full[metric].append(
                        f"{f.rsplit('/', 1)[-1][7:-5]}/{seg[:5]}: {'ok' if r['reliable'] else 'UNRELIABLE'} "
                        f"mae {r['held_out_mae']:.3g} vs {r['no_move_mae']:.3g}, half {r['half_width']:.3g}"
                    )
                for fam in sorted({pair_family(p["name"]) for p in pairs}):
                    train = [p for p in pairs if pair_family(p["name"]) != fam]
                    test = [p for p in pairs if pair_family(p["name"]) == fam]
                    model = fit_interval_model(train, metric, g, p_c, level=level, bounds=bounds)
                    if model is None:
                        continue
                    errs, still = [], []
                    for p in test:
                        dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
                        if dp is None or dr is None:
                            continue
                        e = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model)
                        errs.append(abs(e["value"] - r_c - dr))
                        still.append(abs(dr))
                    if not errs:
                        continue
                    worse = np.mean(errs) > np.mean(still)
                    flag = not model["reliability"]["reliable"]
                    table[metric][(0 if flag else 2) + (0 if worse else 1)] += 1
    print("| metric | flagged, SPE worse than no move | flagged, SPE better | kept, SPE worse | kept, SPE better |")
    print("|---|---|---|---|---|")
    for m, (a, b, c, d) in table.items():
        print(f"| {m} | {a} | {b} | {c} | {d} |")
    for m, rows in full.items():
        print(f"\n{m} (all pairs):\n  " + "\n  ".join(rows))


def distance_rules(files: list[str], metric: str = "dice", level: float = 0.9) -> None:
    """Held-out families beyond the remaining pairs' reach: coverage and width with and without widening."""
    out: dict[str, list[tuple[bool, float]]] = {"none": [], "sqrt(d / d_max)": [], "d / d_max (default)": []}
    inside: list[bool] = []
    for f in files:
        report = json.load(open(f))
        records = report["records"]
        x, y = series(records, "pseudo", CALIBRATION, metric), series(records, "real", CALIBRATION, metric)
        g, _ = fit_mapping(report["mapping"][metric]["kind"], x, y, metric)
        pairs = [p for p in report["pairs"] if p.get("distance") is not None]
        if g is None or not pairs:
            continue
        p_c, r_c = float(x[-1]), float(y[-1])
        for fam in sorted({pair_family(p["name"]) for p in pairs}):
            train = [p for p in pairs if pair_family(p["name"]) != fam]
            model = fit_interval_model(train, metric, g, p_c)
            if model is None:
                continue
            for p in (p for p in pairs if pair_family(p["name"]) == fam):
                dp, dr = p["d_pseudo"].get(metric), p["d_real"].get(metric)
                if dp is None or dr is None:
                    continue
                base = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model)  # no distance: no widening
                if p["distance"] <= model["distance"]:
                    inside.append(base["lower"] <= r_c + dr <= base["upper"])
                    continue
                reach = model["distance"]
                ratio = p["distance"] / reach
                for rule, d in (
                    ("none", None),
                    ("sqrt(d / d_max)", reach * ratio**0.5),
                    ("d / d_max (default)", reach * ratio),
                ):
                    e = anchored_estimate(g, metric, p_c + dp, p_c, r_c, level, model, distance=d)
                    out[rule].append((e["lower"] <= r_c + dr <= e["upper"], e["upper"] - e["lower"]))
    print(f"held-out pairs inside the reach: {len(inside)}, coverage {np.mean(inside) if inside else float('nan'):.2f}")
    print("| widening beyond the reach | held-out pairs farther than the rest | coverage | median width |")
    print("|---|---|---|---|")
    for rule, v in out.items():
        if v:
            print(f"| {rule} | {len(v)} | {np.mean([c for c, _ in v]):.2f} | {np.median([w for _, w in v]):.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--s0", type=float, nargs="*", default=[0.01, 1.0])
    ap.add_argument("--metric", default="dice")
    ap.add_argument("--reliability", action="store_true")
    ap.add_argument("--distance", action="store_true", help="FILES are spe_report.json of runs with pair distances")
    a = ap.parse_args()
    if a.distance:
        distance_rules(a.files, a.metric)
        return
    if a.reliability:
        reliability(a.files)
        return
    rules = dict(RULES)
    rules.update({f"s0={s:g}": ({"rule": "proportional", "s0": s, "quantile": "conformal"}, False) for s in a.s0})
    pooled: dict[str, list[tuple[bool, float, float]]] = {r: [] for r in rules}
    halves: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (dataset, seg, rule) -> per seed
    print("| file | rule | held-out pairs | MAE | coverage | median width | mean width | max width |")
    print("|---|---|---|---|---|---|---|---|")
    for f in a.files:
        result = json.load(open(f))
        for rule, v in held_out(result, rules, metric=a.metric).items():
            pooled[rule] += v
            if v:
                print(_row(f.rsplit("/", 1)[-1], rule, v))
        dataset = re.sub(r"_seed\d+", "", f.rsplit("/", 1)[-1])
        for rule, per_seg in half_widths(result, rules, metric=a.metric).items():
            for seg, h in per_seg.items():
                halves[(dataset, seg, rule)].append(h)
    for rule, v in pooled.items():
        if v:
            print(_row("all", rule, v))
    print("\n| rule | width sd over seeds (mean over dataset x segmenter) | max |")
    print("|---|---|---|")
    for rule in rules:
        sds = [2 * np.std(h) for (_, _, r), h in halves.items() if r == rule and len(h) > 1]
        print(f"| {rule} | {np.mean(sds):.4f} | {np.max(sds):.4f} |")


if __name__ == "__main__":
    main()
