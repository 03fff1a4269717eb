"""Gradient schemes (issue 6) on the processes backend, with real worker processes: async
staleness, groups, Hogwild A3C, shared and sharded replay, the A3C queue variant, faults and
Ctrl-C (agreement with inline is in test_agreement). Every runner is closed, also on failure, and no
worker process may outlive it; every wait is bounded by a deadline."""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _runners import closing, gradient_program, run_until, workers_gone

import qfleet
from qfleet import checkpoint
from qfleet.algos import ActorLearnerProgram, build_program
from qfleet.config import Config
from qfleet.experiment import Result, resume
from qfleet.metrics import read_metrics
from qfleet.replay import PrioritizedReplay, ShardedReplay
from qfleet.roles.ac_learner import ACLearner
from qfleet.runtime import (
    ProcessesGradientRunner,
    ProcessesRunner,
    RoundReport,
    WorkerError,
)
from qfleet.runtime.shm_replay import Locked

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
         "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
         "log.progress=false", "log.tensorboard=false"]
SMALL_AC = ["env.num_envs=2", "net.hidden=[32]", "log.progress=false", "log.tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(preset: str, *extra: str) -> Config:
    small = SMALL_AC if preset.startswith("cartpole-a") else SMALL
    return qfleet.load_config(preset, [*small, *extra])


def grad_runner(cfg: Config) -> AbstractContextManager[ProcessesGradientRunner]:
    return closing(ProcessesGradientRunner(gradient_program(cfg)), workers_gone)


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


# ---------------------------------------------------------------- sync: processes == inline


# ---------------------------------------------------------------- async and grouped


def test_async_workers_are_groups_of_one_that_step_the_shared_model() -> None:
    """Async on processes: each worker is a group of one (group_reduce) that judges and
    applies its own gradient to the shared-memory model in its turn; the main process only
    counts their reports."""
    cfg = _cfg("cartpole-gorila-async", "algo.max_staleness=100")
    with grad_runner(cfg) as runner:
        assert [team.grads.shape[1] for team in runner.sh.teams] == [1, 1]  # members each
        versions = [runner.updates]

        def done(r: ProcessesGradientRunner, reps: list[RoundReport]) -> bool:
            versions.append(r.updates)  # the shared version; reports come merged, later
            return sum(x.updates for x in reps) >= 60

        reports = run_until(runner, done, 40.0)
        updates = runner.updates
    assert all(b >= a for a, b in itertools.pairwise(versions))
    applied = sum(r.grads_applied for r in reports)
    staleness = sum(r.staleness_sum for r in reports)
    assert applied == sum(r.updates for r in reports) >= 60  # async: one per gradient
    assert sum(r.grads_dropped for r in reports) == 0
    # With sync_every = 1 a worker copies the model in the turn it steps, so a gradient's
    # staleness is the steps the other worker took while it was computed: some, as both
    # compute at once, and each of those steps falls in one window of the other worker's
    # (a worker's windows do not overlap), so never more than all steps taken. A worker
    # that did not pull would count every step since its last copy, again and again.
    assert 0 < staleness <= updates, (staleness, updates)
    assert {w for r in reports for w in r.steps_by_actor} == {0, 1}
    assert sum(r.loss_count for r in reports) == applied


def test_step_returns_promptly_so_the_loop_can_log_eval_and_stop() -> None:
    """``step()`` is one round of the experiment loop, which logs, evaluates, checkpoints
    and honours Ctrl-C between rounds. Hogwild workers never wait for the main process,
    so when it is slower than their reports come in the stream never runs dry, and a step
    that drained "until the queue is empty" never ended (seen under load with the first
    version of the async runner: single step() calls of 17-73 s). Here the main process
    is made the bottleneck on purpose (each report costs it 20 ms more), so the test does
    not depend on the machine's load; the drain is bounded by ROUND_S."""
    cfg = _cfg("cartpole-a3c", "actors.count=4")

    def too_long(signum: int, frame: object) -> None:
        raise AssertionError("one step() ran for more than 5 s")

    with grad_runner(cfg) as runner:
        real_receive = runner.receive

        def slow_receive(*args: Any) -> None:
            time.sleep(0.02)
            real_receive(*args)

        runner.receive = slow_receive  # type: ignore[method-assign]
        old = signal.signal(signal.SIGALRM, too_long)
        try:
            for _ in range(20):
                signal.setitimer(signal.ITIMER_REAL, 5.0)
                runner.step()
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert runner.updates > 0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def test_async_drops_gradients_staler_than_max_staleness() -> None:
    """With max_staleness 0 every gradient computed while the other worker stepped is
    dropped: two workers computing at once produce such gradients."""
    cfg = _cfg("cartpole-gorila-async", "algo.max_staleness=0", "algo.stale='drop'")
    with grad_runner(cfg) as runner:
        reports = run_until(runner, lambda r, reps: r.updates >= 20 and sum(
            x.grads_dropped for x in reps) > 0, 40.0)
    assert sum(r.staleness_sum for r in reports) == 0  # only fresh gradients were applied
    assert sum(r.grads_applied for r in reports) == sum(r.updates for r in reports)


def test_grouped_groups_reduce_among_themselves_and_step_the_shared_model() -> None:
    """Four workers in two groups: no gradient goes through the main process (its gate
    never takes one); each group's step averages its two members' gradients and lands in
    the shared model, whose version the main process reads."""
    cfg = _cfg("cartpole-batchsync", "actors.count=4", "algo.group_size=2",
               "algo.max_staleness=100")
    with grad_runner(cfg) as runner:
        assert [team.grads.shape[1] for team in runner.sh.teams] == [2, 2]
        start = _flat(runner.aggregator.online)
        reports = run_until(runner, lambda _, reps: sum(x.updates for x in reps) >= 30, 40.0)
        assert not torch.equal(start, _flat(runner.aggregator.online))
        version = runner.updates
        assert runner.gate.applied == runner.gate.dropped == 0 and not runner.gate.pending
    updates = sum(r.updates for r in reports)
    assert 30 <= updates <= version
    assert sum(r.grads_applied for r in reports) == 2 * updates  # both members, every step
    assert sum(r.grads_dropped for r in reports) == 0
    # every member's loss: the one that stepped reports it with the step, the other's
    # report of that round may still be in its outbox (merged every 20 ms)
    assert updates < sum(r.loss_count for r in reports) <= 2 * version
    assert {w for r in reports for w in r.steps_by_actor} == {0, 1, 2, 3}
    # The groups step asynchronously, so one group's gradients are overtaken by the
    # other's steps. A member copies the model in its turn right after its group's step
    # and computes on it until the next one (sync_every 1): each step of the other group
    # falls inside at most one such window of each of the 2 members.
    staleness = sum(r.staleness_sum for r in reports)
    assert 0 < staleness <= 2 * updates, (staleness, updates)


def test_a_grouped_checkpoint_mid_run_has_every_workers_replay_and_the_run_goes_on() -> None:
    """The replays are fetched before the model is copied between turns: a worker waiting
    for its turn cannot answer (the first version waited 120 s for them and failed)."""
    cfg = _cfg("cartpole-batchsync", "actors.count=4", "algo.group_size=2")
    with grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 10, 40.0)
        t0 = time.monotonic()
        tensors, meta, replay = runner.state(with_replay=True)
        assert time.monotonic() - t0 < 10.0
        assert all(checkpoint.with_prefix(replay, f"worker{i}.") for i in range(4))
        assert meta["updates"] >= 10 and any(k.startswith("online.") for k in tensors)
        version = runner.updates
        run_until(runner, lambda r, _: r.updates >= version + 10, 40.0)


