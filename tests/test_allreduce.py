"""Sync aggregation among worker processes (issue 19): the group's rules in one process
(which gradients a round averages, under deaths, joins and reused buffers), the report
merge, the replica files; then real worker processes whose replicas must stay identical
through kills, also of every worker at once (agreement with inline is in
test_agreement)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from _runners import closing, gradient_program, run_until, workers_gone

import qfleet
from qfleet.algos import build_program
from qfleet.roles.gradients import Aggregator, Gradient
from qfleet.runtime import ProcessesGradientRunner
from qfleet.runtime.allreduce import (
    JOIN_ASK,
    JOIN_DONE,
    MEMBER_FROM,
    Keeper,
    ReduceGroup,
    Replica,
    load_replica,
    save_replica,
)
from qfleet.runtime.reports import merge
from qfleet.runtime.shm import SharedParams

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
         "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
         "log.progress=false", "log.tensorboard=false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _group(workers: int = 3, size: int = 4) -> ReduceGroup:
    return ReduceGroup(workers, size, mp.get_context("fork"), version=0)


def _post(group: ReduceGroup, worker: int, v: int, value: float, rows: int = 8,
          steps: int = 4) -> None:
    grad = Gradient(worker, base_version=v, env_steps=steps, rows=rows,
                    grads_P=torch.full((group.grads.shape[2],), value))
    group.post(worker, v, grad, steps)


def _aggregator() -> Aggregator:
    program = build_program(qfleet.load_config("cartpole-gorila-sync", SMALL))
    return program.make_aggregator()  # type: ignore[union-attr]


# ---------------------------------------------------------------- which gradients a round has

def test_a_round_completes_once_every_member_posted_it_and_averages_them_by_rows() -> None:
    group = _group()
    _post(group, 0, 0, 1.0, rows=8, steps=4)
    _post(group, 2, 0, 3.0, rows=24, steps=6)
    assert group.complete(0) is None  # worker 1 is a member and has not posted
    _post(group, 1, 0, 2.0, rows=16, steps=5)
    assert group.complete(0) == [0, 1, 2]
    grads, weights, steps = group.gradients(0, [0, 1, 2])
    assert [float(g[0]) for g in grads] == [1.0, 2.0, 3.0]
    assert weights == [0.5, 1.0, 1.5]  # rows over the mean rows (16)
    assert steps == 15
    assert group.complete(1) is None  # the next round is nobody's yet


def test_a_dead_members_posted_gradient_counts_and_one_it_never_posted_does_not() -> None:
    """Proceed: the main process takes a dead worker out; what it posted before it died is
    final, so every survivor decides the same set, whenever it looks."""
    group = _group()
    _post(group, 0, 0, 1.0)
    _post(group, 1, 0, 2.0)
    group.marks[MEMBER_FROM, 2] = -1  # worker 2 died before posting round 0
    assert group.complete(0) == [0, 1]
    _post(group, 0, 1, 1.0)
    _post(group, 2, 1, 5.0)  # had it posted round 1 before dying ...
    group.marks[MEMBER_FROM, 1] = -1  # ... and worker 1 died without posting it
    assert group.complete(1) == [0, 2]


def test_a_replacement_posting_the_next_round_is_not_counted_in_this_one() -> None:
    """A slow survivor still deciding round v must not see a replacement's post of v + 1
    (it writes the other buffer and the other mark)."""
    group = _group(workers=2)
    _post(group, 0, 4, 1.0)
    _post(group, 1, 4, 2.0)  # worker 1's last post, then it died
    group.marks[MEMBER_FROM, 1] = -1
    group.marks[MEMBER_FROM, 1] = 5  # its replacement joined from version 5 ...
    _post(group, 1, 5, 9.0)  # ... and posted at once
    assert group.complete(4) == [0, 1]
    assert float(group.gradients(4, [0, 1])[0][1][0]) == 2.0  # the dead one's, not 9.0


def test_a_member_that_joins_from_this_round_is_waited_for() -> None:
    group = _group(workers=2)
    group.marks[MEMBER_FROM, 1] = -1
    _post(group, 0, 3, 1.0)
    assert group.complete(3) == [0]
    group.marks[MEMBER_FROM, 1] = 4
    _post(group, 0, 4, 1.0)
    assert group.complete(4) is None
    _post(group, 1, 4, 2.0)
    assert group.complete(4) == [0, 1]


def test_the_leader_answers_a_join_between_rounds_only_for_a_non_member(
        tmp_path: Path) -> None:
    group = _group(workers=2)
    group.marks[MEMBER_FROM, 1] = -1
    group.marks[JOIN_ASK, 1] = 3  # incarnation 3 asks
    replica = Replica(_aggregator(), env_steps=100)
    replica.agg.version_1.fill_(7)
    group.answer_joins(1, replica, str(tmp_path), between=True)  # not the leader: no
    assert int(group.marks[JOIN_DONE, 1]) == -1
    group.answer_joins(0, replica, str(tmp_path), between=False)  # mid-round: no
    assert int(group.marks[JOIN_DONE, 1]) == -1
    group.answer_joins(0, replica, str(tmp_path), between=True)
    assert int(group.marks[JOIN_DONE, 1]) == 3 and int(group.marks[MEMBER_FROM, 1]) == 7
    joined = load_replica(str(tmp_path / "join-1-3.safetensors"), _aggregator())
    assert joined.version == 7 and joined.env_steps == 100


def test_with_no_member_left_the_main_process_answers_and_clears_the_dead_marks(
        tmp_path: Path) -> None:
    group = _group(workers=2)
    agg = _aggregator()
    params = SharedParams(agg.model, mp.get_context("fork"))
    params.publish(agg.model, 12)
    keeper = Keeper(group, str(tmp_path), wait_for_restart=True)
    _post(group, 1, 12, 5.0)  # worker 1 posted round 12, then both died
    group.marks[JOIN_ASK, 0] = 1
    waiting = keeper.tend([True, False], agg, params, env_steps=50)
    assert int(group.leader.value) == -1
    assert int(group.marks[JOIN_DONE, 0]) == 1
    assert load_replica(str(tmp_path / "join-0-1.safetensors"), _aggregator()).version == 12
    assert waiting == set()  # wait: both stay members
    _post(group, 0, 12, 1.0)
    assert group.complete(12) is None  # the dead one's post of 12 is gone: wait for the new


# ---------------------------------------------------------------- reports and replicas

def test_merged_reports_count_every_step_once_and_losses_only_of_gradients() -> None:
    warmup = Gradient(0, 0, 4, [10.0], epsilon=0.5, episode_lengths=[10], times={"env": 1.0})
    first = Gradient(0, 3, 4, [], loss=2.0, q_mean=1.0, applied_at=4, groups=[2],
                     times={"env": 2.0, "sync": 0.5})
    second = Gradient(0, 4, 4, [20.0], loss=4.0, q_mean=3.0, applied_at=5, groups=[1],
                      episode_lengths=[20])
    held = merge(merge(warmup, first), second)
    assert held.env_steps == 12 and held.episode_returns == [10.0, 20.0]
    assert held.episode_lengths == [10, 20]
    assert held.loss == 6.0 and held.q_mean == 4.0 and held.reports == 2
    assert held.groups == [2, 1] and held.applied_at == 5
    assert held.times == {"env": 3.0, "sync": 0.5}


def test_a_replica_file_restores_the_model_optimizer_and_counters_bit_for_bit(
        tmp_path: Path) -> None:
    agg = _aggregator()
    size = sum(p.numel() for p in agg.params)
    for _ in range(3):
        agg.apply([torch.randn(size), torch.randn(size)], [1.0, 1.0])
    save_replica(str(tmp_path / "r.safetensors"), agg, 77)
    other = load_replica(str(tmp_path / "r.safetensors"), _aggregator())
    assert other.version == 3 and other.env_steps == 77
    for key, value in agg.model.state_dict().items():
        assert torch.equal(value, other.agg.model.state_dict()[key]), key
    grads = [torch.randn(size)]
    agg.apply(grads, [1.0])
    other.agg.apply(grads, [1.0])  # the same optimizer state: the same next step
    for key, value in agg.model.state_dict().items():
        assert torch.equal(value, other.agg.model.state_dict()[key]), key


# ---------------------------------------------------------------- real worker processes

def _replicas(runner: ProcessesGradientRunner) -> dict[int, Replica]:
    """Every live member's replica, as it answers a checkpoint request."""
    saves = runner._saves(False)
    out = {i: load_replica(msg.replica, _aggregator()) for i, msg in saves.items() if msg.replica}
    for msg in saves.values():
        for path in (msg.path, msg.replica):
            if path and os.path.exists(path):
                os.unlink(path)
    return out


