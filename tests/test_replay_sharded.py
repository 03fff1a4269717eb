"""Sharded prioritized replay: the union's distribution and weights, shards that come and go."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _replay_stats import chi_square_p
from safetensors.numpy import load_file, save_file

from qfleet.replay import PrioritizedReplay, RingStorage, ShardedReplay, Transitions


def chunk(n: int, tag: int) -> Transitions:
    """obs[0] = tag * 1000 + position: a sample names its shard and slot."""
    obs_NO = np.repeat((tag * 1000 + np.arange(n, dtype=np.float32))[:, None], 2, axis=1)
    return Transitions(obs_NO, np.zeros(n, np.int64), np.zeros(n, np.float32),
                       np.ones(n, np.float32), obs_NO)


def make(num_shards: int, capacity: int = 40, seed: int = 0) -> ShardedReplay:
    rng = np.random.default_rng(seed)

    def new_shard() -> PrioritizedReplay:
        return PrioritizedReplay(RingStorage(capacity, (2,), np.dtype(np.float32)), rng,
                                 alpha=1.0, eps=0.0)

    return ShardedReplay(new_shard, rng, num_shards, beta0=0.5)


def fill(replay: ShardedReplay, sizes: list[int], seed: int = 0) -> dict[float, float]:
    """Give every transition a random priority; returns {obs tag: priority}."""
    rng = np.random.default_rng(seed)
    prio: dict[float, float] = {}
    for key, size in zip(sorted(replay.shards), sizes, strict=True):
        td_N = rng.random(size) ** 2 * (key + 1)  # shards differ in total priority
        replay.add(chunk(size, key), priorities_N=td_N, shard=key)
        prio.update(zip((key * 1000 + np.arange(size)).tolist(), td_N.tolist(), strict=True))
    return prio


def test_sampling_matches_one_buffer_over_the_union() -> None:
    replay = make(3)
    prio = fill(replay, [40, 25, 10])
    tags = np.array(sorted(prio))
    p_N = np.array([prio[t] for t in tags])
    counts_N = np.zeros(len(tags))
    for _ in range(400):
        batch = replay.sample(128)
        counts_N += np.bincount(np.searchsorted(tags, batch.data.obs_NO[:, 0]),
                                minlength=len(tags))
    assert chi_square_p(counts_N, counts_N.sum() * p_N / p_N.sum()) > 1e-3
    # sampling shards uniformly (ignoring their totals) would be caught
    per_shard = np.array([prio[t] / sum(v for k, v in prio.items() if k // 1000 == t // 1000)
                          for t in tags]) / 3
    assert chi_square_p(counts_N, counts_N.sum() * per_shard) < 1e-6


def test_weights_equal_the_union_formula() -> None:
    replay = make(2)
    prio = fill(replay, [30, 12], seed=4)
    p_all = np.array(list(prio.values()))
    batch = replay.sample(64, beta=0.6)
    p_B = np.array([prio[t] for t in batch.data.obs_NO[:, 0].tolist()])
    w_B = (len(p_all) * p_B / p_all.sum()) ** -0.6
    w_max = (len(p_all) * p_all.min() / p_all.sum()) ** -0.6
    np.testing.assert_allclose(batch.weights_B, w_B / w_max, rtol=1e-6)


def test_updates_route_to_shards_and_dropped_shards_are_ignored() -> None:
    replay = make(3)
    fill(replay, [10, 10, 10])
    batch = replay.sample(64)
    shard_B = batch.data.obs_NO[:, 0] // 1000
    replay.drop_shard(1)  # its writer died with the batch in flight
    replay.update_priorities(batch.indices_B, np.full(64, 3.0))
    for key in (0, 2):
        mine = np.unique(batch.data.obs_NO[shard_B == key, 0] % 1000).astype(int)
        assert (replay.shards[key].tree.priorities_N[mine] == 3.0).all()
    for _ in range(20):
        assert set((replay.sample(32).data.obs_NO[:, 0] // 1000).tolist()) <= {0, 2}
    key = replay.add_shard()
    assert key == 3  # keys are never reused, so old indices cannot hit the new shard
    replay.add(chunk(5, key), shard=key)
    assert len(replay) == 25


def test_stale_updates_dropped_inside_a_shard() -> None:
    replay = make(1, capacity=4)
    replay.add(chunk(4, 0), shard=0)
    batch = replay.sample(16)
    replay.add(chunk(4, 0), shard=0)  # every slot overwritten
    replay.update_priorities(batch.indices_B, np.full(16, 50.0))
    assert replay.shards[0].tree.priorities_N.max() < 50.0


def test_unnamed_writes_go_round_robin_and_empty_replay_refuses() -> None:
    replay = make(2)
    with pytest.raises(RuntimeError, match="empty"):
        replay.sample(4)
    for tag in range(4):
        replay.add(chunk(3, tag))
    assert [len(replay.shards[k]) for k in (0, 1)] == [6, 6]
    replay.add(chunk(5, 9), shard=3)  # writer 3 of a 2-shard replay: shard 3 % 2 = 1
    assert [len(replay.shards[k]) for k in (0, 1)] == [6, 11]


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    replay = make(3)
    fill(replay, [20, 5, 9])
    replay.drop_shard(1)
    replay.add_shard()
    path = str(tmp_path / "r.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in replay.state_dict().items()}, path)
    restored = make(3)
    restored.load_state_dict(load_file(path))
    assert sorted(restored.shards) == [0, 2, 3]
    for key in (0, 2):
        np.testing.assert_array_equal(restored.shards[key].tree.priorities_N,
                                      replay.shards[key].tree.priorities_N)
    assert restored.add_shard() == 4


def test_unnamed_writes_visit_three_shards_in_key_order_and_errors_say_why() -> None:
    replay = make(3)
    for tag in range(6):
        replay.add(chunk(tag + 1, tag))  # sizes 1..6 say which write went where
    assert [len(replay.shards[k]) for k in (0, 1, 2)] == [1 + 4, 2 + 5, 3 + 6]
    assert replay.added == 21
    for key in list(replay.shards):
        replay.drop_shard(key)
    with pytest.raises(RuntimeError, match=r"^no shards to write to$"):
        replay.add(chunk(2, 0))
    with pytest.raises(RuntimeError, match=r"^cannot sample from an empty replay$"):
        replay.sample(2)


def test_sampled_batch_always_holds_batch_size_rows_over_many_small_shards() -> None:
    """Five shards, batches of 3: many shards get 0 or exactly 1 of the draws, and every
    batch still holds 3 rows, each with the weight of its own priority."""
    replay = make(5)
    fill(replay, [7, 3, 9, 1, 5])
    for _ in range(200):
        batch = replay.sample(3)
        assert len(batch) == len(batch.data) == len(batch.weights_B) == 3  # type: ignore[arg-type]
        tags = batch.data.obs_NO[:, 0].astype(int)
        assert np.array_equal(batch.indices_B >> 40, tags // 1000)


def test_small_total_priority_samples_and_zero_total_refuses() -> None:
    """A total priority below 1 is a normal replay; all-zero priorities cannot be sampled."""
    replay = make(2)
    replay.add(chunk(4, 0), priorities_N=np.full(4, 0.01), shard=0)
    assert replay.shards[0].tree.total == pytest.approx(0.04)
    assert len(replay.sample(6)) == 6
    dead = make(2)
    dead.add(chunk(4, 0), priorities_N=np.zeros(4), shard=1)  # eps 0: priority 0
    with pytest.raises(RuntimeError, match="cannot sample from an empty replay"):
        dead.sample(2)


def test_beta_is_beta0_by_default_and_anneals_over_rows_added_to_any_shard() -> None:
    rng = np.random.default_rng(0)

    def new_shard() -> PrioritizedReplay:
        return PrioritizedReplay(RingStorage(40, (2,), np.dtype(np.float32)), rng)

    assert ShardedReplay(new_shard, rng, 2).beta == pytest.approx(0.4)
    constant = ShardedReplay(new_shard, rng, 2)
    constant.add(chunk(30, 0), shard=0)
    assert constant.beta == pytest.approx(0.4)  # beta_steps 0: no annealing
    replay = ShardedReplay(new_shard, rng, 2, beta0=0.2, beta_steps=100)
    replay.add(chunk(30, 0), shard=0)
    replay.add(chunk(20, 1), shard=1)
    assert replay.added == 50 and replay.beta == pytest.approx(0.2 + 0.8 * 0.5)
    replay.add(chunk(60, 1), shard=1)
    assert replay.beta == pytest.approx(1.0)
    replay.set_progress(0.25)
    assert replay.beta == pytest.approx(0.4)
