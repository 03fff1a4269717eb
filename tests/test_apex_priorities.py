"""Priorities on the learner side of Ape-X and PER, against hand-computed values: an actor's
initial priorities (|n-step TD| with its own network) are in the tree before any update,
and with prefetch > 1 (batches drawn together, shuffled, written back after all of them)
every priority written back belongs to its own row: a stub learner whose TD error is the
row's id makes any misalignment visible."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import numpy as np
import pytest
import torch
from _runners import closing

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.replay import Batch, PrioritizedReplay, ShardedReplay, Transitions
from qfleet.replay.sharded import KEY_SHIFT, LOCAL_MASK
from qfleet.roles import UpdateStats
from qfleet.runtime import InlineRunner, LearnerSide

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "learner.batch_size=8",
         "replay.capacity=4000", "net.hidden=[32]", "log.progress=false",
         "log.tensorboard=false", "runtime.backend='inline'", "learner.device='cpu'"]


def _program(preset: str, *extra: str) -> ActorLearnerProgram:
    program = build_program(qfleet.load_config(preset, [*SMALL, *extra]))
    assert isinstance(program, ActorLearnerProgram)
    return program


def _shard_of(replay: PrioritizedReplay | ShardedReplay,
              index: int) -> tuple[PrioritizedReplay, int]:
    """(the shard holding global batch index ``index``, its slot there)."""
    if isinstance(replay, ShardedReplay):
        shard = replay.shards[index >> KEY_SHIFT]
        local = index & LOCAL_MASK
    else:
        shard, local = replay, index
    slot = local % shard.capacity
    assert shard.id_N[slot] == local, "the row was overwritten: the test wrote too much"
    return shard, slot


# ---------------------------------------------------------------- initial priorities


@torch.no_grad()
def _hand_priorities(net: torch.nn.Module, rows: Transitions, alpha: float,
                     eps: float) -> np.ndarray:
    """(|r + d Q(s', argmax_a Q(s', a)) - Q(s, a)| + eps) ** alpha, one network for both
    (double DQN with the actor's own copy as online and target), written out row by row."""
    out = []
    for i in range(len(rows)):
        q_A = net(torch.from_numpy(rows.obs_NO[i: i + 1]))[0]
        next_q_A = net(torch.from_numpy(rows.next_obs_NO[i: i + 1]))[0]
        y = float(rows.reward_N[i]) + float(rows.discount_N[i]) * float(
            next_q_A[int(next_q_A.argmax())])
        out.append((abs(y - float(q_A[int(rows.action_N[i])])) + eps) ** alpha)
    return np.array(out)


def test_actors_initial_priorities_are_in_the_tree_before_any_update() -> None:
    program = _program("cartpole-apex", "learner.learning_starts=1000000",
                       "replay.alpha=0.7", "replay.eps=0.01")
    with closing(InlineRunner(program)) as runner:
        for _ in range(3):
            runner.step()
        assert runner.learner.version == 0  # no update has written a priority yet
        replay = runner.replay
        assert isinstance(replay, ShardedReplay)
        for key, shard in replay.shards.items():
            n = len(shard)
            assert n >= 3 * 8 * 2 - 2 * 2, key  # less the n - 1 = 2 pending per env
            rows = shard.storage.get(np.arange(n))
            # The actors act with the learner's initial parameters (published at start).
            expected = _hand_priorities(runner.learner.online, rows, alpha=0.7, eps=0.01)
            stored = shard.tree.priorities_N[:n]
            np.testing.assert_allclose(stored, expected, rtol=1e-5, err_msg=f"shard {key}")
            # and they are not the max-priority default every row would get without them
            assert len(np.unique(np.round(stored, 6))) > n // 2, key
            assert shard.max_priority == pytest.approx(max(1.0, float(stored.max())))


# ---------------------------------------------------------------- prefetch write-back


class RowIdLearner:
    """A learner stub: the |TD error| it reports for a row is the row's id (its reward).
    It records every batch it was handed."""

    schedule = None  # a constant learning rate: nothing for the learner side to set

    def __init__(self) -> None:
        self.version = 0
        self.batches: list[tuple[Batch, int]] = []

    def stage(self, batch: Batch) -> None:
        return None  # learner.background_sample: nothing to put on a device

    def update_many(self, batch: Batch, count: int, staged: None = None) -> list[UpdateStats]:
        self.batches.append((batch, count))
        size = len(batch) // count
        self.version += count
        return [UpdateStats(torch.tensor(0.0),
                            torch.from_numpy(batch.data.reward_N[k * size:(k + 1) * size].copy()),
                            torch.tensor(0.0)) for k in range(count)]


def _rows_with_ids(first: int, count: int) -> Transitions:
    ids = np.arange(first, first + count)
    return Transitions(obs_NO=np.tile(ids[:, None], (1, 4)).astype(np.float32),
                       action_N=ids % 2, reward_N=ids.astype(np.float32),
                       discount_N=np.full(count, 0.99, np.float32),
                       next_obs_NO=np.tile(ids[:, None], (1, 4)).astype(np.float32))


@pytest.mark.parametrize("preset", ["cartpole-apex", "cartpole-per"])
@pytest.mark.parametrize(("prefetch", "background"), [(1, "off"), (4, "off"), (1, "on"),
                                                      (4, "on")])
def test_written_back_priorities_belong_to_their_own_rows(preset: str, prefetch: int,
                                                          background: str) -> None:
    program = _program(preset, f"learner.prefetch={prefetch}", "replay.alpha=0.5",
                       "replay.eps=0.125", f"learner.background_sample='{background}'")
    stub = RowIdLearner()
    side = LearnerSide(dataclasses.replace(program, make_learner=lambda: cast(Any, stub)))
    replay = side.replay
    assert isinstance(replay, PrioritizedReplay | ShardedReplay)
    rng = np.random.default_rng(0)
    for chunk in range(6):  # rows with ids 1 .. 600, varied initial priorities
        rows = _rows_with_ids(1 + 100 * chunk, 100)
        replay.add(rows, rng.uniform(0.1, 50.0, 100), shard=chunk % 2)
    stats = side.train(12)
    assert len(stats) == 12 and sum(c for _, c in stub.batches) == 12
    assert len(stub.batches) == 12 // prefetch
    written = 0
    for batch, _ in stub.batches:
        assert len(batch) == prefetch * 8
        for index, row_id in zip(batch.indices_B.tolist(), batch.data.reward_N.tolist(),
                                 strict=True):
            shard, slot = _shard_of(replay, index)
            # the row at this index is the one the learner saw with it ...
            assert shard.storage.get(np.array([slot])).reward_N[0] == row_id
            # ... and the priority there is the one computed from that row's own TD error
            assert shard.tree.priorities_N[slot] == pytest.approx(
                (row_id + 0.125) ** 0.5, rel=1e-12), (index, row_id)
            written += 1
    assert written == 12 * 8
    if prefetch > 1:  # the draws were shuffled before slicing (stratified ones are sorted)
        assert any(np.any(np.diff(b.indices_B) < 0) for b, _ in stub.batches)
