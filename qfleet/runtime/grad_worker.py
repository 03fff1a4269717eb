"""What runs in a gradient worker process of the processes backend (grad_processes):
its loop, its messages to the main process, its answers to checkpoint requests. A sync
group's member runs allreduce.run_member, an async or grouped worker
group_reduce.run_team_member, a Hogwild worker the loop here."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file as save_numpy

from qfleet.algos.program import GradientProgram
from qfleet.compute import pin_torch
from qfleet.roles import gradient_step
from qfleet.roles.gradients import Aggregator, Gradient, GradientGate, GradientWorker
from qfleet.runtime.allreduce import (
    REPORT_S,
    ReduceGroup,
    Replica,
    load_replica,
    run_member,
    start_path,
)
from qfleet.runtime.group_reduce import Common, Team, TeamMember, run_team_member
from qfleet.runtime.processes import ErrorMsg, leave_signals_to_main
from qfleet.runtime.reports import budget_spent
from qfleet.runtime.shm import Flag, PauseGate, SharedParams, main_alive
from qfleet.runtime.shm_replay import SharedReplay
from qfleet.schedules import follow

LAST = 2


@dataclass(frozen=True)
class GradMsg:
    worker: int
    incarnation: int
    base_version: int
    env_steps: int
    returns: list[float]
    loss: float
    q_mean: float
    epsilon: float | None
    applied_at: int
    rows: int
    lengths: list[int]
    times: dict[str, float]
    groups: list[int]  # sync among workers: gradients in each step reported (else [])
    reports: int
    stale: list[int]
    dropped: int


@dataclass(frozen=True)
class SavedMsg:
    """A worker wrote its own replay for checkpoint request ``request`` to ``path``."""

    worker: int
    incarnation: int
    request: int
    path: str  # its replay's arrays ({} unless asked for)
    replica: str  # a sync group member's replica (allreduce.save_replica), else ""


@dataclass
class Shared:
    """What the main process hands every worker process."""

    program: GradientProgram
    params: SharedParams
    aggregator: Aggregator | None  # Hogwild, async, grouped: the shared-memory global model
    stop: Flag
    replay: SharedReplay | None  # scope shared/sharded: the replay every worker uses
    pause: PauseGate | None  # with a shared model: a checkpoint copies it whole
    save_request: Any  # a counter: when it moves, each worker saves its own replay ...
    save_dir: str  # ... into this folder
    env_steps: Any  # the run's env steps as the main process last counted them (Hogwild
    # workers set their learning rate from it)
    save_replays: Any  # 1: a checkpoint request wants the workers' replays; | LAST: the
    # answer is the worker's last act (it waits to be stopped)
    group: ReduceGroup | None  # sync: the workers reduce among themselves
    teams: list[Team]  # async, grouped: each group's members reduce among themselves
    taken: Any  # with a shared model: the env steps the workers took (group_reduce.Common)
    spent_W: torch.Tensor  # Hogwild: 1 once a worker stopped at the budget, its reports sent


def worker_main(sh: Shared, index: int, incarnation: int, out: Connection,
                 restored: dict[str, np.ndarray], save_request: int, joins: bool) -> None:
    leave_signals_to_main()
    pin_torch(1)
    try:
        replay = None if sh.replay is None else sh.replay.for_worker(index, incarnation)
        worker = sh.program.make_worker(index, incarnation, replay)
        worker.load_state(restored)
        saver = _Saver(sh, worker, incarnation, save_request, out)
        if sh.group is not None:
            _member_main(sh, worker, saver, out, joins)
            worker.close()
            return
        if sh.teams:
            _team_main(sh, worker, saver, out, joins)
            worker.close()
            return
        _hogwild_main(sh, worker, saver, out)
        worker.close()
    except SystemExit:
        pass
    except Exception:
        out.send(ErrorMsg(index, incarnation, traceback.format_exc()))
    finally:
        out.close()


def _member_main(sh: Shared, worker: GradientWorker, saver: _Saver, out: Connection,
                 joins: bool) -> None:
    """A worker of a sync group (allreduce): it starts from the replica the main process
    wrote, or (a replacement) joins the group."""
    assert sh.group is not None
    replica = None if joins else load_replica(start_path(sh.save_dir),
                                              sh.program.make_aggregator())

    def idle(member: Replica | None) -> bool:
        saver(member)
        return not sh.stop.is_set() and main_alive()

    run_member(worker, sh.group, replica, sh.params, sh.save_dir, sh.program.sync_every, idle,
               lambda grad: out.send(_message(worker, grad)), sh.program.make_aggregator,
               sh.program.total_env_steps,
               # with a shared replay, report each round, so the count never trails the
               # replay that a checkpoint saves by more than a round
               0.0 if sh.replay is not None else REPORT_S)


def _team_main(sh: Shared, worker: GradientWorker, saver: _Saver, out: Connection,
               joins: bool) -> None:
    """A member of a batch-synchronous group, or an async worker as a group of one
    (group_reduce)."""
    assert sh.aggregator is not None and sh.pause is not None
    p = sh.program

    def go_on() -> bool:
        saver()
        return not sh.stop.is_set() and main_alive()

    common = Common(sh.aggregator, sh.pause,
                    GradientGate(p.num_workers, p.group_size, p.max_staleness, p.stale),
                    p.sync_every, lambda: int(sh.env_steps.value), sh.taken, p.total_env_steps)
    member = TeamMember(worker, sh.teams[worker.index // p.group_size],
                        worker.index % p.group_size, common, go_on,
                        lambda grad: out.send(_message(worker, grad)))
    run_team_member(member, joins)


class _Saver:
    """Answers the main process's checkpoint requests with this worker's own replay,
    between two work() calls (so the replay is never caught mid-write)."""

    def __init__(self, sh: Shared, worker: GradientWorker, incarnation: int,
                 answered: int, out: Connection) -> None:
        self.sh, self.worker, self.incarnation, self.out = sh, worker, incarnation, out
        self.answered = answered  # the last request before this worker was started

    def __call__(self, replica: Replica | None = None) -> None:
        request = self.sh.save_request.value
        if request == self.answered:
            return
        path = os.path.join(self.sh.save_dir, f"worker{self.worker.index}-{request}")
        asked = self.sh.save_replays.value
        save_numpy(self.worker.replay_state() if asked & 1 else {}, path + ".safetensors")
        if replica is not None:
            replica.save(path + ".replica.safetensors")
        self.out.send(SavedMsg(self.worker.index, self.incarnation, request,
                               path + ".safetensors",
                               "" if replica is None else path + ".replica.safetensors"))
        self.answered = request
        while asked & LAST and not self.sh.stop.is_set() and main_alive():
            time.sleep(0.01)


def _hogwild_main(sh: Shared, worker: GradientWorker, saver: _Saver,
                  out: Connection) -> None:
    """A Hogwild worker: each gradient on a fresh copy of the shared model, applied to
    it lock-free (the pause gate only lets a checkpoint copy it whole), then reported.
    Once the workers' steps reach the budget it says so and waits to be stopped, so the
    run ends within one work() per worker of its budget, every step counted."""
    agg, budget = sh.aggregator, sh.program.total_env_steps
    assert agg is not None
    while not sh.stop.is_set() and main_alive():
        saver()
        if budget_spent(budget, sh.taken.value):
            sh.spent_W[worker.index] = 1  # after its last report
            time.sleep(0.01)
            continue
        grad = gradient_step(worker, lambda version: agg.snapshot(), sh.program.sync_every)
        hogwild_apply(sh, worker.index, grad)
        out.send(_message(worker, grad))


def hogwild_apply(sh: Shared, index: int, grad: Gradient) -> None:
    """Step the shared model with ``grad`` (lock-free), at the learning rate of the run's
    env steps as the main process last counted them, and count its env steps."""
    agg, pause = sh.aggregator, sh.pause
    assert agg is not None and pause is not None
    if grad.grads_P is not None:
        follow(agg, int(sh.env_steps.value))
        with pause.step(index):
            grad.applied_at = agg.apply([grad.grads_P], [1.0])
        grad.grads_P = None
    with agg.lock:  # Hogwild's: it guards the counters only
        sh.taken.value += grad.env_steps


def _message(worker: GradientWorker, grad: Gradient) -> GradMsg:
    return GradMsg(worker.index, worker.actor.incarnation, grad.base_version,
                   grad.env_steps, grad.episode_returns, grad.loss, grad.q_mean, grad.epsilon,
                   grad.applied_at, grad.rows, grad.episode_lengths, grad.times, grad.groups,
                   grad.reports, grad.stale, grad.dropped)
