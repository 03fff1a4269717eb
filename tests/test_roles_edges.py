"""Edges of the roles the other role tests leave open: a gradient worker's priority
write-back and shard, its own/shared replay restore, its episode lengths and pulls; the
learners' devices, frozen target and shared target forward passes (counted, and checked
against one-by-one updates without double DQN); the A3C trainers' pool and private
copies; snapshots of a module on another device landing on the CPU."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from _runners import gradient_program
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import qfleet
from qfleet.config import AlgoConfig, LearnerConfig
from qfleet.nets import ActorCritic
from qfleet.replay import Batch, PrioritizedReplay, ShardedReplay, Transitions
from qfleet.replay.sharded import KEY_SHIFT
from qfleet.roles import DQNLearner, ac_learner
from qfleet.roles.ac_learner import ACLearner
from qfleet.roles.gradients import GradientWorker
from qfleet.roles.learner import to_torch
from qfleet.roles.params import ParamSnapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[16]",
         "learner.batch_size=16", "replay.capacity=2000", "runtime.backend='inline'",
         "log.progress=false", "log.tensorboard=false"]


def _gorila(*extra: str) -> Any:
    return gradient_program(qfleet.load_config("cartpole-gorila-sync", [*SMALL, *extra]))


def _close(*workers: GradientWorker) -> None:
    for worker in workers:
        worker.close()


def _record_samples(replay: Any) -> list[Batch]:
    """Every batch ``replay.sample`` returns from now on, in order."""
    drawn: list[Batch] = []
    sample = replay.sample

    def spy(batch_size: int, beta: float | None = None) -> Batch:
        drawn.append(sample(batch_size, beta))
        return drawn[-1]

    replay.sample = spy
    return drawn


# ---------------------------------------------------------------- GradientWorker


def test_a_prioritized_worker_writes_its_batch_s_td_errors_back_as_priorities() -> None:
    """Priority of each sampled row after work() = (|td| + eps) ** alpha, td the loss's
    own on that batch at the worker's (unchanged) parameters."""
    program = _gorila("replay.kind='prioritized'", "replay.alpha=0.5", "replay.eps=0.125",
                      "learner.learning_starts=16")
    worker = program.make_worker(0, 0, None)
    try:
        replay = worker.replay
        assert isinstance(replay, PrioritizedReplay)
        drawn = _record_samples(replay)
        while worker.work().grads_P is None:
            pass
        assert len(drawn) == 1
        batch = drawn[0]
        out = worker.loss_fn(worker.model["online"], worker.model["target"],
                             to_torch(batch, torch.device("cpu")))
        td_abs_B = out.td_B.abs().numpy().astype(np.float64)
        expected_B = (td_abs_B + 0.125) ** 0.5
        slots_B = batch.indices_B % replay.storage.capacity
        np.testing.assert_allclose(replay.tree.priorities_N[slots_B], expected_B, rtol=1e-12)
        # Rows never drawn keep the max priority they were added with (1.0 at the start).
        assert np.all(replay.tree.priorities_N[np.setdiff1d(np.arange(len(replay)), slots_B)]
                      == 1.0)
        assert not np.any(expected_B == 1.0)
    finally:
        worker.close()


def test_a_sharded_worker_writes_to_its_own_shard() -> None:
    """Scope sharded: worker 1's rows go to shard 1 (a writer naming no shard would be
    sent round-robin, starting at shard 0)."""
    program = _gorila("replay.scope='sharded'", "learner.learning_starts=1000000")
    shared = program.make_shared_replay()
    assert isinstance(shared, ShardedReplay) and sorted(shared.shards) == [0, 1]
    worker = program.make_worker(1, 0, shared)
    try:
        worker.work()
        assert (len(shared.shards[0]), len(shared.shards[1])) == (0, 4)
        worker.work()
        assert (len(shared.shards[0]), len(shared.shards[1])) == (0, 8)
    finally:
        worker.close()


