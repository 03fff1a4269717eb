"""The processes backend for gradient schemes: one worker process per gradient worker
(its side is grad_worker). No scheme has a server in the loop: the workers step the
global model themselves and the main process counts their reports, evaluates and
checkpoints.

Sync (gorila sync, A2C): the workers reduce their gradients among themselves and each
steps its own replica of the global model (allreduce); the main process follows the
parameters the leader publishes for evaluations, and takes the model and optimizer state
from a replica for a checkpoint.

Async and grouped (batch-synchronous groups): the global model and its optimizer state
live in shared memory; each group's members reduce among themselves and one of them
steps the shared model in a turn (group_reduce); between groups the async rule stays.
An async worker is a group of one: it judges and applies its own gradient.

Hogwild (A3C): the global model, the optimizer state and the version counter live in
shared memory; each worker applies its own gradients lock-free and only reports.

Faults: a killed worker is restarted with fresh seeds (counted); a sync group or a
group proceeds with the live workers until the replacement's first gradient arrives, or
waits for it (``algo.on_worker_loss``). A worker that raises stops the run with its
traceback."""

from __future__ import annotations

import copy
import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy

from qfleet.algos.program import GradientProgram
from qfleet.replay import Replay
from qfleet.roles.gradients import Gradient
from qfleet.runtime.allreduce import Keeper, ReduceGroup, load_replica
from qfleet.runtime.base import RoundReport
from qfleet.runtime.errors import WorkerError
from qfleet.runtime.global_side import GlobalSide
from qfleet.runtime.grad_worker import LAST, GradMsg, SavedMsg, Shared, worker_main
from qfleet.runtime.group_reduce import Team, TeamKeeper
from qfleet.runtime.processes import (
    Inbox,
    arrived,
    context,
    dead_workers,
    signal_stacks,
    stop_processes,
)
from qfleet.runtime.reports import all_spent
from qfleet.runtime.shm import Flag, PauseGate, ProcessLock, SharedParams
from qfleet.runtime.shm_replay import SharedReplay, ShmAlloc

ROUND_S = 0.1
SAVE_TIMEOUT_S = 120.0  # for every worker to write its own replay for a checkpoint


@dataclass
class _Worker:
    index: int
    incarnation: int
    process: BaseProcess


