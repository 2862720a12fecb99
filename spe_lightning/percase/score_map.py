"""The per-case map from stacked signals to Dice: a straight line, or a monotone map of the line's score.

:func:`fit_score_map` fits the stack (least squares with a small ridge) and, for ``shape="isotonic"``,
scikit-learn's isotonic regression of the stack's score to Dice, stored as knots that
:func:`apply_score_map` interpolates. The knots sit at each isotonic block's *mean score* (its centre), not at
its ends: the fitted values are then strictly increasing in the score between the first and last block,
so the map keeps the stack's ranking of cases (a step map ties every case of a block, which costs the flags'
AUROC) and moves smoothly between the levels where Dice piles up (near 0, near 1). Plain NumPy after the fit;
what is fitted is plain numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["SHAPES", "apply_score_map", "centred_knots", "design", "fit_score_map", "fit_stack"]

#: shapes of the map from the stacked score to Dice: a straight line, or a monotone (isotonic) map of it
SHAPES = ("linear", "isotonic")


def design(signals: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The design matrix of a stack: the named signals' columns and an intercept column."""
    missing = [n for n in names if n not in signals]
    if missing:
        raise ValueError(f"this rule stacks {', '.join(missing)}, which these cases do not have.")
    cols = [np.asarray(signals[n], float).reshape(-1) for n in names]
    return np.stack([*cols, np.ones_like(cols[0])], 1)


def fit_stack(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Least squares, a small ridge on the signal weights (not the intercept): stable with collinear signals."""
    pen = np.eye(x.shape[1]) * ridge * len(y)
    pen[-1, -1] = 0.0
    return np.linalg.solve(x.T @ x + pen, x.T @ y)


def centred_knots(score: np.ndarray, fitted: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Knots of a monotone map through each block of equal ``fitted`` value at the block's mean ``score``.

    ``fitted`` is an isotonic (non-decreasing) fit of ``score``: its blocks are runs of consecutive scores,
    so their mean scores increase with their values, and interpolating between them is strictly increasing.
    """
    score, fitted = np.asarray(score, float), np.asarray(fitted, float)
    levels, block = np.unique(fitted, return_inverse=True)
    centres = np.bincount(block, weights=score) / np.bincount(block)
    return tuple(float(v) for v in centres), tuple(float(v) for v in levels)


def fit_score_map(x: np.ndarray, y: np.ndarray, shape: str) -> tuple[np.ndarray, tuple[float, ...], tuple[float, ...]]:
    """The stack's weights and, for ``shape="isotonic"``, the knots (:func:`centred_knots`) of scikit-learn's
    isotonic regression of its score to Dice (bounded to [0, 1]); ``shape="linear"`` has no knots."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}.")
    coef = fit_stack(x, y)
    if shape == "linear":
        return coef, (), ()
    from sklearn.isotonic import IsotonicRegression

    score = x @ coef
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit_transform(score, y)
    knots_x, knots_y = centred_knots(score, fitted)
    return coef, knots_x, knots_y


def apply_score_map(
    x: np.ndarray, coef: np.ndarray | Sequence[float], knots_x: Sequence[float], knots_y: Sequence[float]
) -> np.ndarray:
    """Per case, the map's Dice in [0, 1]: the stack, then the knots if any (flat beyond the first and last)."""
    score = x @ np.asarray(coef, float)
    if len(knots_x):
        score = np.interp(score, np.asarray(knots_x, float), np.asarray(knots_y, float))
    return np.clip(score, 0.0, 1.0)
