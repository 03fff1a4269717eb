"""Edge cases of the replay core that the broader tests leave open (mutation survivors, #18).

SumMinTree's rounding paths (a fast walk that rounds onto a zero leaf, drift on an empty
root, u at or past the ends of [0, total)), its rebuild cadence and min-tree restore; the
ring's slot = write-number invariant for oversize chunks; dropped slots in prioritized
replay; shard reuse on a sharded restore; Batch.take without weights. Every check is
against a hand-computed value or a naive NumPy reference (np.cumsum + np.searchsorted).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest

from qfleet.replay import PrioritizedReplay, RingStorage, ShardedReplay, Transitions
from qfleet.replay.sumtree import SumMinTree
from qfleet.replay.transitions import Batch

ULP_HALF = 2.0**-53  # scale that puts the rounding example's priorities below 1


def naive_find(prio_N: np.ndarray, u_B: np.ndarray) -> np.ndarray:
    """The reference search: first slot whose inclusive prefix sum exceeds u."""
    return np.searchsorted(np.cumsum(prio_N), u_B, side="right")


def assert_levels_exact(tree: SumMinTree) -> None:
    """Every inner sum equals the float sum of its two children, as a rebuild leaves it."""
    lo = tree.leaf0 // 2
    while lo >= tree.roots:
        pairs_L = tree.sum_T[2 * lo:4 * lo].reshape(-1, 2).sum(axis=1)
        np.testing.assert_array_equal(tree.sum_T[lo:2 * lo], pairs_L)
        lo //= 2


# ------------------------------------------------------------ search rounding paths


def _rounding_tree() -> tuple[SumMinTree, np.ndarray, np.ndarray]:
    """Leaves [L, 0, R, 0] where, with exact sums, the fast walk still ends on leaf 3.

    Scaled to ulps of 2**52: L = 1.5, R = 2**52 + 2, so the root is fl(2**52 + 3.5) =
    2**52 + 4 (ties to even). u = 2**52 + 3 < root goes right at the root, and
    fl(u - L) = fl(2**52 + 1.5) = 2**52 + 2 = R (ties to even again): u - L >= R, so the
    fast walk turns right once more, into the zero leaf.
    """
    tree = SumMinTree(4, top=1)
    prio_N = np.array([1.5, 0.0, 2.0**52 + 2, 0.0]) * ULP_HALF
    tree.set_all(prio_N)
    u_1 = np.array([(2.0**52 + 3) * ULP_HALF])
    return tree, prio_N, u_1


def test_the_rounding_example_really_sends_the_fast_walk_to_a_zero_leaf() -> None:
    """Guards the example itself: without this, the test below could pass vacuously."""
    tree, prio_N, u_1 = _rounding_tree()
    assert u_1[0] < tree.total
    fast_1 = tree._descend(np.ones(1, dtype=np.int64), u_1.copy(), safe=False)
    assert prio_N[fast_1[0]] == 0.0


def test_a_fast_walk_rounded_onto_a_zero_leaf_is_redone_safely_without_a_rebuild() -> None:
    """Sums are exact (just rebuilt), so the safe walk alone must fix the row: the
    rebuild-and-retry path is for drift only (taken here it would loop forever)."""
    tree, prio_N, u_1 = _rounding_tree()
    sums_T = tree.sum_T.copy()
    found_1 = tree.find(u_1)
    assert found_1.tolist() == naive_find(prio_N, u_1).tolist() == [2]
    assert prio_N[2] <= 1.0  # a positive priority at most 1 is still a valid find
    np.testing.assert_array_equal(tree.sum_T, sums_T)


def _drifted_first_root() -> tuple[SumMinTree, int]:
    """Two roots; the only positive slot sits under root 1, and rounding residue was
    left on root 0's empty subtree (its root and a child), as delta updates can."""
    tree = SumMinTree(64, top=2)  # root 0 covers slots 0..31, root 1 slots 32..63
    slot = 40
    tree.update(np.array([slot]), np.array([1.0]))
    tree.sum_T[2] += 1.0
    tree.sum_T[4] += 1.0
    return tree, slot


def test_drift_on_an_empty_first_root_is_rebuilt_and_sampling_goes_on() -> None:
    tree, slot = _drifted_first_root()
    slots_B, prio_B = tree.sample(256, np.random.default_rng(0))
    assert (slots_B == slot).all() and (prio_B == 1.0).all()
    assert tree.total == 1.0  # rebuilt from the leaves


def test_drifted_u_past_the_rebuilt_total_is_clipped_to_its_last_positive_slot() -> None:
    tree, slot = _drifted_first_root()
    # The drifted total is 2: u in [1, 2) lies past the true total once rebuilt.
    found_B = tree.find(np.array([0.0, 0.5, 1.0, 1.5, 1.999]))
    assert found_B.tolist() == [slot] * 5


