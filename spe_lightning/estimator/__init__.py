"""The fitted SPE estimator: the boundary between a finished run and everything after it.

- :class:`RunOutcome` (``fitting.py``): what a finished :class:`~spe_lightning.SPERun` hands over;
- :func:`fit_estimator` (``fitting.py``): every step of finishing, once (artifact, RCA calibration, the
  quality regressor and its combination with SPE);
- :class:`FittedSPE` (``fitted.py``): the fitted state as frozen data, saved and loaded by ``persistence.py``
  (``torch.load(weights_only=True)``: a file cannot run code);
- :class:`SPEEstimator` (``core.py`` on ``base.py``): applies it to new data, never changed after construction;
- :class:`EstimateResult`, :class:`ChunkedResult` (``results.py``): its typed results.

The package never imports the run: ``run.py`` imports it.
"""

from spe_lightning.estimator.core import SPEEstimator
from spe_lightning.estimator.fitted import FittedSPE
from spe_lightning.estimator.fitting import RunOutcome, fit_estimator, heldout_regressor_means, with_case_scorer
from spe_lightning.estimator.persistence import FORMAT, VERSION, IncompatibleEstimatorError
from spe_lightning.estimator.results import ChunkedResult, EstimateResult
from spe_lightning.percase.scorer import CaseRow

__all__ = [
    "SPEEstimator",
    "FittedSPE",
    "RunOutcome",
    "fit_estimator",
    "with_case_scorer",
    "heldout_regressor_means",
    "EstimateResult",
    "ChunkedResult",
    "CaseRow",
    "FORMAT",
    "VERSION",
    "IncompatibleEstimatorError",
]