def test_an_evaluation_of_a_shared_model_sees_one_policy() -> None:
    """Grouped workers step the shared model on their own: the net an evaluation gets is
    a copy, which their later steps do not move; once frozen, the model itself."""
    cfg = _cfg("cartpole-batchsync", "actors.count=4", "algo.group_size=2")
    with grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 5, 40.0)
        net = runner.policy_net
        held = _flat(net)
        assert net is not runner.aggregator.online
        version = runner.updates
        run_until(runner, lambda r, _: r.updates >= version + 10, 40.0)
        assert torch.equal(_flat(net), held)
        assert not torch.equal(_flat(runner.aggregator.online), held)
        runner.freeze()
        assert runner.policy_net is runner.aggregator.online


def _teams_spent(runner: ProcessesGradientRunner) -> bool:
    return all(team.spent([True, True]) for team in runner.sh.teams)


def _hogwild_spent(runner: ProcessesGradientRunner) -> bool:
    return all(runner.sh.spent_W.tolist()) and all(w.process.is_alive() for w in runner.workers)


@pytest.mark.parametrize(("preset", "sets", "budget", "slack", "spent"), [
    # at most a round or two (4 steps x 1 env) of each of 4 workers beyond
    ("cartpole-batchsync", ("actors.count=4", "algo.group_size=2"), 1500, 4 * 4 * 2,
     _teams_spent),
    # at most one work() (5 steps x 2 envs) of each of 3 workers beyond
    ("cartpole-a3c", ("actors.count=3",), 3000, 3 * 5 * 2, _hogwild_spent)],
    ids=["grouped", "hogwild"])