def test_an_all_zero_tree_with_drift_says_exactly_why_it_cannot_sample() -> None:
    tree = SumMinTree(64, top=2)
    tree.update(np.array([5]), np.array([1.0]))
    tree.update(np.array([5]), np.array([0.0]))
    tree.sum_T[2] += 1e-3  # residue: the sampler sees a positive total
    with pytest.raises(RuntimeError, match=r"^cannot sample: every priority is zero$"):
        tree.sample(4, np.random.default_rng(0))


@pytest.mark.parametrize("top", [1, 2])
def test_negative_u_finds_the_first_positive_slot(top: int) -> None:
    """find clips u below at 0, where the search skips the empty slots (and roots)."""
    prio_N = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 2.0])
    tree = SumMinTree(8, top=top)
    tree.set_all(prio_N)
    u_B = np.array([-1.0, -1e300, 0.0])
    assert tree.find(u_B).tolist() == naive_find(prio_N, np.zeros(3)).tolist() == [5, 5, 5]


# ------------------------------------------------------------ stratified sampling


def _reference_sample(prio_N: np.ndarray, r_B: np.ndarray) -> np.ndarray:
    """The documented draw: u_k = (r_k + k) * total / B, the last kept below the total."""
    total = float(prio_N.sum())
    u_B: np.ndarray = r_B + np.arange(len(r_B), dtype=np.float64)
    u_B *= total / len(r_B)
    u_B[-1] = min(u_B[-1], np.nextafter(total, -np.inf))
    return naive_find(prio_N, u_B)


def test_sample_draws_one_uniform_per_stratum_from_the_given_rng() -> None:
    """Integer priorities keep every sum exact: the slots must equal the reference's,
    computed from the same uniforms (one per stratum)."""
    rng = np.random.default_rng(7)
    prio_N = rng.integers(0, 6, 300).astype(np.float64)
    tree = SumMinTree(300, top=8)
    tree.set_all(prio_N)
    for batch_size in (2, 32, 257):
        draw_rng = np.random.default_rng(batch_size)
        r_B = np.random.default_rng(batch_size).random(batch_size)
        slots_B, got_B = tree.sample(batch_size, draw_rng)
        np.testing.assert_array_equal(slots_B, _reference_sample(prio_N, r_B))
        np.testing.assert_array_equal(got_B, prio_N[slots_B])


class _TopOfUnitRng:
    """Stands in for a Generator whose uniforms all come out at 1 - 2**-53, the largest
    value below 1: the last stratum's u then rounds up to the total itself."""

    def random(self, size: int) -> np.ndarray:
        return np.full(size, np.nextafter(1.0, 0.0))


@pytest.mark.parametrize("top", [1, 4, 1024])
def test_a_last_stratum_rounded_up_to_the_total_lands_on_the_last_positive_slot(
        top: int) -> None:
    prio_N = np.array([2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 5.0, 0.0, 0.0])
    tree = SumMinTree(len(prio_N), top=top)
    tree.set_all(prio_N)
    rng = cast(np.random.Generator, _TopOfUnitRng())
    r_B = np.full(4, np.nextafter(1.0, 0.0))
    assert (r_B[-1] + 3) * (prio_N.sum() / 4) == prio_N.sum()  # the case is really hit
    slots_B, _ = tree.sample(4, rng)
    np.testing.assert_array_equal(slots_B, _reference_sample(prio_N, r_B))
    assert slots_B[-1] == 6


# ------------------------------------------------------------ rebuild cadence, min-tree


def test_small_trees_rebuild_their_sums_after_every_update() -> None:
    """Up to 256 leaves a rebuild follows every update, so the inner sums are always
    the exact pairwise sums. [2**53, 1, 1, 1] tells them apart: added one at a time the
    ones vanish (2**53 + 1 ties to 2**53), summed in pairs they leave 2**53 + 2."""
    tree = SumMinTree(4, top=1)
    assert tree.rebuild_every == 1
    tree.update(np.arange(4), np.array([2.0**53, 1.0, 1.0, 1.0]))
    assert tree.total == 2.0**53 + 2
    assert_levels_exact(tree)
    rng = np.random.default_rng(5)
    tree = SumMinTree(256, top=1)  # the largest with rebuild_every 1
    assert tree.rebuild_every == 1
    for _ in range(7):  # odd and even counts alike: no update is left unrebuilt
        tree.update(rng.integers(0, 256, 40), rng.random(40) * 10.0 ** rng.integers(-8, 8))
        assert_levels_exact(tree)


def test_set_all_leaves_each_subtree_its_own_min_for_later_updates() -> None:
    """An update recomputes only its own path: the sibling subtrees' minima set_all
    left must be theirs, not the global one."""
    prio_N = np.array([5.0, 1.0, 5.0, 6.0, 7.0, 0.0, 8.0, 9.0])
    tree = SumMinTree(8, top=1, min_top=1)
    tree.set_all(prio_N)
    assert tree.min_positive() == 1.0
    tree.update(np.array([1]), np.array([9.0]))  # the minimum goes up
    assert tree.min_positive() == 5.0
    tree.update(np.array([0, 2]), np.array([0.0, 0.0]))
    assert tree.min_positive() == 6.0


