"""Prioritized replay: P(i), IS weights, max-priority entry, stale updates, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _replay_stats import chi_square_p
from safetensors.numpy import load_file, save_file

import qfleet.replay.prioritized as prioritized
from qfleet.replay import NStepAccumulator, PrioritizedReplay, RingStorage, Transitions
from qfleet.replay.sumtree import SumMinTree


@pytest.fixture(autouse=True, params=["numpy-tree", "compiled-tree"])
def tree_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs on both trees: the NumPy reference, and the compiled one that
    replays pick where numba is installed (#15)."""
    if request.param == "numpy-tree":
        monkeypatch.setattr(prioritized, "new_tree", SumMinTree)
    else:
        pytest.importorskip("numba")
        from qfleet.replay.widetree import WideSumMinTree

        monkeypatch.setattr(prioritized, "new_tree", WideSumMinTree)


def chunk(n: int, start: int = 0, obs_dim: int = 4) -> Transitions:
    """Transitions whose obs encode their write number, so a sample says where it came from."""
    num_N = np.arange(start, start + n)
    obs_NO = np.repeat(num_N[:, None], obs_dim, axis=1).astype(np.float32)
    return Transitions(obs_NO, num_N % 2, num_N.astype(np.float32),
                       np.full(n, 0.99, np.float32), obs_NO + 0.5)


def make(capacity: int = 100, seed: int = 0, **kw: float) -> PrioritizedReplay:
    return PrioritizedReplay(RingStorage(capacity, (4,), np.dtype(np.float32)),
                             np.random.default_rng(seed), **kw)  # type: ignore[arg-type]


def test_priority_transform_and_sampling_distribution() -> None:
    replay = make(capacity=60, alpha=0.7, eps=0.01)
    replay.add(chunk(60))
    td_N = np.random.default_rng(5).random(60) * 3
    td_N[::9] = 0.0  # still sampled: eps keeps every priority positive
    replay.update_priorities(np.arange(60), td_N)
    prio_N = (np.abs(td_N) + 0.01) ** 0.7
    np.testing.assert_allclose(replay.tree.priorities_N, prio_N)
    counts_N = np.zeros(60)
    for _ in range(300):
        batch = replay.sample(128)
        counts_N += np.bincount(batch.data.obs_NO[:, 0].astype(int), minlength=60)
    assert chi_square_p(counts_N, counts_N.sum() * prio_N / prio_N.sum()) > 1e-3
    assert chi_square_p(counts_N, np.full(60, counts_N.sum() / 60)) < 1e-6


def test_importance_weights_equal_the_formula() -> None:
    replay = make(capacity=50, alpha=0.6, beta0=0.5, eps=1e-3)
    replay.add(chunk(40))
    td_N = np.random.default_rng(3).random(40) * 2
    replay.update_priorities(np.arange(40), td_N)
    prio_N = (td_N + 1e-3) ** 0.6
    big_n, prob_N = 40, prio_N / prio_N.sum()
    for beta in (0.5, 0.77, 1.0):
        batch = replay.sample(64, beta=beta)
        num_B = batch.indices_B
        w_N = (big_n * prob_N) ** -beta
        np.testing.assert_allclose(batch.weights_B, w_N[num_B] / w_N.max(), rtol=1e-6)
        assert batch.weights_B.dtype == np.float32
    np.testing.assert_array_equal(batch.data.obs_NO[:, 0], batch.indices_B)


def test_beta_anneals_from_beta0_to_one() -> None:
    replay = make(capacity=100, beta0=0.4, beta_steps=200)
    assert replay.beta == pytest.approx(0.4)
    replay.add(chunk(100))
    assert replay.beta == pytest.approx(0.7)
    replay.add(chunk(150))
    assert replay.beta == 1.0
    replay.set_progress(0.25)  # an explicit progress from the runner overrides counting
    assert replay.beta == pytest.approx(0.55)
    assert make(beta0=0.4).beta == pytest.approx(0.4)  # beta_steps=0, no progress: constant


def test_new_transitions_enter_with_max_priority_or_the_given_one() -> None:
    replay = make(capacity=10, alpha=1.0, eps=0.0)
    replay.add(chunk(3))
    assert replay.tree.priorities_N[:3].tolist() == [1.0, 1.0, 1.0]
    replay.update_priorities(np.array([0, 1]), np.array([5.0, 0.5]))
    replay.add(chunk(2, start=3))
    assert replay.tree.priorities_N[3:5].tolist() == [5.0, 5.0]  # max seen so far
    replay.add(chunk(2, start=5), priorities_N=np.array([0.25, 9.0]))  # actor-given |td|
    assert replay.tree.priorities_N[5:7].tolist() == [0.25, 9.0]
    replay.add(chunk(1, start=7))
    assert replay.tree.priorities_N[7] == 9.0