def test_workers_stop_by_themselves_at_the_runs_budget_even_after_a_kill(
        preset: str, sets: tuple[str, ...], budget: int, slack: int,
        spent: Callable[[ProcessesGradientRunner], bool]) -> None:
    """No main process paces workers that step a shared model: each counts its env
    steps in a shared counter and stops once the run's are at train.total_env_steps. A
    worker killed with reports it never sent does not keep the main process's count
    short of the budget."""
    cfg = _cfg(preset, *sets, f"train.total_env_steps={budget}")
    with grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.env_steps >= budget // 3, 30.0)
        victim = runner.workers[-1].process
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        run_until(runner, lambda r, _: r.env_steps >= budget, 30.0)
        run_until(runner, lambda r, _: spent(r), 10.0)
        runner.step()  # the first round that sees them all spent counts what they sent
        updates, steps, taken = runner.updates, runner.env_steps, runner.sh.taken.value
        for _ in range(5):  # nothing moves any more
            runner.step()
        assert (runner.updates, runner.env_steps, runner.sh.taken.value) == (
            updates, steps, taken)
        assert steps == taken  # every step counted once
        assert budget <= steps <= budget + slack
        runner.freeze()  # the final drain finds nothing more to count
        assert runner.env_steps == steps


def test_grouped_drops_gradients_staler_than_max_staleness() -> None:
    """The async rule between groups, judged by the member that steps: with max_staleness
    0 a group's gradients overtaken by the other group's step are dropped."""
    cfg = _cfg("cartpole-batchsync", "actors.count=4", "algo.group_size=2",
               "algo.max_staleness=0", "algo.stale='drop'")
    with grad_runner(cfg) as runner:
        reports = run_until(runner, lambda _, reps: sum(x.updates for x in reps) >= 20 and
                            sum(x.grads_dropped for x in reps) > 0, 40.0)
    assert sum(r.staleness_sum for r in reports) == 0  # only fresh gradients were applied
    assert sum(r.grads_applied for r in reports) <= 2 * sum(r.updates for r in reports)


@pytest.mark.parametrize("on_loss", ["proceed", "wait"])
def test_a_killed_grouped_worker_is_replaced_and_rejoins_its_group(on_loss: str) -> None:
    """A member killed mid-run: its group goes on alone (proceed) or waits (wait) while
    the other group never waits; the replacement refills and takes part again."""
    cfg = _cfg("cartpole-batchsync", "actors.count=4", "algo.group_size=2",
               "algo.max_staleness=100", f"algo.on_worker_loss='{on_loss}'",
               "learner.learning_starts=1000")
    with grad_runner(cfg) as runner:
        reports = _kill_first_worker_until_it_rejoins(runner)
        more = run_until(runner, lambda _, reps: sum(x.updates for x in reps) >= 30, 30.0)
    assert sum(r.grads_applied for r in more) == 2 * sum(r.updates for r in more)
    assert {w for r in more for w in r.steps_by_actor} == {0, 1, 2, 3}
    solo = sum(2 * r.updates - r.grads_applied for r in reports)  # one-gradient steps
    if on_loss == "proceed":  # worker 1 went on alone while the replacement refilled
        assert solo > 0
    else:  # group 0 waited for the replacement; group 1 never waits for group 0
        assert solo == 0
    assert sum(r.updates for r in reports) >= 10  # (group 1 alone through the refill)