# ------------------------------------------------------------ storage and replays


def rows(ids: range | list[int]) -> Transitions:
    """Rows that carry their write number in every field."""
    ids_N = np.asarray(list(ids), dtype=np.int64)
    obs_NO = np.repeat(ids_N.astype(np.float32)[:, None], 2, axis=1)
    return Transitions(obs_NO, ids_N.copy(), ids_N.astype(np.float32),
                       np.ones(len(ids_N), np.float32), obs_NO + 1)


def test_an_oversize_chunk_keeps_slot_equal_to_write_number_mod_capacity() -> None:
    """Prioritized replay derives slots from write numbers: after any chunk, the
    transition written n-th must sit in slot n % capacity."""
    capacity = 5
    for first in range(capacity):
        for size in range(capacity + 1, 3 * capacity + 2):
            ring = RingStorage(capacity, (2,), np.dtype(np.float32))
            ring.add(rows(range(first)))
            slots_N = ring.add(rows(range(first, first + size)))
            kept_N = np.arange(first + size - capacity, first + size)
            np.testing.assert_array_equal(slots_N, kept_N % capacity)
            assert ring.get(kept_N % capacity).action_N.tolist() == kept_N.tolist()
            assert ring.cursor == (first + size) % capacity


def test_a_plain_ring_drops_nothing_and_says_so_with_integer_slots() -> None:
    ring = RingStorage(4, (2,), np.dtype(np.float32))
    ring.add(rows(range(6)))
    dropped_K = ring.pop_dropped()
    assert dropped_K.shape == (0,) and dropped_K.dtype == np.int64
    id_N = np.arange(4)
    id_N[dropped_K] = -1  # slots must index like any slot array (a float one cannot)
    assert id_N.tolist() == [0, 1, 2, 3]


class _DroppingRing(RingStorage):
    """A ring that reports chosen slots as dropped early (as FrameStorage does when
    frames run out), once each."""

    to_drop: np.ndarray = np.empty(0, dtype=np.int64)

    def pop_dropped(self) -> np.ndarray:
        dropped_K, self.to_drop = self.to_drop, np.empty(0, dtype=np.int64)
        return dropped_K


def test_a_dropped_slot_ignores_updates_for_what_it_held() -> None:
    ring = _DroppingRing(8, (2,), np.dtype(np.float32))
    replay = PrioritizedReplay(ring, np.random.default_rng(0), alpha=1.0, eps=0.0)
    replay.add(rows(range(2)))  # write numbers 0 and 1 in slots 0 and 1
    ring.to_drop = np.array([1], dtype=np.int64)
    replay.add(rows([2]))
    assert replay.tree.get(np.array([1])).tolist() == [0.0]
    replay.update_priorities(np.array([0, 1]), np.array([3.0, 4.0]))  # 1 is gone
    assert replay.tree.get(np.arange(3)).tolist() == [3.0, 0.0, 1.0]
    slots_B, _ = replay.draw(64, np.random.default_rng(1))
    assert 1 not in slots_B.tolist()


def test_a_sharded_restore_reuses_its_live_shards() -> None:
    """Loading a state into a replay that has the same shards refills them in place
    instead of allocating new ones; only shards the replay lacks are created."""
    made: list[PrioritizedReplay] = []
    rng = np.random.default_rng(0)

    def new_shard() -> PrioritizedReplay:
        made.append(PrioritizedReplay(RingStorage(6, (2,), np.dtype(np.float32)), rng))
        return made[-1]

    replay = ShardedReplay(new_shard, rng, 2)
    for key in (0, 1):
        replay.add(rows(range(3 + key)), shard=key)
    state = replay.state_dict()
    before = dict(replay.shards)
    replay.add(rows(range(10, 13)), shard=0)
    replay.load_state_dict(state)
    assert len(made) == 2
    assert all(replay.shards[k] is before[k] for k in (0, 1))
    assert [len(replay.shards[k]) for k in (0, 1)] == [3, 4]
    replay.drop_shard(1)
    replay.load_state_dict(state)  # shard 1 is back, in a new object
    assert len(made) == 3 and replay.shards[1] is made[2] and len(replay.shards[1]) == 4


def test_taking_rows_of_an_unweighted_batch_keeps_it_unweighted() -> None:
    batch = Batch(rows(range(5)), np.arange(10, 15), None)
    part = batch.take(np.array([3, 1]))
    assert part.weights_B is None
    assert part.indices_B.tolist() == [13, 11] and part.data.action_N.tolist() == [3, 1]
    weighted = Batch(rows(range(5)), np.arange(5), np.linspace(0.1, 0.5, 5))
    taken_B = weighted.take(np.array([4, 0])).weights_B
    assert taken_B is not None and taken_B.tolist() == [0.5, 0.1]
