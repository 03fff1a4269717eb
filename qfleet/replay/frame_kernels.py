"""The frame codec's two passes over a chunk's frames as numba-compiled loops (the ``fast``
extra; frame_codec keeps its NumPy forms as the reference and the fallback).

On a 256-row chunk of Atari stacks (2048 frames of 84x84, 260 distinct), NumPy took
~2 ms for the fingerprints (an integer matmul: not BLAS) and ~8 ms for the byte check
(gathering every frame's representative into a 14 MB copy, then comparing); here the
fingerprints are the same numbers, and the check reads each frame once, in place.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def fingerprints(words_XW: np.ndarray, mult_W: np.ndarray) -> np.ndarray:
    """``words_XW @ mult_W`` with uint64 wrap-around: four independent sums per row, so
    the multiplies overlap instead of waiting on each other."""
    count, width = words_XW.shape
    out_X = np.empty(count, dtype=np.uint64)
    body = width - width % 4
    for x in range(count):
        s0 = s1 = s2 = s3 = np.uint64(0)
        for w in range(0, body, 4):
            s0 += words_XW[x, w] * mult_W[w]
            s1 += words_XW[x, w + 1] * mult_W[w + 1]
            s2 += words_XW[x, w + 2] * mult_W[w + 2]
            s3 += words_XW[x, w + 3] * mult_W[w + 3]
        for w in range(body, width):
            s0 += words_XW[x, w] * mult_W[w]
        out_X[x] = s0 + s1 + s2 + s3
    return out_X


@numba.njit(cache=True, nogil=True)
def equal_to_representatives(words_XW: np.ndarray, rep_X: np.ndarray) -> bool:
    """Whether every frame equals the frame its fingerprint picked (``rep_X``), word for
    word; stops at the first difference."""
    count, width = words_XW.shape
    for x in range(count):
        r = rep_X[x]
        if r == x:
            continue
        for w in range(width):
            if words_XW[x, w] != words_XW[r, w]:
                return False
    return True
