"""The estimation engine: plain PyTorch / NumPy / scikit-learn, usable without Lightning.

One file per step of SPE (see docs/architecture.md): ``cached_set`` (datasets in memory),
``predict`` (the model's masks), ``spe_engine`` (support sets, the reverse step, pseudo and
real metrics), ``mapping`` (G), ``estimate`` (pseudo metric -> estimate with interval),
``calibration_pairs`` (labelled pairs for the intervals), ``records`` (G over a run's records),
``shifts``, ``styled_pairs``, ``agreement``, ``soft_dice``, ``distance``. Per-case scoring lives in
:mod:`spe_lightning.percase`, monitoring in :mod:`spe_lightning.monitoring`, outputs in
:mod:`spe_lightning.reporting`. :class:`spe_lightning.SPERun` puts them together::

    ref = cache_dataset("reference", train_set, working_size=128, require_masks=True)
    engine = SPEEngine(make_segmenter("label_fusion"), ref, PAPER_METRICS)
    record = engine.evaluate({"calibration": (cal, cal_masks, cal_conf), "site_b": (tgt, tgt_masks, tgt_conf)})
"""

from spe_lightning.engine.cached_set import CachedSet, cache_dataset
from spe_lightning.engine.estimate import estimate
from spe_lightning.engine.mapping import MAPPINGS, MetricMapping, NotEnoughPointsError
from spe_lightning.engine.metrics import PAPER_METRICS, per_image_metrics
from spe_lightning.engine.records import CALIBRATION, fit_and_estimate
from spe_lightning.engine.results import Estimate
from spe_lightning.engine.run_report import SPEReport
from spe_lightning.engine.spe_engine import SPEEngine

__all__ = [
    "CALIBRATION",
    "MAPPINGS",
    "PAPER_METRICS",
    "CachedSet",
    "Estimate",
    "MetricMapping",
    "NotEnoughPointsError",
    "SPEEngine",
    "SPEReport",
    "cache_dataset",
    "estimate",
    "fit_and_estimate",
    "per_image_metrics",
]