class ProcessesGradientRunner(GlobalSide):
    def __init__(self, program: GradientProgram, start_method: str = "auto") -> None:
        super().__init__(program)
        self.ctx = context(start_method)
        self.shared_model = not program.sync  # Hogwild, async and grouped
        if self.shared_model:
            self.aggregator.share_memory()
        if program.hogwild:
            self.aggregator.lock = ProcessLock()  # a worker may die holding it
        self.params = SharedParams(self.aggregator.model, self.ctx)
        self.params.publish(self.aggregator.model, self.aggregator.version)
        self.inbox = Inbox(self.ctx)
        self.size_P = sum(v.numel() for v in self.aggregator.online.parameters())
        group = ReduceGroup(program.num_workers, self.size_P, self.ctx, self.aggregator.version) \
            if program.sync and not program.hogwild else None
        teams = [Team(program.group_size, self.size_P, self.ctx)
                 for _ in range(program.num_workers // program.group_size)] \
            if self.shared_model and not program.hogwild else []  # async: groups of one
        self.sh = Shared(program, self.params,
                          self.aggregator if self.shared_model else None, Flag(self.ctx),
                          self.shm_replay,
                          PauseGate(program.num_workers, self.ctx) if self.shared_model else None,
                          self.ctx.Value("q", 0, lock=False),
                          tempfile.mkdtemp(prefix="qfleet-replays-"), self.ctx.RawValue("q", 0),
                          self.ctx.RawValue("b", 1), group, teams, self.ctx.RawValue("q", 0),
                          torch.zeros(program.num_workers, dtype=torch.int8).share_memory_())
        self.keeper = None if group is None else \
            Keeper(group, self.sh.save_dir, program.wait_for_restart)
        if self.keeper is not None:
            self.keeper.start(self.aggregator, self.env_steps)
        self.team_keepers = [TeamKeeper(team, program.wait_for_restart) for team in teams]
        self.teams = bool(teams)
        self.frozen = False  # freeze() stopped the workers (a sync group's: the main's copy
        # is the model)
        self.fetched: dict[int, dict[str, np.ndarray]] = {}  # their replays, when frozen
        self.deferred: list[Any] = []  # messages that came while a checkpoint waited
        self.restarts = [0] * program.num_workers
        self.known: set[tuple[int, int]] = set()  # (index, incarnation) whose reports count
        self.workers: list[_Worker] = []
        self.workers = [self._spawn(i, 0) for i in range(program.num_workers)]

    def new_shared_replay(self) -> Replay | None:
        """In shared memory: the workers add and sample on their own (shm_replay)."""
        make = self.program.make_shared_replay
        if make is None:
            self.shm_replay = None
            return None
        alloc = ShmAlloc()
        self.shm_replay = SharedReplay(make(alloc), alloc)
        return self.shm_replay.replay

    def _spawn(self, index: int, incarnation: int, joins: bool = False) -> _Worker:
        self.known.add((index, incarnation))
        self.known.discard((index, incarnation - 2))  # no message can still name it
        self.inbox.drop((index, incarnation - 2))
        if self.sh.pause is not None:
            self.sh.pause.clear(index)  # a killed predecessor may have died mid-step
        self.sh.spent_W[index] = 0
        process = self.inbox.start((index, incarnation), lambda out: self.ctx.Process(
            target=worker_main, name=f"qfleet-worker-{index}", daemon=True,
            args=(self.sh, index, incarnation, out, self.restored_worker(index),
                  self.sh.save_request.value, joins)))
        return _Worker(index, incarnation, process)

    def step(self) -> RoundReport:
        report = RoundReport()
        self.clock_in()
        self._drain(report, wait=True)
        self._check_health(report)
        if self.keeper is not None:
            alive = [w.process.is_alive() for w in self.workers]
            self.waiting = self.keeper.tend(alive, self.aggregator, self.params, self.env_steps)
            self.keeper.refresh(self.aggregator, self.params)
            if self.keeper.spent(alive):
                self.env_steps = max(self.env_steps, self.program.total_env_steps)
        if self.teams:
            self._tend_teams(report)
        elif self.program.hogwild:
            alive = [w.process.is_alive() for w in self.workers]
            self._catch_up(report, all_spent(self.sh.spent_W.tolist(), alive))
        self.sh.env_steps.value = self.env_steps
        self.clock_out(report)
        return report

    def _tend_teams(self, report: RoundReport) -> None:
        """Each group's joins, and the catch-up once every member is spent."""
        size, spent = self.program.group_size, True
        for g, team_keeper in enumerate(self.team_keepers):
            alive = [w.process.is_alive() for w in self.workers[g * size:(g + 1) * size]]
            team_keeper.tend(alive)
            spent = spent and team_keeper.team.spent(alive)
        self._catch_up(report, spent)

    def _catch_up(self, report: RoundReport, spent: bool) -> None:
        """Once every live worker stopped at the budget (``spent``: its reports sent), the
        count becomes every step they took, also those of reports a killed worker never
        sent (so the run ends)."""
        if spent:
            self._drain(report, wait=False)  # what they sent before they said so
            self.env_steps = max(self.env_steps, int(self.sh.taken.value))

    def _drain(self, report: RoundReport, wait: bool) -> None:
        """Serve what has arrived, for at most ROUND_S: Hogwild workers never wait for the
        main process, so the stream may not run dry, and the loop must still log."""
        deferred, self.deferred = self.deferred, []
        fresh = arrived(self.inbox, wait and not deferred, "worker",
                        time.monotonic() + ROUND_S)
        for msg in itertools.chain(deferred, fresh):
            if isinstance(msg, SavedMsg):
                continue  # an answer that came after its checkpoint gave up on it
            if isinstance(msg, GradMsg):
                self._receive_grad(msg, report)

    def _receive_grad(self, msg: GradMsg, report: RoundReport) -> None:
        """A worker's report: its gradients are in the global model already."""
        if (msg.worker, msg.incarnation) not in self.known:
            return  # from an incarnation long gone
        grad = Gradient(msg.worker, msg.base_version, msg.env_steps, msg.returns, None,
                        msg.loss, msg.q_mean, msg.epsilon, msg.applied_at, msg.rows,
                        msg.lengths, msg.times, msg.groups, msg.reports, msg.stale,
                        msg.dropped)
        self.take(grad, self.workers[msg.worker].incarnation == msg.incarnation, report)

    def _check_health(self, report: RoundReport) -> None:
        for i in dead_workers(self.workers, self._drain, self.restarts, "worker", report):
            if self.keeper is not None:
                self.keeper.lost(i)
            if self.teams:
                self.team_keepers[i // self.program.group_size].lost(i % self.program.group_size)
            self.workers[i] = self._spawn(i, self.workers[i].incarnation + 1,
                                          joins=self.keeper is not None or self.teams)
            self.lost(i, report)

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        if self.keeper is not None and not self.frozen:
            self._from_group(with_replay and self.program.local_replay)
        elif self.shared_model and not self.frozen and with_replay and self.program.local_replay:
            # before the pause: a group member waiting for its turn cannot answer
            self.fetched = self._replays(True)
        if self.sh.pause is None:
            tensors, meta, replay = super().state(with_replay)
        else:  # Hogwild workers write the model lock-free: copy it between their steps
            with self.sh.pause.paused(lambda i: self.workers[i].process.is_alive()):
                tensors, meta, replay = super().state(with_replay)  # copies
        return tensors, meta, replay

    def _incarnations(self) -> list[int]:
        return [w.incarnation for w in self.workers]

    @property
    def policy_net(self) -> torch.nn.Module:
        """While workers step the shared model (Hogwild, async, grouped): a copy taken between
        their steps, so an evaluation sees one policy."""
        if self.sh.pause is None or self.frozen:
            return self.aggregator.online
        with self.sh.pause.paused(lambda i: self.workers[i].process.is_alive()):
            return copy.deepcopy(self.aggregator.online)

    def dump_stacks(self, workers: list[int]) -> str:
        return signal_stacks(self.workers, workers, "worker")

    def local_replays(self) -> dict[int, dict[str, np.ndarray]]:
        if self.keeper is not None or self.shared_model:  # fetched already: with the
            # replicas (_from_group), before the pause (state) or the stop (freeze)
            fetched, self.fetched = self.fetched, {}
            return fetched
        return self._replays(True)

    def _replays(self, with_replays: bool, last: bool = False) -> dict[int, dict[str,
                                                                             np.ndarray]]:
        return {i: self._read(msg.path) for i, msg in self._saves(with_replays, last).items()}

    def _from_group(self, with_replays: bool) -> None:
        """A sync group's model and optimizer state come from its lowest member's replica
        (all are the same, give or take the step under way); its replays with it."""
        assert self.keeper is not None
        saves = self._saves(with_replays)
        replicas = [msg.replica for _, msg in sorted(saves.items()) if msg.replica]
        if replicas:
            replica = load_replica(replicas[0], self.aggregator)
            self.keeper.seen = max(self.keeper.seen, replica.version)
        for path in replicas:
            os.unlink(path)
        replays = {i: self._read(msg.path) for i, msg in saves.items()}  # removes the files
        self.fetched = replays if with_replays else {}

    @staticmethod
    def _read(path: str) -> dict[str, np.ndarray]:
        arrays = load_numpy(path)
        os.unlink(path)
        return arrays

    def _saves(self, with_replays: bool, last: bool = False) -> dict[int, SavedMsg]:
        """Ask every worker to write its own replay (``with_replays``) and a sync member
        its replica, wait for the answers (gradients wait for the next round). ``last``:
        each worker then waits to be stopped, so its replay holds every env step of its
        reports."""
        self.sh.save_replays.value = int(with_replays) | (LAST if last else 0)
        self.sh.save_request.value += 1
        request, saves = self.sh.save_request.value, dict[int, SavedMsg]()
        deadline = time.monotonic() + SAVE_TIMEOUT_S
        while len(saves) < sum(w.process.is_alive() for w in self.workers):
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not save their replays within "
                                  f"{SAVE_TIMEOUT_S:.0f} s for the checkpoint")
            for msg in arrived(self.inbox, True, "worker"):
                if isinstance(msg, SavedMsg) and msg.request == request and \
                        msg.incarnation == self.workers[msg.worker].incarnation:
                    saves[msg.worker] = msg
                elif not isinstance(msg, SavedMsg):
                    self.deferred.append(msg)
        return saves

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        """Restart every worker (fresh incarnations, refilled local replays) after the
        global side is restored, so the forked workers see the restored shared state."""
        self._stop_workers()
        super().restore(tensors, meta, replay)
        if self.shared_model:
            self.aggregator.share_memory()
        for team in self.sh.teams:
            team.reset(0)
        self.sh.taken.value = self.env_steps
        self.params.publish(self.aggregator.model, self.aggregator.version)
        if self.keeper is not None:
            self.keeper.start(self.aggregator, self.env_steps)
        self.frozen = False
        self.sh.stop.clear()
        self.sh.env_steps.value = self.env_steps
        self._forget_workers()
        self.workers = [self._spawn(i, state["incarnation"] + 1)
                        for i, state in enumerate(meta["workers"])]
        for key in [k for k in self.known if k[1] != self.workers[k[0]].incarnation]:
            self.known.discard(key)  # what workers sent before the restore is void
            self.inbox.drop(key)

    def freeze(self) -> None:
        """Workers that write the shared model on their own (all but sync): stop them so
        the final eval, the result and the checkpoint all see one model (with the replays
        they own, fetched first)."""
        if self.shared_model and not self.frozen:
            self.fetched = self._replays(self.program.local_replay, last=True)  # ({} each
            # unless they keep replays)
            self._stop_workers()
            # their last reports: the env steps in the replays are counted (the metrics of
            # that last moment are not logged); they stopped at the budget by themselves
            self._drain(RoundReport(), wait=False)
            self.frozen = True
        elif self.keeper is not None and not self.frozen:  # a sync group steps on its own
            self._from_group(self.program.local_replay)
            self._stop_workers()
            self.frozen = True

    def _stop_workers(self) -> None:
        stop_processes([w.process for w in self.workers], self.sh.stop, self.inbox)

    def close(self) -> None:
        self._stop_workers()
        shutil.rmtree(self.sh.save_dir, ignore_errors=True)
        self.inbox.close()
