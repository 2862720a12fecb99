"""The estimation engine: metrics, support sets, the reverse step, the mapping G and reports.

Plain PyTorch / NumPy / scikit-learn; usable without a Lightning Trainer (and without importing
Lightning), e.g. with ``make_segmenter`` from :mod:`spe_lightning.reverse`::

    ref = cache_dataset("reference", train_set, working_size=128, require_masks=True)
    engine = SPEEngine(make_segmenter("label_fusion"), ref, PAPER_METRICS)
    record = engine.evaluate({"calibration": (cal, cal_masks, cal_conf), "site_b": (tgt, tgt_masks, tgt_conf)})
"""

from spe_lightning.engine.estimation import CALIBRATION, fit_and_estimate
from spe_lightning.engine.mapping import MAPPINGS, Mapping, NotEnoughPointsError
from spe_lightning.engine.metrics import PAPER_METRICS, per_image_metrics
from spe_lightning.engine.predict import CachedSet, cache_dataset, predict_set
from spe_lightning.engine.spe import SPEEngine

__all__ = [
    "CALIBRATION",
    "MAPPINGS",
    "PAPER_METRICS",
    "CachedSet",
    "Mapping",
    "NotEnoughPointsError",
    "SPEEngine",
    "cache_dataset",
    "fit_and_estimate",
    "per_image_metrics",
    "predict_set",
]
