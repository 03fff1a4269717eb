"""The core's edges that mutation testing found unguarded: what an actor counts per
episode, the worker loop's pull cadence, snapshots that do not alias the live model, the
device rules, replays' error messages, and which replay a gradient worker checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from _runners import gradient_program
from torch import nn

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import ConfigError
from qfleet.replay import PrioritizedReplay, RingStorage, RolloutQueue, Transitions, UniformReplay
from qfleet.replay.frames import FrameStorage
from qfleet.replay.sumtree import SumMinTree
from qfleet.roles import ActorLoop, gradient_step
from qfleet.roles.clock import Clock
from qfleet.roles.gradients import GradientWorker
from qfleet.roles.learner import pick_device, to_torch
from qfleet.roles.params import ParamSnapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _actor_program() -> ActorLearnerProgram:
    cfg = qfleet.load_config("cartpole-dqn", ["env.num_envs=3", "net.hidden=[8]",
                                              "log.progress=false"])
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    return program


def test_an_actor_reports_each_episode_return_and_length_and_restarts_from_zero() -> None:
    """CartPole pays 1 per step, so each finished episode's return is its length, also for
    the episodes that begin after one ended (the counters restart at 0) and after a reset."""
    actor = _actor_program().make_actor(0, 0)
    try:
        assert (actor.version, actor.resets) == (-1, 1)  # holds no parameters yet
        returns: list[float] = []
        lengths: list[int] = []
        for _ in range(2):
            for _ in range(30):
                chunk = actor.collect(10)
                returns += chunk.episode_returns
                lengths += chunk.episode_lengths
            actor.reset_envs()
        assert actor.resets == 3
        assert len(lengths) >= 20 and returns == [float(n) for n in lengths]
        assert all(n >= 8 for n in lengths)  # no CartPole episode is shorter
    finally:
        actor.close()


@dataclass
class _Chunk:
    env_steps: int
    times: dict[str, float] = field(default_factory=dict)


@dataclass
class _CountingActor:
    """Collects chunks of 4 env steps and notes the version it asked for at each pull."""

    version: int = -1
    asked: list[int] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)

    def set_params(self, snapshot: ParamSnapshot) -> None:
        self.version = snapshot.version

    def collect(self, vector_steps: int) -> _Chunk:
        return _Chunk(4)


def test_actor_loop_pulls_once_sync_every_env_steps_passed_and_after_pull_next() -> None:
    actor = _CountingActor()
    loop = ActorLoop(actor, 1, sync_every=9)  # type: ignore[arg-type]

    def fetch(version: int) -> ParamSnapshot:
        actor.asked.append(version)
        return ParamSnapshot(len(actor.asked) + 5, {})

    for _ in range(7):  # pulls before chunks 1, 4 (12 >= 9 steps since) and 7
        loop.step(fetch)
    assert actor.asked == [-1, 6, 7]
    loop.pull_next()
    loop.step(fetch)
    assert actor.asked == [-1, 6, 7, 8]


def test_gradient_step_asks_for_parameters_newer_than_the_workers() -> None:
    worker = _gorila_worker()
    asked: list[int] = []

    def fetch(version: int) -> None:
        asked.append(version)

    try:
        worker.pulled(ParamSnapshot.of(worker.model, 4))
        gradient_step(worker, fetch, sync_every=1)
        assert asked == [4]
    finally:
        worker.close()


def test_a_snapshot_is_a_copy_not_a_view_of_the_live_model() -> None:
    net = nn.Linear(3, 2)
    snap = ParamSnapshot.of(net, 1)
    before = {k: v.clone() for k, v in snap.params.items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    assert all(torch.equal(snap.params[k], before[k]) for k in before)
    assert all(v.device.type == "cpu" for v in snap.params.values())


def test_device_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    for available, auto in [(False, "cpu"), (True, "cuda")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        assert pick_device("auto") == torch.device(auto)
        assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cuda")  # available (patched) above
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"learner\.device = 'cuda': torch sees no CUDA "
                       r"device on this machine; allowed here: 'auto', 'cpu'"):
        pick_device("cuda")


def _ring(capacity: int = 64) -> RingStorage:
    return RingStorage(capacity, (3,), np.dtype(np.float32))


def _rows(n: int) -> Transitions:
    obs_NO = np.arange(3 * n, dtype=np.float32).reshape(n, 3)
    return Transitions(obs_NO, np.arange(n) % 2, np.ones(n, np.float32),
                       np.full(n, 0.99, np.float32), obs_NO + 1)


def test_a_batch_moves_to_another_device_and_stays_zero_copy_on_cpu() -> None:
    replay = UniformReplay(_ring(), np.random.default_rng(0))
    replay.add(_rows(16))
    batch = replay.sample(8)
    on_cpu = to_torch(batch, torch.device("cpu"))
    assert on_cpu.obs_BO.data_ptr() == batch.data.obs_NO.ctypes.data
    on_meta = to_torch(batch, torch.device("meta"))
    assert on_meta.obs_BO.device.type == "meta" and on_meta.reward_B.device.type == "meta"


def test_replays_say_why_they_cannot_do_what_was_asked() -> None:
    with pytest.raises(RuntimeError, match=r"^cannot sample from an empty replay$"):
        UniformReplay(_ring(), np.random.default_rng(0)).sample(2)
    with pytest.raises(RuntimeError, match=r"^cannot sample from an empty replay$"):
        PrioritizedReplay(_ring(), np.random.default_rng(0)).sample(2)
    queue = RolloutQueue(64, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"^queue holds 0 rows, 4 asked$"):
        queue.sample(4)
    with pytest.raises(TypeError, match=r"^a rollout queue has no priorities$"):
        queue.update_priorities(np.zeros(1, np.int64), np.zeros(1))
    with pytest.raises(ValueError, match=r"^obs_shape \(3,\) is not a stack of frames"):
        FrameStorage(8, (3,), np.dtype(np.uint8))
    tree = SumMinTree(4)
    with pytest.raises(ValueError, match=r"^capacity must be >= 1, got 0$"):
        SumMinTree(0)
    with pytest.raises(IndexError, match=r"^slot out of range \[0, 4\)$"):
        tree.update(np.array([4]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"^priorities must be finite and >= 0$"):
        tree.update(np.array([0]), np.array([-1.0]))
    with pytest.raises(ValueError, match=r"^expected 4 priorities, got shape \(3,\)$"):
        tree.set_all(np.ones(3))
    with pytest.raises(RuntimeError, match=r"^cannot sample: every priority is zero$"):
        tree.sample(2, np.random.default_rng(0))


def test_sampled_priorities_are_the_tree_s_own() -> None:
    tree = SumMinTree(1000, top=8, min_top=16)
    rng = np.random.default_rng(0)
    tree.update(np.arange(1000), rng.random(1000) + 0.5)
    idx_B, prio_B = tree.sample(64, rng)
    assert np.array_equal(prio_B, tree.get(idx_B))


def _gorila_worker(*extra: str, shared: bool = False) -> GradientWorker:
    cfg = qfleet.load_config("cartpole-gorila-sync", ["env.num_envs=1", "net.hidden=[8]",
                                                      "learner.batch_size=8",
                                                      "runtime.backend='inline'",
                                                      "log.progress=false", *extra])
    program = gradient_program(cfg)
    replay = program.make_shared_replay() if shared and program.make_shared_replay else None
    return program.make_worker(0, 0, replay)


def test_a_worker_checkpoints_its_own_replay_and_never_a_shared_one() -> None:
    own, twin = _gorila_worker(), _gorila_worker()
    shared = _gorila_worker("replay.scope='shared'", shared=True)
    try:
        for worker in (own, shared):
            for _ in range(5):
                worker.work()
        state = own.replay_state()
        assert int(state["worker.collected"][0]) == own.collected > 0
        twin.load_replay_state(state)
        assert twin.collected == own.collected
        assert twin.replay is not None and own.replay is not None
        assert len(twin.replay) == len(own.replay) > 0
        assert shared.replay is not None and len(shared.replay) > 0
        assert shared.replay_state() == {}
        before = (len(shared.replay), shared.collected)
        shared.load_replay_state(state)  # a shared replay is the global side's to restore
        assert (len(shared.replay), shared.collected) == before
    finally:
        for worker in (own, twin, shared):
            worker.close()


def test_sums_are_rebuilt_exactly_every_rebuild_every_updates() -> None:
    """Incremental updates leave rounding residue in the inner sums; every
    ``rebuild_every`` updates the levels are recomputed from the leaves."""
    tree = SumMinTree(1024, top=2)
    assert tree.rebuild_every == 4
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(8):
        tree.update(rng.integers(0, 1024, 16), rng.random(16) * 1e3)
        counts.append(tree._updates_since_rebuild)
    assert counts == [1, 2, 3, 0, 1, 2, 3, 0]
    level = tree.sum_T[1024:2048].reshape(-1, 2).sum(axis=1)  # rebuilt just now: exact
    assert np.array_equal(tree.sum_T[512:1024], level)


def test_an_unsorted_pair_with_a_slot_past_capacity_is_refused() -> None:
    tree = SumMinTree(5)  # leaves padded to 8: slot 5 would land in the padding silently
    with pytest.raises(IndexError, match=r"^slot out of range \[0, 5\)$"):
        tree.update(np.array([5, 0]), np.array([1.0, 1.0]))


def test_uniform_draws_reach_every_slot_including_the_first() -> None:
    ring = _ring(8)
    ring.add(_rows(3))
    assert set(ring.uniform_slots(np.random.default_rng(0), 300).tolist()) == {0, 1, 2}


def test_a_field_normalizes_its_dtype_and_shape() -> None:
    from qfleet.replay.records import Field, row_bytes

    f = Field("float32", [2, 3])  # type: ignore[arg-type]
    assert f.dtype == np.dtype(np.float32) and isinstance(f.dtype, np.dtype)
    assert f.shape == (2, 3) and isinstance(f.shape, tuple)
    assert row_bytes({"a": f, "b": Field(np.dtype(np.int64))}) == 24 + 8


def test_beta_schedule_state_round_trips_with_and_without_progress() -> None:
    from qfleet.replay.prioritized import BetaSchedule

    for progress in (None, 0.25):
        saved = BetaSchedule(0.4, 100)
        if progress is not None:
            saved.set_progress(progress)
        loaded = BetaSchedule(0.4, 100)
        loaded.set_progress(0.9)
        loaded.load(saved.state())
        assert loaded.progress == progress
        assert loaded.beta(50) == saved.beta(50)


def test_a_restored_rollout_queue_is_empty_and_fills_again() -> None:
    queue = RolloutQueue(64, np.random.default_rng(0))
    queue.add(_rows(6))
    queue.load_state_dict(queue.state_dict())
    assert len(queue) == 0
    queue.add(_rows(4))
    assert len(queue) == 4 and len(queue.sample(4)) == 4