def _same(a: Replica, b: Replica) -> bool:
    sa, sb = a.agg.model.state_dict(), b.agg.model.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in sa.items())


@pytest.mark.parametrize("on_loss", ["proceed", "wait"])
def test_replicas_stay_identical_when_every_worker_is_killed_at_once(on_loss: str) -> None:
    """Both workers SIGKILLed mid-run: no member is left to hand its replica over, so the
    main process does (published parameters); the replacements form the group again and
    step in lockstep, and nothing hangs."""
    cfg = qfleet.load_config("cartpole-gorila-sync", [*SMALL, f"algo.on_worker_loss={on_loss}"])
    with closing(ProcessesGradientRunner(gradient_program(cfg)), workers_gone) as runner:
        run_until(runner, lambda r, _: r.updates >= 20, 30.0)
        for w in runner.workers:
            assert w.process.pid is not None
            os.kill(w.process.pid, signal.SIGKILL)
        before = runner.updates
        reports = run_until(runner, lambda r, reps: sum(x.actor_restarts for x in reps) == 2
                            and r.updates >= before + 20 and not r.waiting, 60.0)
        assert {w for r in reports for w in r.steps_by_actor} == {0, 1}
        deadline = time.monotonic() + 30.0
        while True:  # two members answer between rounds: the same version, mostly
            replicas = _replicas(runner)
            assert set(replicas) == {0, 1}
            if replicas[0].version == replicas[1].version:
                break
            assert time.monotonic() < deadline, "replicas never seen at one version"
        assert _same(replicas[0], replicas[1])
        assert replicas[0].version > before


