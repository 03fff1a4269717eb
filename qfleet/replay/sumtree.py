"""A sum-tree and a min-tree over NumPy arrays, updated and searched a batch at a time.

Both trees use the heap layout (node ``i`` has children ``2i`` and ``2i + 1``, leaves at
``P .. 2P-1`` with ``P`` the capacity rounded up to a power of two). A batch of ``B``
updates or ``B`` prefix-sum searches walks the levels together: ``log2 N`` NumPy calls on
``B``-long arrays, never a Python loop over items.

The top of the tree is cut at a level of ``R`` roots (``R`` = ``top``, 1024 by default):
a search takes one ``np.cumsum`` over the ``R`` root sums and a ``searchsorted`` instead of
``log2 R`` more levels of gathers. ``R`` is a constant, so both operations stay
O(B log N); in NumPy, fewer and fatter calls are what make them fast.

Replays take their tree from ``trees.new_tree``: widetree.py's compiled tree where numba is
installed, else this one, which stays the reference the compiled tree is tested against.
"""

from __future__ import annotations

import math

import numpy as np

from qfleet.replay.arrays import Alloc, zeros


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def last_write_wins(idx_B: np.ndarray, value_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deduplicate ``idx_B`` keeping, for each index, the value given last.

    NumPy leaves the outcome of a fancy assignment with repeated indices unspecified,
    so the order is made explicit. Returns sorted unique indices. A batch drawn by
    ``SumMinTree.sample`` comes back already sorted, which skips the sort.
    """
    if len(idx_B) > 1 and not (idx_B[1:] >= idx_B[:-1]).all():
        order_B = np.argsort(idx_B, kind="stable")  # stable: equal indices keep their order
        idx_B, value_B = idx_B[order_B], value_B[order_B]
    keep_B = np.empty(len(idx_B), dtype=bool)
    np.not_equal(idx_B[1:], idx_B[:-1], out=keep_B[:-1])
    keep_B[-1:] = True
    if keep_B.all():
        return idx_B, value_B
    return idx_B[keep_B], value_B[keep_B]


class SumMinTree:
    """Per-slot non-negative priorities with their sum, prefix-sum search and positive min.

    The min-tree ignores zero priorities (they read as +inf): a slot that cannot be
    sampled must not set the largest importance weight.
    """

    def __init__(self, capacity: int, alloc: Alloc = zeros, *, top: int = 1024,
                 min_top: int = 16384) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.leaf0 = _pow2_at_least(capacity)  # index of leaf 0 in the heap arrays
        self.roots = min(_pow2_at_least(top), self.leaf0)
        self.depth = (self.leaf0 // self.roots).bit_length() - 1  # levels below the roots
        # The min-tree is cut lower: a min over 16k roots is one fast SIMD call, while the
        # sum-tree's roots need a (slow, sequential) cumsum on every sample.
        self.min_roots = max(min(_pow2_at_least(min_top), self.leaf0), self.roots)
        self.min_depth = (self.leaf0 // self.min_roots).bit_length() - 1
        self.sum_T = alloc((2 * self.leaf0,), np.float64)
        self.min_T = alloc((2 * self.leaf0,), np.float64)
        self.min_T[:] = np.inf
        self._cum_R1 = np.zeros(self.roots + 1, dtype=np.float64)  # [0, prefix sums...]
        self._shifts_D1 = np.arange(1, self.depth + 1, dtype=np.int64)[:, None]
        self._strata_B = np.arange(0, dtype=np.float64)
        # A rebuild costs about 2N element ops; every leaf0/256 updates keeps it ~1% of
        # the update cost while bounding the sums' rounding drift to a few thousand ulps.
        self.rebuild_every = max(1, self.leaf0 // 256)
        self._updates_since_rebuild = 0

    @property
    def nbytes(self) -> int:
        return self.sum_T.nbytes + self.min_T.nbytes + self._cum_R1.nbytes

    @property
    def total(self) -> float:
        return float(self.sum_T[self.roots:2 * self.roots].sum())

    def min_positive(self) -> float:
        """Smallest non-zero priority (+inf when every priority is zero)."""
        return float(self.min_T[self.min_roots:2 * self.min_roots].min())

    def get(self, idx_B: np.ndarray) -> np.ndarray:
        return self.sum_T[self.leaf0 + np.asarray(idx_B, dtype=np.int64)]

    @property
    def priorities_N(self) -> np.ndarray:
        """A read-only view of every slot's priority."""
        view = self.sum_T[self.leaf0:self.leaf0 + self.capacity]
        view.flags.writeable = False
        return view

    def update_td(self, idx_B: np.ndarray, td_B: np.ndarray, eps: float,
                  alpha: float) -> float:
        """``update`` with PER's priorities of TD errors, (|td| + eps) ** alpha; returns
        the largest (0 for none)."""
        prio_B = (np.abs(np.asarray(td_B, dtype=np.float64)) + eps) ** alpha
        self.update(idx_B, prio_B)
        return float(prio_B.max()) if len(prio_B) else 0.0

    def update(self, idx_B: np.ndarray, prio_B: np.ndarray) -> None:
        """Set ``prio[idx] = value``; with repeated indices the last value wins."""
        idx_U, val_U = last_write_wins(np.asarray(idx_B, dtype=np.int64),
                                       np.asarray(prio_B, dtype=np.float64))
        if len(idx_U) == 0:
            return
        if idx_U[0] < 0 or idx_U[-1] >= self.capacity:  # sorted: the ends are the extremes
            raise IndexError(f"slot out of range [0, {self.capacity})")
        if not 0.0 <= val_U.min() <= val_U.max() < np.inf:  # NaN fails every comparison
            raise ValueError("priorities must be finite and >= 0")
        node_U = idx_U + self.leaf0
        sum_T, min_T = self.sum_T, self.min_T
        delta_U = val_U - sum_T.take(node_U)
        sum_T[node_U] = val_U  # leaves exact; internal sums move by the change
        # Every ancestor of every leaf in one (depth, U) array, and one unbuffered add
        # over all of them (np.add.at accumulates repeated ancestors): a handful of NumPy
        # calls instead of four per level. Deltas leave rounding residue in the sums, so
        # the levels are rebuilt exactly from the leaves every ``rebuild_every`` updates.
        parent_DU = node_U >> self._shifts_D1
        # Indices and values as plain same-length 1-D arrays: NumPy 2.4's ufunc.at
        # mis-broadcasts a 1-D value array against 2-D indices (reads garbage).
        np.add.at(sum_T, parent_DU.ravel(), np.tile(delta_U, self.depth))
        # min has no inverse: recompute the min-tree's levels from their children.
        min_T[node_U] = np.where(val_U > 0, val_U, np.inf)
        left_MU = parent_DU[:self.min_depth] << 1
        right_MU = left_MU | 1
        for parent_U, left_U, right_U in zip(parent_DU, left_MU, right_MU, strict=False):
            min_T[parent_U] = np.minimum(min_T.take(left_U), min_T.take(right_U))
        self._updates_since_rebuild += 1
        if self._updates_since_rebuild >= self.rebuild_every:
            self._rebuild_sums()

    def _rebuild_sums(self) -> None:
        lo = self.leaf0 // 2
        while lo >= self.roots:  # whole levels, bottom up
            self.sum_T[lo:2 * lo] = self.sum_T[2 * lo:4 * lo].reshape(-1, 2).sum(axis=1)
            lo //= 2
        self._updates_since_rebuild = 0

    def set_all(self, prio_N: np.ndarray) -> None:
        """Replace every priority at once (checkpoint restore): rebuilds the levels."""
        prio_N = np.asarray(prio_N, dtype=np.float64)
        if prio_N.shape != (self.capacity,):
            raise ValueError(f"expected {self.capacity} priorities, got shape {prio_N.shape}")
        self.sum_T[:] = 0.0
        self.min_T[:] = np.inf
        self.sum_T[self.leaf0:self.leaf0 + self.capacity] = prio_N
        self.min_T[self.leaf0:self.leaf0 + self.capacity] = np.where(prio_N > 0, prio_N, np.inf)
        self._rebuild_sums()
        lo = self.leaf0 // 2
        while lo >= self.min_roots:
            self.min_T[lo:2 * lo] = self.min_T[2 * lo:4 * lo].reshape(-1, 2).min(axis=1)
            lo //= 2

    def _root_prefix(self) -> np.ndarray:
        np.cumsum(self.sum_T[self.roots:2 * self.roots], out=self._cum_R1[1:])
        return self._cum_R1

    def find(self, u_B: np.ndarray) -> np.ndarray:
        """Slots ``i`` with ``cumsum[i-1] <= u < cumsum[i]`` (prefix-sum search); never a
        zero-priority slot as long as ``total > 0``."""
        cum_R1 = self._root_prefix()
        u_B = np.clip(np.asarray(u_B, dtype=np.float64), 0.0, np.nextafter(cum_R1[-1], -np.inf))
        return self._search(cum_R1, u_B)[0]

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Stratified proportional sampling: one uniform draw in each of ``B`` equal
        segments of the total, so a batch covers the distribution evenly. Returns
        (slots, priorities); the slots come out sorted."""
        cum_R1 = self._root_prefix()
        total = float(cum_R1[-1])
        if not total > 0:
            raise RuntimeError("cannot sample: every priority is zero")
        if len(self._strata_B) != batch_size:
            self._strata_B = np.arange(batch_size, dtype=np.float64)
        u_B = rng.random(batch_size)
        u_B += self._strata_B
        u_B *= total / batch_size
        if batch_size:  # only the last stratum can round up to the total
            u_B[-1] = min(float(u_B[-1]), math.nextafter(total, -math.inf))
        return self._search(cum_R1, u_B)

    def _search(self, cum_R1: np.ndarray, u_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Needs 0 <= u < total, so the root search lands on a root with a positive sum."""
        root_B = np.searchsorted(cum_R1[1:], u_B, side="right")
        rel_B = u_B - cum_R1.take(root_B)
        root_B += self.roots
        leaf_B = self._descend(root_B.copy(), rel_B.copy(), safe=False)
        prio_B = self.sum_T.take(leaf_B + self.leaf0)
        bad_B = prio_B <= 0
        if bad_B.any():  # rounding pushed u past a subtree's sum: redo those carefully
            leaf_B[bad_B] = self._descend(root_B[bad_B], rel_B[bad_B], safe=True)
            prio_B = self.sum_T.take(leaf_B + self.leaf0)
            if (prio_B <= 0).any():  # drift left a sum on an all-zero subtree: make exact
                self._rebuild_sums()
                cum_R1 = self._root_prefix()
                if not cum_R1[-1] > 0:
                    raise RuntimeError("cannot sample: every priority is zero")
                return self._search(cum_R1, np.minimum(u_B, np.nextafter(cum_R1[-1], -1)))
        return leaf_B, prio_B

    def _descend(self, node_B: np.ndarray, u_B: np.ndarray, *, safe: bool) -> np.ndarray:
        """Walk from ``node_B`` to the leaves, keeping ``u_B`` relative to the node.

        With exact sums ``u`` stays below the node's sum and the walk never enters a zero
        subtree. Float rounding can break that by an ulp, so ``safe`` walks also refuse to
        turn right into a zero-sum subtree, which keeps every visited node positive.
        """
        sum_T = self.sum_T
        for _ in range(self.depth):
            node_B <<= 1
            left_B = sum_T.take(node_B)
            right_B = u_B >= left_B
            if safe:
                right_B &= sum_T.take(node_B + 1) > 0
            u_B -= left_B * right_B
            node_B += right_B
        return node_B - self.leaf0
