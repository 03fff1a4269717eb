"""The compiled 4-ary tree (widetree.py, #15) against the NumPy reference tree (SumMinTree)
and against naive NumPy (np.sum, np.min, np.cumsum + np.searchsorted).

Integer priorities keep every partial sum exact, so there the trees must agree with each
other and with the naive reference exactly: the same sums, minima, finds and, from the
same uniforms, the same stratified samples. Real-valued priorities round differently in
each, so there a find may differ only where u sits within rounding of a boundary.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("numba")  # the optional `fast` extra; without it replays use SumMinTree

from qfleet.replay.sumtree import SumMinTree
from qfleet.replay.trees import new_tree
from qfleet.replay.widetree import (
    BLOCK,
    FAN,
    WideSumMinTree,
    _pick_child,
    tree_layout,
)

Tree = SumMinTree | WideSumMinTree


def naive_apply(ref_N: np.ndarray, idx_B: np.ndarray, prio_B: np.ndarray) -> None:
    for i, p in zip(idx_B.tolist(), prio_B.tolist(), strict=True):  # in order: last wins
        ref_N[i] = p


def random_batch(rng: np.random.Generator, capacity: int,
                 integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """Up to twice the capacity (so repeated slots), many zeros."""
    size = int(rng.integers(1, 2 * capacity + 2))
    idx_B = rng.integers(0, capacity, size)
    if integer:
        return idx_B, rng.integers(0, 4, size).astype(np.float64)
    return idx_B, rng.random(size) ** 3 * (rng.random(size) < 0.7)


def update_all(trees: list[Tree], ref_N: np.ndarray, idx_B: np.ndarray,
               prio_B: np.ndarray) -> None:
    for tree in trees:
        tree.update(idx_B, prio_B)
    naive_apply(ref_N, idx_B, prio_B)


def assert_exactly_naive(tree: Tree, ref_N: np.ndarray, rng: np.random.Generator) -> None:
    """For integer priorities: sums, min, priorities and finds equal the naive ones."""
    assert tree.total == ref_N.sum()
    positive = ref_N[ref_N > 0]
    assert tree.min_positive() == (positive.min() if len(positive) else np.inf)
    np.testing.assert_array_equal(tree.priorities_N, ref_N)
    if ref_N.sum() > 0:
        cum_N = np.cumsum(ref_N)
        u_K = np.concatenate([rng.random(64) * ref_N.sum(), cum_N[:-1]])  # boundaries too
        u_K = u_K[u_K < ref_N.sum()]
        np.testing.assert_array_equal(tree.find(u_K), np.searchsorted(cum_N, u_K, "right"))


def assert_same_samples(wide: WideSumMinTree, ref: SumMinTree, seed: int) -> None:
    """From the same uniforms, the compiled tree draws exactly the reference's batch."""
    for batch_size in (1, 7, 256):
        got = wide.sample(batch_size, np.random.default_rng(seed))
        want = ref.sample(batch_size, np.random.default_rng(seed))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# derandomize: the same examples on every run, as in test_replay_sumtree.py
