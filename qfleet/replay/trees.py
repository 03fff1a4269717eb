"""Which sum/min tree a prioritized replay gets: the contract both trees keep, and the
fastest one this install has (own module: the compiled tree imports sumtree's helpers, so
choosing between them inside sumtree.py would be an import cycle)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from qfleet.replay.arrays import Alloc, zeros
from qfleet.replay.sumtree import SumMinTree


class PriorityTree(Protocol):
    """What prioritized replay asks of a tree: ``SumMinTree`` here, or ``WideSumMinTree``
    (qfleet.replay.widetree), the same contract computed by numba-compiled loops."""

    capacity: int

    @property
    def nbytes(self) -> int: ...
    @property
    def total(self) -> float: ...
    @property
    def priorities_N(self) -> np.ndarray: ...
    def min_positive(self) -> float: ...
    def get(self, idx_B: np.ndarray) -> np.ndarray: ...
    def update(self, idx_B: np.ndarray, prio_B: np.ndarray) -> None: ...
    def update_td(self, idx_B: np.ndarray, td_B: np.ndarray, eps: float,
                  alpha: float) -> float: ...
    def set_all(self, prio_N: np.ndarray) -> None: ...
    def find(self, u_B: np.ndarray) -> np.ndarray: ...
    def sample(self, batch_size: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]: ...


def new_tree(capacity: int, alloc: Alloc = zeros) -> PriorityTree:
    """The fastest tree this install has: the compiled one where numba is installed (the
    ``fast`` extra; a sample + update of 256 on 1M slots ~5x faster), else sumtree.py's
    NumPy tree."""
    try:
        from qfleet.replay.widetree import WideSumMinTree
    except ImportError:  # numba is optional
        return SumMinTree(capacity, alloc)
    return WideSumMinTree(capacity, alloc)