def test_the_group_stops_by_itself_at_the_runs_budget() -> None:
    """No main process paces a sync group: its members stop at the same round once the
    group has counted train.total_env_steps, and say so (the main's own count may miss
    reports a killed worker never sent)."""
    cfg = qfleet.load_config("cartpole-gorila-sync", [*SMALL, "train.total_env_steps=600"])
    with closing(ProcessesGradientRunner(gradient_program(cfg)), workers_gone) as runner:
        run_until(runner, lambda r, _: r.env_steps >= 600, 30.0)
        assert runner.keeper is not None
        run_until(runner, lambda r, _: r.keeper.spent([True, True]), 10.0)
        updates, steps = runner.updates, runner.env_steps
        for _ in range(5):  # nothing moves any more
            runner.step()
        assert (runner.updates, runner.env_steps) == (updates, steps)
        assert steps < 600 + 2 * 2 * 4  # at most one round of both workers beyond


def test_a_checkpoint_of_a_group_sampling_the_main_process_replay_is_prompt() -> None:
    """DPER: members sample the shards the main process serves. A checkpoint asks every
    member for its replica; one blocked on a sample (the main process was evaluating) must
    still be served meanwhile, or it never answers (the 120 s save timeout)."""
    cfg = qfleet.load_config("cartpole-dper", [*SMALL, "replay.capacity=5000"])
    with closing(ProcessesGradientRunner(gradient_program(cfg)), workers_gone) as runner:
        run_until(runner, lambda r, _: r.updates >= 10, 30.0)
        for _ in range(3):
            time.sleep(0.3)  # as an eval in the main process does: members block on a sample
            t0 = time.monotonic()
            tensors, meta, replay = runner.state(True)
            assert time.monotonic() - t0 < 10.0
            assert meta["updates"] >= 10 and replay and "online.torso.body.0.weight" in tensors
            runner.step()