@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(capacity=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
def test_random_updates_match_the_reference_tree_and_naive_cumsum(capacity: int,
                                                                   seed: int) -> None:
    rng = np.random.default_rng(seed)
    wide, ref = WideSumMinTree(capacity), SumMinTree(capacity, top=8, min_top=4)
    ref.rebuild_every = 10**9  # integers: the reference's deltas are exact too
    ref_N = np.zeros(capacity)
    for _ in range(40):
        update_all([wide, ref], ref_N, *random_batch(rng, capacity, integer=True))
    assert_exactly_naive(wide, ref_N, rng)
    assert_exactly_naive(ref, ref_N, rng)
    if ref_N.sum() > 0:
        assert_same_samples(wide, ref, seed)


CAPACITIES = sorted({1, 2, 3} | {c for k in range(1, 6) for base in (2**k, 4**k)
                                 for c in (base - 1, base, base + 1)})


def test_every_fan_and_padding_boundary_matches_naive_cumsum() -> None:
    """Capacities at 4^k +- 1 (a level gains a block, the tree a level) and 2^k +- 1
    (where the reference pads), both ends of the slots written every time."""
    rng = np.random.default_rng(0)
    for capacity in CAPACITIES:
        wide, ref = WideSumMinTree(capacity), SumMinTree(capacity)
        ref.rebuild_every = 10**9
        ref_N = np.zeros(capacity)
        for _ in range(6):
            idx_B, prio_B = random_batch(rng, capacity, integer=True)
            idx_B[:1], idx_B[-1:] = 0, capacity - 1
            update_all([wide, ref], ref_N, idx_B, prio_B)
            assert_exactly_naive(wide, ref_N, rng)
        if ref_N.sum() > 0:
            assert_same_samples(wide, ref, capacity)


def test_real_valued_updates_on_a_large_tree_agree_up_to_rounding() -> None:
    rng = np.random.default_rng(0)
    capacity = 50_000
    wide, ref = WideSumMinTree(capacity), SumMinTree(capacity, top=64, min_top=256)
    ref_N = np.zeros(capacity)
    for step in range(3000):
        idx_B = rng.integers(0, capacity, 64)
        prio_B = rng.random(64) ** 3 * (step % 7 != 0)  # every 7th batch writes zeros
        update_all([wide, ref], ref_N, idx_B, prio_B)
    assert wide.total == pytest.approx(ref_N.sum(), rel=1e-12)
    assert wide.total == pytest.approx(ref.total, rel=1e-12)
    assert wide.min_positive() == ref.min_positive() == ref_N[ref_N > 0].min()
    np.testing.assert_array_equal(wide.priorities_N, ref_N)
    cum_N = np.cumsum(ref_N)
    u_K = rng.random(5000) * ref_N.sum()
    found_K = wide.find(u_K)
    assert (ref_N[found_K] > 0).all()
    for other_K in (np.searchsorted(cum_N, u_K, side="right"), ref.find(u_K)):
        off_K = found_K != other_K  # only where u is within rounding of a boundary
        near_K = cum_N[np.minimum(found_K, other_K)[off_K]]
        assert off_K.mean() < 0.01
        assert np.abs(near_K - u_K[off_K]).max(initial=0) < 1e-9


def _inner_level(tree: WideSumMinTree, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(sums, mins) of a level >= 1, read out of its blocks of FAN sums then FAN mins."""
    count = int(tree.count_L[level]) if level < len(tree.count_L) else 1
    blocks = tree.tree_A[tree.start_L1[level]:].reshape(-1, BLOCK)[:-(-count // FAN)]
    return blocks[:, :FAN].ravel()[:count], blocks[:, FAN:].ravel()[:count]


def test_every_node_is_exactly_its_children_s_running_sum_and_min() -> None:
    """The invariant the search relies on (a node is positive iff a leaf below it is,
    no drift): after real-valued updates with zeros and repeats, every inner node equals
    ((a + b) + c) + d of its children, bit for bit, and the min of their positive mins."""
    rng = np.random.default_rng(4)
    capacity = 5000
    tree = WideSumMinTree(capacity)
    for _ in range(300):
        idx_B, prio_B = random_batch(rng, capacity, integer=False)
        tree.update(idx_B[:100], prio_B[:100] * 10.0 ** rng.integers(-6, 6))
    sums_N = tree.tree_A[:tree.count_L[0]]
    mins_N = np.where(sums_N > 0, sums_N, np.inf)
    for level in range(1, len(tree.start_L1)):
        kids = sums_N.reshape(-1, FAN)
        running_P = ((kids[:, 0] + kids[:, 1]) + kids[:, 2]) + kids[:, 3]
        sums_N, low_N = _inner_level(tree, level)
        np.testing.assert_array_equal(sums_N, np.pad(running_P, (0, len(sums_N) - len(kids))))
        want_P = mins_N.reshape(-1, FAN).min(axis=1)
        np.testing.assert_array_equal(low_N[:len(want_P)], want_P)
        assert (low_N[len(want_P):] == np.inf).all()  # padding nodes set no min
        mins_N = low_N
    restored = WideSumMinTree(capacity)  # the same priorities, written at once
    restored.set_all(tree.priorities_N)
    np.testing.assert_array_equal(restored.tree_A, tree.tree_A)
    tree.set_all(tree.priorities_N)  # its own view: rebuilt in place, nothing lost
    np.testing.assert_array_equal(restored.tree_A, tree.tree_A)


def test_zero_priorities_are_never_found_or_sampled_at_any_scale() -> None:
    """Mostly-zero trees whose priorities span 300 orders of magnitude: every found and
    sampled slot is positive, including u right below the total and past it."""
    rng = np.random.default_rng(1)
    for capacity in (5, 64, 1000, 4097):
        for _ in range(10):
            prio_N = np.where(rng.random(capacity) < 0.8, 0.0,
                              rng.random(capacity) * 10.0 ** rng.integers(-150, 150, capacity))
            prio_N[rng.integers(capacity)] = 1.0  # at least one positive
            tree = WideSumMinTree(capacity)
            tree.set_all(prio_N)
            total = tree.total
            cum_N = np.cumsum(prio_N)
            u_K = np.concatenate([rng.random(256) * total, cum_N, np.nextafter(cum_N, 0),
                                  [np.nextafter(total, 0), total, 2 * total, -1.0]])
            assert (prio_N[tree.find(u_K)] > 0).all()
            slots_B, got_B = tree.sample(512, rng)
            assert (got_B > 0).all() and (prio_N[slots_B] == got_B).all()
            assert (np.diff(slots_B) >= 0).all()  # stratified: sorted
            assert tree.min_positive() == prio_N[prio_N > 0].min()


def test_a_u_past_its_block_takes_the_last_positive_child() -> None:
    """The rounding fallback of one step: u at or past the block's sum (which a walk's
    rounded u can reach) goes to the last positive child, never to a zero one."""
    block_A = np.array([3.0, 0.0, 2.0, 0.0, 9.0])  # a block of FAN, then a neighbour
    assert _pick_child(block_A, 0, 4.0) == (2, 3.0)  # the plain case, for contrast
    assert _pick_child(block_A, 0, 5.0) == (2, 3.0)
    assert _pick_child(block_A, 0, 1e300) == (2, 3.0)
    assert _pick_child(block_A, 0, 3.0) == (2, 3.0)  # a boundary belongs to the right
    assert _pick_child(block_A, 0, 0.0) == (0, 0.0)


@pytest.mark.parametrize("make", [SumMinTree, WideSumMinTree])
def test_both_trees_refuse_the_same_inputs_with_the_same_words(make: type[Tree]) -> None:
    with pytest.raises(ValueError, match=r"^capacity must be >= 1, got 0$"):
        make(0)
    tree = make(5)
    for slot in (5, -1):
        with pytest.raises(IndexError, match=r"^slot out of range \[0, 5\)$"):
            tree.update(np.array([0, slot]), np.array([1.0, 1.0]))
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match=r"^priorities must be finite and >= 0$"):
            tree.update(np.array([1, 2]), np.array([1.0, bad]))
    assert tree.total == 0.0 and tree.min_positive() == np.inf  # nothing was written
    with pytest.raises(ValueError, match=r"^expected 5 priorities, got shape \(4,\)$"):
        tree.set_all(np.ones(4))
    with pytest.raises(RuntimeError, match=r"^cannot sample: every priority is zero$"):
        tree.sample(2, np.random.default_rng(0))
    # Only the last write to a slot counts, so a bad value a later one replaces is fine.
    tree.update(np.array([3, 1, 3]), np.array([np.nan, 2.0, 4.0]))
    assert tree.get(np.array([1, 3])).tolist() == [2.0, 4.0] and tree.total == 6.0
    tree.update(np.array([3, 3, 3]), np.array([5.0, 0.0, 1.0]))
    assert tree.get(np.array([3])).tolist() == [1.0] and tree.min_positive() == 1.0
    tree.update(np.array([4, 4]), np.array([np.inf, 1.5]))
    assert tree.total == 4.5


def test_mismatched_batches_are_refused_before_any_compiled_loop() -> None:
    tree = WideSumMinTree(8)
    with pytest.raises(ValueError, match="equal 1-D batches"):
        tree.update(np.array([0, 1]), np.array([1.0]))
    with pytest.raises(ValueError, match="equal 1-D batches"):
        tree.update(np.zeros((2, 2), dtype=np.int64), np.ones((2, 2)))
    assert tree.total == 0.0


def test_layout_levels_blocks_and_lines() -> None:
    for capacity in (*CAPACITIES, 1000, 1_000_000):
        start_L1, count_L = tree_layout(capacity)
        assert count_L[0] >= capacity and count_L[-1] == FAN
        assert (count_L % FAN == 0).all()
        parents_L = -(-count_L[:-1] // FAN)  # one per block below, padded to whole blocks
        np.testing.assert_array_equal(count_L[1:], -(-parents_L // FAN) * FAN)
        assert (start_L1[1:] % BLOCK == 0).all()  # inner blocks on their own line
        assert (np.diff(start_L1)[1:] == 2 * count_L[1:]).all()
    tree = WideSumMinTree(1_000_000)
    assert tree.tree_A.ctypes.data % 64 == 0
    assert tree.nbytes < SumMinTree(1_000_000).nbytes / 2  # ~13 MB against ~32 MB
    with pytest.raises(ValueError):
        tree.priorities_N[0] = 1.0  # a read-only view


def test_new_tree_is_the_compiled_one_and_numpy_without_numba(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(new_tree(10), WideSumMinTree)
    monkeypatch.setitem(sys.modules, "qfleet.replay.widetree", None)  # import fails
    fallback = new_tree(10)
    assert isinstance(fallback, SumMinTree) and fallback.capacity == 10
