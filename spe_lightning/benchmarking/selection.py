"""Label-free checkpoint selection in the shift benchmark: the shifted targets measured at every k-th
checkpoint (a record hook of the run, :class:`SelectionTargets`) and the selection and alert scores."""

from __future__ import annotations

from typing import Any

from torch import nn

from spe_lightning.benchmarking.targets import measure, selection_targets
from spe_lightning.engine.records import CALIBRATION, as_records
from spe_lightning.monitoring.selection import alert_quality, selection_regret, selection_summary
from spe_lightning.run import SPERun

__all__ = ["SelectionTargets", "selection_scores"]


class SelectionTargets:
    """A record hook of the run (``SPERun.record_hooks``): at every ``every``-th epoch, the selection targets
    (:func:`~spe_lightning.benchmarking.targets.selection_targets`) measured at the record's weights (pseudo,
    real, confidence), so that each can be selected over checkpoints; the run adds them to the record before
    keeping it and lists them under ``"selection"``.

    Cost: one prediction and one reverse step per selection target and measured epoch (about the cost
    of one SPE target each, ~12 s per target on BUSI at 128 px on 2 CPU cores).
    """

    def __init__(self, run: SPERun, datamodule: Any, seed: int, every: int) -> None:
        self.run, self.datamodule, self.seed, self.every = run, datamodule, seed, every
        self.targets: dict[str, Any] | None = None  # built at the first measured epoch (the run's sets exist)

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, dict[str, Any]]:
        if (epoch + 1) % self.every:
            return {}
        if self.targets is None:
            self.targets = selection_targets(self.run, self.datamodule, self.seed)
        return measure(self.run, model, self.targets)


def selection_scores(result: dict[str, Any], metric: str = "dice") -> dict[str, Any]:
    """Checkpoint selection per target (:func:`~spe_lightning.monitoring.selection.selection_regret`) and alert quality.

    Targets: every labelled set of the records but calibration: ``extra_test``, the run's other targets
    (``sites``) and the shifted targets measured at several checkpoints (``shifted``, ``--select-every``).
    Alerts: on the shifted targets at the final weights, threshold = final calibration Dice - 0.1, the
    estimate (``estimate``) or its lower bound (``lower``) against the real Dice crossing it.
    """
    seg = next(iter(result["records"]))
    records = as_records(result["records"][seg])  # stored JSON records, or the run's own
    measured = sorted({n for r in records for n in r.selection or ()})
    labelled = {n for r in records for n, v in r.real.items() if v and n != CALIBRATION}
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