def test_a_killed_async_worker_is_replaced_and_steps_the_model_again() -> None:
    """A group of one has no member left to answer its replacement: the main process
    tells it the round to start at, and it steps the shared model again; the other
    worker never waits for it."""
    cfg = _cfg("cartpole-gorila-async", "algo.max_staleness=100",
               "learner.learning_starts=1000")
    with grad_runner(cfg) as runner:
        reports = _kill_first_worker_until_it_rejoins(runner)
        more = run_until(runner, lambda _, reps: sum(x.updates for x in reps) >= 30 and all(
            any(x.steps_by_actor.get(w) for x in reps) for w in (0, 1)), 30.0)
    assert sum(r.updates for r in reports) >= 10  # worker 1 alone through the refill
    assert sum(r.grads_applied for r in more) == sum(r.updates for r in more)


def _kill_first_worker_until_it_rejoins(runner: ProcessesGradientRunner
                                        ) -> list[RoundReport]:
    """_kill_first_worker, then the reports until its group stepped 5 rounds with the
    replacement in it."""
    reports = _kill_first_worker(runner)
    assert runner.workers[0].incarnation == 1
    team = runner.sh.teams[0]

    def rejoined(r: ProcessesGradientRunner, _: list[RoundReport]) -> bool:
        first = int(team.start_round[0])  # the round the replacement was told to start at
        return first >= 0 and team.applied.value >= first + 5

    return reports + run_until(runner, rejoined, 60.0)


def _kill_first_worker(runner: ProcessesGradientRunner) -> list[RoundReport]:
    """After 10 global updates, SIGKILL worker 0; the reports until its restart (within
    5 s)."""
    run_until(runner, lambda r, _: r.updates >= 10, 30.0)
    victim = runner.workers[0].process
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    reports = run_until(runner, lambda _, reps: any(x.actor_restarts for x in reps), 10.0)
    assert time.monotonic() - t0 < 5.0
    return reports


# ---------------------------------------------------------------- Hogwild A3C


def test_hogwild_a3c_workers_move_the_shared_global_model() -> None:
    cfg = _cfg("cartpole-a3c")
    with grad_runner(cfg) as runner:
        assert runner.program.hogwild
        start = _flat(runner.aggregator.online)
        seen = [runner.updates]
        reports = []
        deadline = time.monotonic() + 40
        # 60 steps take a worker ~0.3 s: the second may still be starting
        while runner.updates < 60 or len({w for r in reports for w in r.steps_by_actor}) < 2:
            assert time.monotonic() < deadline
            reports.append(runner.step())
            seen.append(runner.updates)  # the shared counter, as the main process sees it
        moved = _flat(runner.aggregator.online)
    assert not torch.equal(start, moved), "the workers' steps must reach the shared model"
    assert all(b >= a for a, b in itertools.pairwise(seen))
    assert seen[-1] >= 60 and len(set(seen)) >= 2, "the main process sees the version move"
    reported = sum(r.updates for r in reports)
    assert 0 < reported <= seen[-1]
    # A Hogwild worker copies the shared model before each gradient (sync_every = 1) and
    # applies it itself: its staleness counts the other worker's applies in between, and
    # each apply falls inside at most one window of the other worker.
    staleness = [r.staleness_sum for r in reports]
    assert all(s >= 0 for s in staleness) and sum(staleness) <= seen[-1], staleness
    assert {w for r in reports for w in r.steps_by_actor} == {0, 1}


# ---------------------------------------------------------------- shared and sharded replay


def test_shared_replay_fills_from_both_workers() -> None:
    cfg = _cfg("cartpole-gorila-sync", "replay.scope='shared'")
    with grad_runner(cfg) as runner:
        replay = runner.shared_replay
        assert replay is not None and not replay.prioritized
        reports = run_until(runner, lambda r, _: r.updates >= 15, 40.0)
        size, steps = len(replay), runner.env_steps
    # every env step of both workers became one transition (n_step 1) in the one replay
    assert size >= steps > 0
    by_worker = {w: sum(r.steps_by_actor.get(w, 0) for r in reports) for w in (0, 1)}
    assert all(v > 0 for v in by_worker.values()), by_worker
    assert size <= steps + 2 * 2 * cfg.actors.chunk_size  # at most a chunk or two in flight


def test_shared_prioritized_replay_gets_priorities_written_back() -> None:
    cfg = _cfg("cartpole-gorila-sync", "replay.scope='shared'", "replay.kind='prioritized'")
    with grad_runner(cfg) as runner:
        assert isinstance(runner.shared_replay, Locked)  # one replay: one lock
        replay = runner.shared_replay.replay
        assert isinstance(replay, PrioritizedReplay)
        run_until(runner, lambda r, _: r.updates >= 30, 40.0)
        prio = replay.tree.priorities_N[: len(replay)].copy()
    assert np.all(np.isfinite(prio)) and np.all(prio > 0)
    assert len(np.unique(prio)) > 10, "workers' TD errors must reach the shared replay"