def test_stale_priority_updates_after_overwrite_are_dropped() -> None:
    replay = make(capacity=8, alpha=1.0, eps=0.0)
    replay.add(chunk(8))
    batch = replay.sample(8)
    replay.add(chunk(5, start=8))  # overwrites slots 0..4 while the batch is "in flight"
    replay.update_priorities(batch.indices_B, np.full(8, 42.0))
    prio_N = replay.tree.priorities_N
    for num in np.unique(batch.indices_B):
        assert prio_N[num % 8] == (42.0 if num >= 5 else 1.0)  # overwritten: untouched
    # and the fresh transitions in those slots can still be updated through their own ids
    fresh = replay.sample(64)
    replay.update_priorities(fresh.indices_B, np.full(64, 7.0))
    assert set(prio_N[np.unique(fresh.indices_B) % 8].tolist()) == {7.0}


def test_chunk_longer_than_capacity_keeps_ids_and_slots_aligned() -> None:
    replay = make(capacity=8)
    replay.add(chunk(3))
    replay.add(chunk(13, start=3))  # only the newest 8 survive
    batch = replay.sample(32)
    np.testing.assert_array_equal(batch.data.obs_NO[:, 0], batch.indices_B)
    assert batch.indices_B.min() >= 8


def test_checkpoint_round_trip_keeps_priorities(tmp_path: Path) -> None:
    replay = make(capacity=30, seed=1, beta_steps=100)
    replay.add(chunk(45))
    replay.update_priorities(np.arange(20, 45), np.random.default_rng(0).random(25))
    replay.set_progress(0.3)
    save_file({k: np.ascontiguousarray(v) for k, v in replay.state_dict().items()},
              str(tmp_path / "replay.safetensors"))
    restored = make(capacity=30, seed=1, beta_steps=100)
    restored.load_state_dict(load_file(str(tmp_path / "replay.safetensors")))
    np.testing.assert_array_equal(restored.tree.priorities_N, replay.tree.priorities_N)
    assert restored.tree.total == replay.tree.total
    assert restored.tree.min_positive() == replay.tree.min_positive()
    assert (restored.max_priority, restored.added, restored.beta) == \
        (replay.max_priority, replay.added, replay.beta)
    a, b = replay.sample(16), restored.sample(16)
    np.testing.assert_array_equal(a.indices_B, b.indices_B)
    np.testing.assert_array_equal(a.weights_B, b.weights_B)
    # generations survive too: an update for an overwritten id is still dropped
    restored.update_priorities(np.array([0]), np.array([100.0]))
    assert restored.max_priority == replay.max_priority


def test_n_step_transitions_compose_with_prioritized_replay() -> None:
    acc = NStepAccumulator(3, 0.9, 2, (1,), np.dtype(np.float32))
    replay = PrioritizedReplay(RingStorage(50, (1,), np.dtype(np.float32)),
                               np.random.default_rng(0))
    for t in range(20):
        obs_E1 = np.array([[t], [100 + t]], dtype=np.float32)
        done_E = np.array([t == 9, False])
        replay.add(acc.step(obs_E1, np.zeros(2, np.int64), np.ones(2, np.float32),
                            obs_E1 + 1, done_E, np.zeros(2, bool)))
    batch = replay.sample(256)
    d = batch.data
    full_B = np.isclose(d.discount_N, 0.9**3)
    assert full_B.any() and (d.discount_N == 0).any()  # both kinds get sampled
    np.testing.assert_allclose(d.reward_N[full_B], 1 + 0.9 + 0.81, rtol=1e-6)
    np.testing.assert_array_equal(d.next_obs_NO[full_B, 0] - d.obs_NO[full_B, 0], 3)
    terminal_B = d.reward_N[d.discount_N == 0].astype(np.float64)
    assert np.isclose(terminal_B[:, None], [2.71, 1.9, 1.0], rtol=1e-6).any(axis=1).all()


def test_progress_is_clamped_to_zero_and_one() -> None:
    replay = make(beta0=0.4)
    replay.set_progress(3.0)
    assert replay.beta == pytest.approx(1.0)
    replay.set_progress(-2.0)
    assert replay.beta == pytest.approx(0.4)


def test_defaults_one_row_and_updates_for_slots_never_written() -> None:
    replay = make(capacity=10)  # alpha 0.6, eps 1e-6, beta0 0.4, no annealing
    with pytest.raises(RuntimeError, match="cannot sample from an empty replay"):
        replay.sample(2)
    replay.add(chunk(1), priorities_N=np.array([1.0]))
    assert replay.tree.priorities_N[0] == pytest.approx((1.0 + 1e-6) ** 0.6, rel=1e-12)
    batch = replay.sample(3)  # one row is enough to sample from
    assert batch.indices_B.tolist() == [0, 0, 0] and replay.beta == pytest.approx(0.4)
    replay.add(chunk(50, start=1))
    assert replay.beta == pytest.approx(0.4)
    fresh = make(capacity=10)
    fresh.add(chunk(1))
    fresh.update_priorities(np.array([1, 2]), np.array([5.0, 5.0]))  # never written there
    assert fresh.tree.priorities_N[1:].tolist() == [0.0] * 9
    assert fresh.sample(4).indices_B.tolist() == [0] * 4