def test_a_sharded_prioritized_worker_writes_priorities_to_its_own_rows() -> None:
    """The same write-back through a sharded replay: batch indices carry the shard key."""
    program = _gorila("replay.scope='sharded'", "replay.alpha=1.0", "replay.eps=0.25",
                      "learner.learning_starts=16")
    shared = program.make_shared_replay()
    assert isinstance(shared, ShardedReplay)
    worker = program.make_worker(1, 0, shared)
    try:
        drawn = _record_samples(shared)
        while worker.work().grads_P is None:
            pass
        batch = drawn[-1]
        out = worker.loss_fn(worker.model["online"], worker.model["target"],
                             to_torch(batch, torch.device("cpu")))
        assert np.all(batch.indices_B >> KEY_SHIFT == 1)
        shard = shared.shards[1]
        local_B = batch.indices_B & ((1 << KEY_SHIFT) - 1)
        got_B = shard.tree.priorities_N[local_B % shard.storage.capacity]
        np.testing.assert_allclose(got_B, out.td_B.abs().numpy().astype(np.float64) + 0.25,
                                   rtol=1e-12)
    finally:
        worker.close()


def test_a_gradient_carries_its_chunk_s_episode_lengths() -> None:
    """Random actions end CartPole episodes within a few dozen steps; each Gradient holds
    the lengths of the episodes its chunk finished (the twin collects the same chunks)."""
    program = _gorila("learner.learning_starts=1000000", "actors.eps_start=1.0",
                      "actors.eps_end=1.0")
    worker, twin = program.make_worker(0, 0, None), program.make_worker(0, 0, None)
    try:
        lengths: list[int] = []
        for _ in range(40):
            grad = worker.work()
            chunk = twin.actor.collect(4)
            assert grad.episode_lengths == chunk.episode_lengths
            assert grad.episode_returns == [float(n) for n in grad.episode_lengths]
            lengths += grad.episode_lengths
        assert len(lengths) >= 2 and all(n >= 8 for n in lengths)
    finally:
        _close(worker, twin)


def test_a_worker_given_a_replay_treats_it_as_shared_unless_told_it_owns_it() -> None:
    program = _gorila("learner.learning_starts=1000000")
    own = program.make_worker(0, 0, None)
    try:
        assert own.owns_replay
        borrowed = GradientWorker(0, own.actor, own.model["target"], own.replay, own.loss_fn,
                                  chunk_steps=4, batch_size=16, learning_starts=10**6)
        borrowed.work()
        assert not borrowed.owns_replay and borrowed.replay_state() == {}
        assert own.replay_state() != {}
    finally:
        own.close()


def test_restoring_a_replay_skips_shared_replays_and_empty_states() -> None:
    """A shared replay is the global side's to restore: a worker's own state (of another
    fill) leaves it alone; an empty state leaves a worker's own replay alone too."""
    own = _gorila("learner.learning_starts=1000000").make_worker(0, 0, None)
    program = _gorila("learner.learning_starts=1000000", "replay.scope='shared'")
    shared = program.make_worker(0, 0, program.make_shared_replay())
    try:
        for _ in range(5):
            own.work()
        for _ in range(2):
            shared.work()
        state = own.replay_state()
        assert shared.replay is not None and own.replay is not None
        assert (len(shared.replay), shared.collected) == (8, 8)
        shared.load_replay_state(state)
        assert (len(shared.replay), shared.collected) == (8, 8)
        own.load_replay_state({})
        assert (len(own.replay), own.collected) == (20, 20)
    finally:
        _close(own, shared)


def test_a_pull_that_finds_nothing_newer_restarts_the_sent_count() -> None:
    worker = _gorila("learner.learning_starts=16").make_worker(0, 0, None)
    try:
        while worker.sent_total < 2:
            worker.work()
        assert worker.sent == 2 and worker.wants_params(2)
        worker.pulled(None)
        assert worker.sent == 0 and not worker.wants_params(1)
        worker.work()
        assert worker.sent == 1 and worker.wants_params(1)
    finally:
        worker.close()


