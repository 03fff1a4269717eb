"""A chi-square goodness-of-fit test without SciPy (the project does not depend on it)."""

from __future__ import annotations

import math

import numpy as np


def chi_square_p(observed_K: np.ndarray, expected_K: np.ndarray) -> float:
    """Upper-tail p-value of Pearson's chi-square, df = K - 1.

    Uses the Wilson-Hilferty cube-root normal approximation, accurate to a few percent
    in p for df >= 10, which is plenty for "p > 1e-3" / "p < 1e-6" assertions.
    """
    observed_K, expected_K = np.asarray(observed_K, float), np.asarray(expected_K, float)
    stat = float(((observed_K - expected_K) ** 2 / expected_K).sum())
    df = len(observed_K) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))