def test_sharded_replay_every_worker_owns_a_shard_and_priorities_come_back() -> None:
    cfg = _cfg("cartpole-dper")
    with grad_runner(cfg) as runner:
        replay = runner.shared_replay
        assert isinstance(replay, ShardedReplay)
        run_until(runner, lambda r, _: r.updates >= 30, 40.0)
        shards = {k: len(s) for k, s in replay.shards.items()}
        prio = {k: s.tree.priorities_N[: len(s)].copy() for k, s in replay.shards.items()}
        max_priority = max(s.max_priority for s in replay.shards.values())
    assert sorted(shards) == [0, 1] and all(n > 0 for n in shards.values()), shards
    # each worker writes its own shard: they fill at the same pace
    assert abs(shards[0] - shards[1]) <= 2 * cfg.actors.chunk_size * cfg.env.num_envs
    for key, p in prio.items():
        assert np.all(np.isfinite(p)) and np.all(p > 0), key
        below_max = p < max_priority - 1e-6
        assert below_max.sum() > 10, f"shard {key}: priorities never written back"
        assert len(np.unique(p)) > 10, key


# ---------------------------------------------------------------- A3C, queue variant


def test_a3c_queue_with_two_trainer_threads_runs_and_updates() -> None:
    cfg = _cfg("cartpole-a3c-queue", "algo.trainers=2")
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    with closing(ProcessesRunner(program), workers_gone) as runner:
        learner = runner.learner
        assert isinstance(learner, ACLearner) and learner.pool is not None
        start = _flat(learner.online)
        reports = run_until(runner, lambda r, _: r.learner.version >= 40, 40.0)
        assert not torch.equal(start, _flat(learner.online))
        assert sum(r.updates for r in reports) == learner.version
        assert {w for r in reports for w in r.steps_by_actor} == {0, 1}
        # on-policy: rows leave the queue once trained on, so it never grows without bound
        assert len(runner.replay) <= cfg.replay.capacity


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize("on_loss", ["proceed", "wait"])
def test_killed_sync_worker_is_restarted_and_updates_go_on(on_loss: str) -> None:
    # A refill long enough (1000 env steps) that, in proceed mode, worker 1 surely steps
    # alone before the replacement's first gradient: with a short one that is a race.
    cfg = _cfg("cartpole-gorila-sync", f"algo.on_worker_loss='{on_loss}'",
               "learner.learning_starts=1000")
    with grad_runner(cfg) as runner:
        victim = runner.workers[0].process
        reports = _kill_first_worker(runner)
        assert sum(r.actor_restarts for r in reports) == 1
        assert any("SIGKILL" in note for r in reports for note in r.notes)
        assert runner.workers[0].incarnation == 1 and runner.workers[0].process.is_alive()
        assert not victim.is_alive()
        before = runner.updates
        # the global model goes on, and the replacement (after refilling its local replay)
        # sends gradients again and takes part in the sync steps
        later = run_until(runner, lambda r, reps: r.updates >= before + 20 and any(
            x.steps_by_actor.get(0) for x in reps) and 0 in runner.live, 30.0)
        joined_at = runner.updates
        more = run_until(runner, lambda r, _: r.updates >= joined_at + 20, 30.0)
        assert sum(r.updates for r in later + more) == runner.updates - before
    # steps that averaged both workers again, once the replacement had joined
    assert sum(r.grads_applied for r in more) > sum(r.updates for r in more)
    assert {w for r in more for w in r.steps_by_actor} == {0, 1}
    solo = sum(2 * r.updates - r.grads_applied for r in reports + later)  # one-gradient steps
    if on_loss == "proceed":  # worker 1 went on alone while the replacement refilled
        assert solo > 0
    else:  # every step waited for both workers (the lost one's last gradient, or the new)
        assert solo == 0