def test_an_actor_critic_worker_moves_its_online_net_only() -> None:
    """A2C has no target net: the worker's model holds "online" alone (the snapshots it
    loads and the state it sends have no "target" entry)."""
    cfg = qfleet.load_config("cartpole-a2c", ["env.num_envs=2", "net.hidden=[16]",
                                              "runtime.backend='inline'",
                                              "log.progress=false"])
    worker = gradient_program(cfg).make_worker(0, 0, None)
    try:
        assert list(worker.model.keys()) == ["online"]
        grad = worker.work()
        assert grad.grads_P is not None
        # A sampling actor reports no exploration rate (epsilon is None, not 0).
        assert grad.epsilon is None and worker.actor.collect(2).epsilon is None
    finally:
        worker.close()


# ---------------------------------------------------------------- DQNLearner

STATES, ACTIONS = 16, 3


class Table(nn.Module):
    """Q(s, .) = table[s], s = column 0 of the observation: each row's Q-values do not
    depend on the batch they are computed in, so slices compare bit for bit."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(STATES, ACTIONS, generator=gen))

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return self.table[obs_BO[:, 0].long()]


def _batch(rows: int, seed: int) -> Batch:
    rng = np.random.default_rng(seed)
    obs_NO = rng.integers(0, STATES, (rows, 2)).astype(np.float32)
    next_obs_NO = rng.integers(0, STATES, (rows, 2)).astype(np.float32)
    data = Transitions(obs_NO=obs_NO, action_N=rng.integers(0, ACTIONS, rows),
                       reward_N=rng.normal(size=rows).astype(np.float32),
                       discount_N=np.full(rows, 0.9, np.float32), next_obs_NO=next_obs_NO)
    return Batch(data, np.arange(rows), None)


def _dqn(**fields: Any) -> DQNLearner:
    cfg = LearnerConfig(**{"device": "cpu", "lr": 0.05, "max_grad_norm": 0.0, **fields})
    return DQNLearner(Table(seed=3), cfg, AlgoConfig(double=False))


def _table(net: nn.Module) -> torch.Tensor:
    return net.state_dict()["table"]


def _target_rows(learner: DQNLearner) -> list[int]:
    """Rows of each target forward pass from now on."""
    rows: list[int] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        rows.append(args[0].shape[0])

    learner.target.register_forward_hook(hook)
    return rows


def test_hard_target_updates_share_one_target_pass_until_each_refresh() -> None:
    """tau = 1 (hard copies every 4): 6 updates of 8 rows from version 0 are one target
    pass over 4 x 8 rows, a refresh, then one over 2 x 8; without double DQN (the max over
    the target's row) they equal 6 single updates bit for bit."""
    fast, slow = _dqn(target_update_every=4), _dqn(target_update_every=4)
    rows = _target_rows(fast)
    batch = _batch(6 * 8, seed=1)
    stats = fast.update_many(batch, 6)
    assert rows == [32, 16]
    ref = [slow.update(batch.take(np.arange(k * 8, (k + 1) * 8))) for k in range(6)]
    for a, b in zip(stats, ref, strict=True):
        assert torch.equal(a.loss, b.loss) and torch.equal(a.td_abs_B, b.td_abs_B)
    assert torch.equal(_table(fast.online), _table(slow.online))
    assert torch.equal(_table(fast.target), _table(slow.target))
    assert not torch.equal(_table(fast.target), _table(_dqn().target)), "a refresh happened"


def test_polyak_targets_take_one_target_pass_per_update() -> None:
    learner = _dqn(tau=0.5)
    rows = _target_rows(learner)
    learner.update_many(_batch(3 * 8, seed=2), 3)
    assert rows == [8, 8, 8]


def test_the_target_net_is_frozen() -> None:
    """Its outputs carry no graph even outside no_grad, and updates leave it no grads."""
    learner = _dqn(target_update_every=2)
    learner.update_many(_batch(3 * 8, seed=4), 3)
    assert not any(p.requires_grad for p in learner.target.parameters())
    assert all(p.grad is None for p in learner.target.parameters())
    assert not learner.target(torch.zeros(2, 2)).requires_grad
    assert all(p.requires_grad for p in learner.online.parameters())


def test_learners_move_their_net_to_the_configured_device() -> None:
    """``meta`` stands in for an accelerator on a CPU-only machine: a learner configured
    for it holds its nets (online, and the DQN target) there, not where they were built."""
    dqn = DQNLearner(Table(seed=0), LearnerConfig(device="meta", optimizer="rmsprop"),
                     AlgoConfig())
    assert dqn.device == torch.device("meta")
    assert all(p.device.type == "meta" for p in [*dqn.online.parameters(),
                                                 *dqn.target.parameters()])
    ac = ACLearner(_ac_net(), LearnerConfig(device="meta", optimizer="rmsprop"),
                   AlgoConfig(name="a3c", trainers=1))
    assert all(p.device.type == "meta" for p in ac.online.parameters())
    assert all(p.device.type == "meta" for p in ac.params)


# ---------------------------------------------------------------- ACLearner


def _ac_net() -> ActorCritic:
    torch.manual_seed(0)
    return ActorCritic(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), 8, 3)


