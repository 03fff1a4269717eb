"""Sum-tree / min-tree against naive NumPy references (np.cumsum, np.sum, np.min)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _replay_stats import chi_square_p
from hypothesis import given, settings
from hypothesis import strategies as st

from qfleet.replay.sumtree import SumMinTree, last_write_wins


def naive_apply(ref_N: np.ndarray, idx_B: np.ndarray, prio_B: np.ndarray) -> None:
    for i, p in zip(idx_B.tolist(), prio_B.tolist(), strict=True):  # the reference: in order
        ref_N[i] = p


def check_against(tree: SumMinTree, ref_N: np.ndarray, rng: np.random.Generator) -> None:
    assert tree.total == pytest.approx(ref_N.sum(), rel=1e-12, abs=1e-12)
    positive = ref_N[ref_N > 0]
    assert tree.min_positive() == (positive.min() if len(positive) else np.inf)
    np.testing.assert_array_equal(tree.priorities_N, ref_N)
    if ref_N.sum() > 0:
        # Integer priorities make every partial sum exact, so the search must agree with
        # searchsorted on the naive cumsum exactly, boundaries included.
        u_K = np.concatenate([rng.random(64) * ref_N.sum(), np.cumsum(ref_N)[:-1]])
        u_K = u_K[u_K < ref_N.sum()]
        expect_K = np.searchsorted(np.cumsum(ref_N), u_K, side="right")
        np.testing.assert_array_equal(tree.find(u_K), expect_K)


# derandomize: the same 60 examples on every run, so a failure one run finds stays found
# (and no .hypothesis/ database in the repo is needed to replay it).
@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(capacity=st.integers(1, 300), top=st.sampled_from([1, 2, 8, 1024]),
       min_top=st.sampled_from([1, 4, 16384]), seed=st.integers(0, 2**32 - 1))
def test_random_updates_match_naive_cumsum(capacity: int, top: int, min_top: int,
                                           seed: int) -> None:
    rng = np.random.default_rng(seed)
    tree = SumMinTree(capacity, top=top, min_top=min_top)
    tree.rebuild_every = 10**9  # check the incremental sums alone (integers: exact)
    ref_N = np.zeros(capacity)
    for _ in range(40):
        size = int(rng.integers(1, 2 * capacity + 2))  # > capacity forces duplicates
        idx_B = rng.integers(0, capacity, size)
        prio_B = rng.integers(0, 4, size).astype(np.float64)  # many zeros, many repeats
        tree.update(idx_B, prio_B)
        naive_apply(ref_N, idx_B, prio_B)
    check_against(tree, ref_N, rng)


CAPACITIES = sorted({1, 2, 3} | {c for k in range(2, 10) for c in (2**k - 1, 2**k, 2**k + 1)})


def test_every_power_of_two_boundary_matches_naive_cumsum() -> None:
    """The capacities where off-by-ones live (2^k - 1, 2^k, 2^k + 1: the leaf count rounds
    up, the roots cut the top), each with every cut, checked every run: the random test
    above reaches each of them only on some of its examples."""
    rng = np.random.default_rng(0)
    for capacity in CAPACITIES:
        for top in (1, 2, 8, 1024):
            for min_top in (1, 4, 16384):
                tree = SumMinTree(capacity, top=top, min_top=min_top)
                tree.rebuild_every = 10**9
                ref_N = np.zeros(capacity)
                for _ in range(6):
                    size = int(rng.integers(2, 2 * capacity + 3))
                    idx_B = rng.integers(0, capacity, size)
                    idx_B[:2] = [0, capacity - 1]  # both ends every time
                    prio_B = rng.integers(0, 4, size).astype(np.float64)
                    tree.update(idx_B, prio_B)
                    naive_apply(ref_N, idx_B, prio_B)
                check_against(tree, ref_N, rng)


def test_thousands_of_real_valued_updates_on_a_large_tree() -> None:
    rng = np.random.default_rng(0)
    capacity = 50_000
    tree = SumMinTree(capacity, top=64, min_top=256)
    assert tree.rebuild_every < 3000  # drift is cleaned up along the way, as in real use
    ref_N = np.zeros(capacity)
    for step in range(3000):
        idx_B = rng.integers(0, capacity, 64)
        prio_B = rng.random(64) ** 3 * (step % 7 != 0)  # every 7th batch writes zeros
        tree.update(idx_B, prio_B)
        naive_apply(ref_N, idx_B, prio_B)
    assert tree.total == pytest.approx(ref_N.sum(), rel=1e-10)
    assert tree.min_positive() == ref_N[ref_N > 0].min()
    cum_N = np.cumsum(ref_N)
    u_K = rng.random(5000) * ref_N.sum()
    found_K = tree.find(u_K)
    # Real-valued sums round differently from np.cumsum: allow a hit on a neighbour
    # only where u sits within rounding of a boundary, and never on a zero slot.
    assert (ref_N[found_K] > 0).all()
    expect_K = np.searchsorted(cum_N, u_K, side="right")
    off_K = found_K != expect_K
    near_K = cum_N[np.minimum(found_K, expect_K)[off_K]]
    assert np.abs(near_K - u_K[off_K]).max(initial=0) < 1e-9


def test_duplicate_indices_last_write_wins() -> None:
    tree = SumMinTree(8)
    tree.update(np.array([3, 5, 3, 3, 5]), np.array([1.0, 2.0, 7.0, 4.0, 0.0]))
    assert tree.get(np.array([3, 5])).tolist() == [4.0, 0.0]
    assert tree.total == 4.0
    idx, val = last_write_wins(np.array([2, 1, 2, 1]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert idx.tolist() == [1, 2] and val.tolist() == [4.0, 3.0]


def test_zero_priorities_are_never_found_or_sampled() -> None:
    rng = np.random.default_rng(1)
    tree = SumMinTree(1000, top=4)
    prio_N = np.where(rng.random(1000) < 0.7, 0.0, rng.random(1000))
    tree.set_all(prio_N)
    slots_B, got_B = tree.sample(20_000, rng)
    assert (prio_N[slots_B] > 0).all()
    np.testing.assert_array_equal(got_B, prio_N[slots_B])
    assert tree.min_positive() == prio_N[prio_N > 0].min()
    # u at or past the total (rounding) still lands on a positive slot
    assert prio_N[tree.find(np.array([prio_N.sum(), prio_N.sum() * 2]))].min() > 0
    tree.set_all(np.zeros(1000))
    assert tree.min_positive() == np.inf
    with pytest.raises(RuntimeError, match="zero"):
        tree.sample(4, rng)


def test_safe_walk_agrees_with_fast_walk_and_skips_zero_subtrees() -> None:
    rng = np.random.default_rng(2)
    tree = SumMinTree(64, top=1)
    prio_N = rng.integers(0, 3, 64).astype(np.float64)
    prio_N[32:] = 0  # the right half of the tree is empty
    tree.set_all(prio_N)
    u_B = rng.random(500) * prio_N.sum()
    node_B = np.ones(500, dtype=np.int64)
    fast_B = tree._descend(node_B.copy(), u_B.copy(), safe=False)
    safe_B = tree._descend(node_B.copy(), u_B.copy(), safe=True)
    np.testing.assert_array_equal(fast_B, safe_B)
    # u past the total (as rounding could make it): the safe walk still ends on a slot > 0
    over_B = tree._descend(np.ones(5, dtype=np.int64), np.full(5, prio_N.sum() * 1.5),
                           safe=True)
    assert (prio_N[over_B] > 0).all()


def test_drifted_sums_are_rebuilt_before_a_zero_slot_is_returned() -> None:
    rng = np.random.default_rng(3)
    tree = SumMinTree(64, top=2)
    tree.update(np.array([5]), np.array([1.0]))
    # Pretend delta updates left residue on the empty right half (its root and a child):
    tree.sum_T[3] += 1.0
    tree.sum_T[6] += 1.0
    slots_B, prio_B = tree.sample(512, rng)
    assert (slots_B == 5).all() and (prio_B == 1.0).all()
    assert tree.total == 1.0  # rebuilt from the leaves
    tree.update(np.array([5]), np.array([0.0]))
    tree.sum_T[2] += 1e-3
    with pytest.raises(RuntimeError, match="zero"):
        tree.sample(4, rng)


def _compiled_tree(capacity: int) -> Any:
    return pytest.importorskip("qfleet.replay.widetree").WideSumMinTree(capacity)


@pytest.mark.parametrize("make_tree", [lambda n: SumMinTree(n, top=8), _compiled_tree],
                         ids=["numpy-tree", "compiled-tree"])
def test_stratified_sampling_frequencies_match_p_chi_square(
        make_tree: Callable[[int], Any]) -> None:
    rng = np.random.default_rng(1234)
    prio_N = rng.random(200) ** 2 + 0.01
    prio_N[::17] = 0.0
    tree = make_tree(200)
    tree.update(np.arange(200), prio_N)
    counts_N = np.zeros(200)
    for _ in range(400):
        slots_B, _ = tree.sample(256, rng)
        counts_N += np.bincount(slots_B, minlength=200)
    assert counts_N[prio_N == 0].sum() == 0
    live = prio_N > 0
    expected = counts_N.sum() * prio_N[live] / prio_N.sum()
    assert chi_square_p(counts_N[live], expected) > 1e-3
    # A sampler that ignored priorities would fail the same test.
    flat = np.full(live.sum(), counts_N.sum() / live.sum())
    assert chi_square_p(counts_N[live], flat) < 1e-6


def test_rejects_bad_priorities_and_slots() -> None:
    tree = SumMinTree(4)
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError):
            tree.update(np.array([0]), np.array([bad]))
    with pytest.raises(IndexError):
        tree.update(np.array([4]), np.array([1.0]))
    assert tree.total == 0.0


@pytest.mark.parametrize("capacity, min_top", [(1, 16384), (5, 1), (100, 4), (300, 16384)])
def test_set_all_rebuilds_both_trees_like_updates_would(capacity: int, min_top: int) -> None:
    """set_all (a restored checkpoint) against the naive reference: sums, search and the
    positive min that IS weights divide by (the min-tree below its roots included)."""
    rng = np.random.default_rng(capacity)
    ref_N = rng.integers(0, 5, capacity).astype(np.float64)  # zeros are skipped by min
    ref_N[-1] = 7.0
    tree = SumMinTree(capacity, top=2, min_top=min_top)
    tree.update(np.arange(capacity), np.full(capacity, 0.5))  # stale values to overwrite
    tree.set_all(ref_N)
    check_against(tree, ref_N, rng)
    for _ in range(3):  # and it keeps agreeing under updates after the restore
        idx_B = rng.integers(0, capacity, 4)
        prio_B = rng.integers(1, 9, 4).astype(np.float64)
        tree.update(idx_B, prio_B)
        naive_apply(ref_N, idx_B, prio_B)
        check_against(tree, ref_N, rng)
