"""The replay worker processes share in shared memory (runtime.shm_replay): one replay
seen by every process, writes that exclude each other, a tree repaired after a holder
died inside, and spawned workers that receive handles, not copies."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
from typing import Any

import numpy as np
import pytest

from qfleet.config import ReplayConfig
from qfleet.replay import PrioritizedReplay, ShardedReplay, Transitions, make_replay
from qfleet.runtime.shm_replay import Locked, SharedReplay, ShmAlloc

OBS = (3,)


def _shared(kind: str, shards: int = 1, capacity: int = 4096) -> SharedReplay:
    cfg = ReplayConfig(capacity=capacity, kind=kind, shards=shards)
    alloc = ShmAlloc()
    replay = make_replay(cfg, OBS, np.dtype(np.float32), np.random.default_rng(0), alloc=alloc)
    return SharedReplay(replay, alloc)


def _chunk(writer: int, k: int, rows: int = 4) -> Transitions:
    """Rows that say who wrote them: obs = (writer, k, row), next_obs = obs + 1."""
    obs_NO = np.array([[writer, k, r] for r in range(rows)], dtype=np.float32)
    return Transitions(obs_NO, np.full(rows, writer, dtype=np.int64),
                       np.full(rows, k, dtype=np.float32), np.ones(rows, dtype=np.float32),
                       obs_NO + 1)


def _writer(shared: SharedReplay, writer: int, chunks: int) -> None:
    replay = shared.for_worker(writer, 0)
    for k in range(chunks):
        replay.add(_chunk(writer, k), shard=writer)


def _run(ctx: Any, target: Any, *args: Any) -> None:
    process = ctx.Process(target=target, args=args, daemon=True)
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 0, f"the worker failed (exit code {process.exitcode})"


def test_a_spawned_worker_writes_the_arrays_the_main_process_reads() -> None:
    shared = _shared("prioritized", shards=2, capacity=100_000)
    payload = pickle.dumps(shared.replay.shards[0].tree.priorities_N)  # plain: by value
    assert len(payload) > 400_000
    _run(mp.get_context("spawn"), _writer, shared, 1, 50)
    replay = shared.replay
    assert isinstance(replay, ShardedReplay)
    assert [len(s) for s in replay.shards.values()] == [0, 200]
    rows = replay.shards[1].storage.get(np.arange(200))
    k_N = np.repeat(np.arange(50), 4)
    assert np.array_equal(rows.obs_NO[:, 1], k_N) and np.all(rows.obs_NO[:, 0] == 1)
    assert replay.added == 200


def test_a_sent_replay_is_handles_to_the_same_memory_not_a_copy() -> None:
    from multiprocessing.reduction import ForkingPickler

    shared = _shared("prioritized", shards=2, capacity=100_000)  # ~10 MB of arrays
    payload = bytes(ForkingPickler.dumps(shared))
    assert len(payload) < 200_000, len(payload)


def _pounder(shared: SharedReplay, writer: int, chunks: int) -> None:
    replay = shared.for_worker(writer, 0)
    for k in range(chunks):
        replay.add(_chunk(writer, k))
        if k % 8 == 0:
            replay.sample(16)


def test_two_writers_at_once_lose_no_row_and_tear_none() -> None:
    shared = _shared("uniform", capacity=8192)
    assert isinstance(shared.replay, Locked)
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_pounder, args=(shared, w, 600), daemon=True)
               for w in (0, 1)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
        assert p.exitcode == 0
    storage = shared.replay.replay.storage  # type: ignore[attr-defined]
    assert storage.size == 2 * 600 * 4 and storage.cursor == 2 * 600 * 4
    rows = storage.get(np.arange(storage.size))
    assert np.array_equal(rows.next_obs_NO, rows.obs_NO + 1)  # no row mixes two writes
    assert np.array_equal(rows.action_N, rows.obs_NO[:, 0])
    seen = {(int(w), int(k)) for w, k in rows.obs_NO[::4, :2]}
    assert seen == {(w, k) for w in (0, 1) for k in range(600)}  # none overwritten


def _dies_inside(shared: SharedReplay, ready: Any) -> None:
    shard = shared.replay.shards[0]  # type: ignore[attr-defined]
    guard = shard_guard(shared, 0)
    guard.__enter__()
    shard.tree.tree_A[3] = 50.0  # a leaf written, the sums above it not yet: then killed
    ready.set()
    signal.pause()


def shard_guard(shared: SharedReplay, key: int) -> Any:
    return shared.replay.guard(key)  # type: ignore[attr-defined]


def test_a_holder_killed_inside_leaves_a_tree_the_next_holder_repairs() -> None:
    shared = _shared("prioritized", shards=2)
    replay = shared.replay
    assert isinstance(replay, ShardedReplay)
    replay.add(_chunk(0, 0, rows=8), shard=0)
    replay.add(_chunk(1, 0, rows=8), shard=1)
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_dies_inside, args=(shared, ready), daemon=True)
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid or 0, signal.SIGKILL)
    holder.join(timeout=30)
    shard = replay.shards[0]
    assert shard.tree.total == pytest.approx(8.0)  # the half-done write: sums stale
    replay.sample(32)  # takes the guard (the kernel freed the lock): repairs first
    assert shard.tree.total == pytest.approx(7.0 + 50.0)
    slots_B, _ = shard.draw(4096, np.random.default_rng(1))
    assert np.mean(slots_B == 3) == pytest.approx(50 / 57, abs=0.03)


def test_shared_memory_changes_no_draw() -> None:
    """The same replay on NumPy arrays and on shared memory: the same batches."""
    cfg = ReplayConfig(capacity=512, kind="prioritized", shards=2)
    plain = make_replay(cfg, OBS, np.dtype(np.float32), np.random.default_rng(5))
    alloc = ShmAlloc()
    shared = SharedReplay(make_replay(cfg, OBS, np.dtype(np.float32),
                                      np.random.default_rng(5), alloc=alloc), alloc).replay
    shared.rng, plain.rng = np.random.default_rng(9), np.random.default_rng(9)
    for replay in (plain, shared):
        for k in range(40):
            replay.add(_chunk(k % 2, k), shard=k % 2)
    for _ in range(5):
        a, b = plain.sample(32), shared.sample(32)
        assert np.array_equal(a.indices_B, b.indices_B)
        assert np.array_equal(a.data.obs_NO, b.data.obs_NO)
        assert a.weights_B is not None and b.weights_B is not None
        assert np.array_equal(a.weights_B, b.weights_B)
        td_B = np.abs(a.data.obs_NO[:, 1]) + 0.5
        plain.update_priorities(a.indices_B, td_B)
        shared.update_priorities(b.indices_B, td_B)


def test_the_added_count_survives_a_dropped_shard_and_a_restore() -> None:
    cfg = ReplayConfig(capacity=512, kind="prioritized", shards=2)
    replay = make_replay(cfg, OBS, np.dtype(np.float32), np.random.default_rng(0))
    assert isinstance(replay, ShardedReplay)
    replay.add(_chunk(0, 0, rows=5), shard=0)
    replay.add(_chunk(1, 0, rows=7), shard=1)
    replay.drop_shard(0)
    assert replay.added == 12 and len(replay) == 7
    again = make_replay(cfg, OBS, np.dtype(np.float32), np.random.default_rng(0))
    assert isinstance(again, ShardedReplay)
    again.load_state_dict(replay.state_dict())
    assert again.added == 12 and len(again) == 7 and sorted(again.shards) == [1]
    assert isinstance(again.shards[1], PrioritizedReplay)


def test_a_worker_cannot_grow_the_shared_replay() -> None:
    alloc = pickle.loads(pickle.dumps(ShmAlloc()))
    with pytest.raises(RuntimeError, match="main process only"):
        alloc((4,), np.float32)