def test_a_replacement_workers_first_sync_gradient_is_computed_on_fresh_parameters() -> None:
    """Sync, sync_every 1: every gradient is computed on the newest global model, so none
    is ever stale, also a replacement's first one. A worker refilling its replay sends no
    gradient; if it did not pull before its first one it would compute on the parameters
    it started with, many versions behind after worker 1 went on alone (proceed; measured
    staleness 5-6 before the fix). And a first gradient computed while worker 1 stepped
    alone is sent back to be computed again, not averaged in."""
    cfg = _cfg("cartpole-gorila-sync", "algo.on_worker_loss='proceed'")
    with grad_runner(cfg) as runner:
        run_until(runner, lambda r, _: r.updates >= 10, 30.0)
        victim = runner.workers[0].process
        assert victim.pid is not None
        os.kill(victim.pid, signal.SIGKILL)
        reports = run_until(runner, lambda r, reps: any(x.actor_restarts for x in reps) and
                             0 in r.live, 30.0)
        reports += run_until(runner, lambda r, _: r.updates >= 60, 30.0)
    assert sum(r.grads_dropped for r in reports) == 0
    assert sum(r.staleness_sum for r in reports) == 0


def test_worker_exception_stops_the_run_with_its_traceback() -> None:
    cfg = _cfg("cartpole-gorila-sync", "env.id='faulty_envs:ExplodingEnv'")
    with grad_runner(cfg) as runner, pytest.raises(WorkerError) as err:
        run_until(runner, lambda *_: False, 20.0)
    message = str(err.value)
    assert "boom from inside the env" in message
    assert "Traceback" in message and "faulty_envs.py" in message
    assert "worker 0" in message or "worker 1" in message


# ---------------------------------------------------------------- Ctrl-C and resume


def test_ctrl_c_checkpoints_and_resume_continues(
        spawn_cli: Callable[..., subprocess.Popen[str]], run_cli: Callable[..., Any],
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = [*SMALL, "train.total_env_steps=10000000", "log.every=200", "train.eval_every=0",
            "checkpoint.every=0"]
    proc = spawn_cli("train", "cartpole-gorila-sync", "--run-dir", str(run_dir), sets=sets)
    deadline = time.monotonic() + 60
    metrics = run_dir / "metrics.jsonl"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 2:
        assert proc.poll() is None, (tmp_path / "proc.stderr").read_text()
        assert time.monotonic() < deadline, "no metrics in time"
        time.sleep(0.2)
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) >= 2
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, (tmp_path / "proc.stderr").read_text()
    assert "Traceback" not in (tmp_path / "proc.stderr").read_text()
    train_lines = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    sync_lines = [r for r in train_lines if "staleness" in r]
    assert sync_lines and all(r["staleness"] == 0 for r in sync_lines)  # sync: never stale
    for pid in children:  # every worker is gone (or a zombie awaiting its reaper)
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()

    ckpt = checkpoint.find(run_dir)
    tensors, meta, _ = checkpoint.load(ckpt)
    assert meta["env_steps"] > 0 and meta["updates"] > 0
    assert any(k.startswith("online.") for k in tensors)
    assert any(k.startswith("target.") for k in tensors)
    assert all(p.suffix in (".safetensors", ".json") for p in ckpt.iterdir())
    lines_before = read_metrics(run_dir)

    target = meta["env_steps"] + 600
    done = run_cli("resume", str(run_dir), sets=[f"train.total_env_steps={target}"],
                   timeout=120)
    assert done.returncode == 0, done.stderr
    result = Result(**json.loads((run_dir / "result.json").read_text()))
    assert target <= result.env_steps < target + 2 * 4 * 2
    assert result.updates > meta["updates"]
    lines = read_metrics(run_dir)
    assert lines[:len(lines_before)] == lines_before
    new = [r for r in lines[len(lines_before):] if r["event"] == "train"]
    assert new and min(r["env_steps"] for r in new) > meta["env_steps"]
    assert min(r["updates"] for r in new) >= meta["updates"]