def _ac_batch(rows: int) -> Batch:
    rng = np.random.default_rng(7)
    data = Transitions(obs_NO=rng.normal(size=(rows, 4)).astype(np.float32),
                       action_N=rng.integers(0, 3, rows),
                       reward_N=rng.normal(size=rows).astype(np.float32),
                       discount_N=np.full(rows, 0.9, np.float32),
                       next_obs_NO=rng.normal(size=(rows, 4)).astype(np.float32))
    return Batch(data, np.arange(rows), None)


def test_trainer_threads_each_copy_the_global_net_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``trainers`` threads at most, each deep-copying the global net at its first batch
    only (then refreshing that copy in place): 6 batches on 2 threads are <= 2 copies."""
    copies: list[nn.Module] = []
    deepcopy: Callable[[Any], Any] = ac_learner.copy.deepcopy

    def counting(obj: Any) -> Any:
        copies.append(obj)
        return deepcopy(obj)

    monkeypatch.setattr(ac_learner, "copy", types.SimpleNamespace(deepcopy=counting))
    learner = ACLearner(_ac_net(), LearnerConfig(device="cpu", optimizer="rmsprop"),
                        AlgoConfig(name="a3c", trainers=2))
    assert learner.pool is not None
    try:
        # The pool itself: as many threads as trainers (a default pool has cpu + 4).
        assert learner.pool._max_workers == 2
        learner.update_many(_ac_batch(6 * 4), 6)
        assert learner.version == 6
        assert 1 <= len(copies) <= 2 and all(c is learner.online for c in copies)
        learner.update_many(_ac_batch(6 * 4), 6)
        assert 1 <= len(copies) <= 2
    finally:
        learner.pool.shutdown(wait=True)


# ---------------------------------------------------------------- ParamSnapshot


def test_a_snapshot_of_a_module_on_another_device_holds_cpu_tensors() -> None:
    """Fake CUDA tensors (shapes and devices, no data) make the device move checkable
    without a GPU: every snapshot tensor is a CPU copy, whatever the module's device."""
    net = nn.Linear(3, 2)  # built outside the mode: a real module, then faked onto "cuda"
    with FakeTensorMode(allow_non_fake_inputs=True):
        net_on_gpu = net.to_empty(device="cuda")
        assert net_on_gpu.weight.device.type == "cuda"
        snap = ParamSnapshot.of(net_on_gpu, 7)
        assert snap.version == 7 and sorted(snap.params) == ["bias", "weight"]
        assert all(v.device.type == "cpu" for v in snap.params.values())
        assert snap.params["weight"].shape == (2, 3)