@pytest.mark.parametrize("preset", ["cartpole-a3c", "cartpole-dper", "cartpole-batchsync"])
def test_resume_on_processes_restores_the_global_side(preset: str, tmp_path: Path) -> None:
    """Hogwild, the sharded replay of the main process (saved with checkpoint.replay) and
    grouped groups stepping a shared model all carry on from a checkpoint: counters,
    metrics and the model move on (the restored optimizer state itself is compared in the
    Hogwild restore test below and in test_aggregator_math)."""
    run_dir = tmp_path / "run"
    common = ["train.eval_every=0", "train.eval_episodes=2", "log.every=500",
              "checkpoint.replay=true"]
    if preset == "cartpole-batchsync":  # two groups of two
        common += ["actors.count=4", "algo.group_size=2", "learner.learning_starts=100"]
    first = qfleet.train(_cfg(preset, *common, "train.total_env_steps=2000"), run_dir)
    tensors, meta, replay = checkpoint.load(checkpoint.find(run_dir))
    assert meta["updates"] > 0 and meta["env_steps"] == first.env_steps
    assert (preset != "cartpole-a3c") == bool(replay)  # shards, or each worker's own
    old = read_metrics(run_dir)
    old_train = [r for r in old if r["event"] == "train"]

    result = resume(run_dir, _cfg(preset, *common, "train.total_env_steps=4000"))
    assert 4000 <= result.env_steps < 4000 + 64
    assert result.updates > meta["updates"] + 50
    new = [r for r in read_metrics(run_dir)[len(old):] if r["event"] == "train"]
    assert new and min(r["updates"] for r in new) >= meta["updates"]
    assert min(r["env_steps"] for r in new) > first.env_steps
    if preset == "cartpole-dper":  # the restored shards were not emptied
        assert new[0]["replay_size"] >= old_train[-1]["replay_size"] > 0
    # the final global model differs from the one the run was resumed from
    final, _, _ = checkpoint.load(checkpoint.find(run_dir))
    key = next(k for k in tensors if k.startswith("online."))
    assert not torch.equal(final[key], tensors[key])


def test_hogwild_restore_puts_the_saved_model_and_optimizer_state_in_shared_memory(
        tmp_path: Path) -> None:
    """A3C Hogwild on processes: a checkpoint restored into a new runner gives the shared
    global model and the shared RMSprop state tensor-equal to the saved ones, and the same
    next step on the same gradient. The new runner's workers first sleep in their env's
    reset (SlowStartCartPole), so nothing moves the shared state while it is compared."""
    cfg = _cfg("cartpole-a3c")
    with grad_runner(cfg) as first:
        run_until(first, lambda r, _: r.updates >= 20, 40.0)
        first.freeze()  # the workers stop writing the shared model
        tensors, meta, replay = first.state(with_replay=False)
        saved_opt = copy.deepcopy(first.aggregator.opt.state_dict())
        path = checkpoint.save(tmp_path / "ckpt", first.env_steps, tensors, meta, replay)
        slow = _cfg("cartpole-a3c", "env.id='faulty_envs:SlowStartCartPole'")
        with grad_runner(slow) as second:
            second.restore(*checkpoint.load(path))
            agg = second.aggregator
            assert agg.version == first.updates
            for key, value in first.aggregator.model.state_dict().items():
                assert torch.equal(agg.model.state_dict()[key], value), key
                assert agg.model.state_dict()[key].is_shared(), key
            restored = agg.opt.state_dict()["state"]
            assert restored.keys() == saved_opt["state"].keys() and restored
            for pid, values in saved_opt["state"].items():
                for name, value in values.items():
                    assert torch.equal(torch.as_tensor(restored[pid][name]),
                                       torch.as_tensor(value)), (pid, name)
                    assert restored[pid][name].is_shared(), (pid, name)
            size = sum(p.numel() for p in agg.params)
            grad_P = torch.linspace(-1.0, 1.0, size)
            first.aggregator.apply([grad_P.clone()], [1.0])
            agg.apply([grad_P.clone()], [1.0])
            assert torch.equal(_flat(agg.online), _flat(first.aggregator.online))


def test_hogwild_final_checkpoint_and_result_describe_the_same_model(tmp_path: Path) -> None:
    """The end of a run evaluates, checkpoints and reports the global model. With Hogwild
    the workers keep applying gradients to the shared model until the runner closes, so
    unless they are stopped first the final eval, the checkpoint (written while workers
    write the parameters: possibly torn) and result.json each see a different model:
    result.updates would exceed the checkpoint's."""
    cfg = _cfg("cartpole-a3c", "train.eval_every=0", "train.eval_episodes=2",
               "train.total_env_steps=2000")
    result = qfleet.train(cfg, tmp_path / "run")
    _, meta, _ = checkpoint.load(checkpoint.find(tmp_path / "run"))
    assert (meta["updates"], meta["env_steps"]) == (result.updates, result.env_steps)
