"""The processes backend for gradient schemes: one worker process per gradient worker.

Parameter-server mode (sync / async / grouped): a worker writes its flat gradient into
one of its shared gradient slots and sends the slot id; the main process (the aggregator)
offers it to the gate, steps when a group is complete, publishes the new parameters in
SharedParams and only then hands the slot back. A sync worker has one slot, so taking
it back is the barrier: it pulls the new parameters and computes its next gradient on
them. Async workers have two slots and never wait for the others.

Hogwild mode (A3C): the global model, the optimizer state and the version counter live
in shared memory; each worker applies its own gradients lock-free and only reports.

Faults: a killed worker is restarted with fresh seeds (counted); in sync mode its group
proceeds with the live workers until the replacement's first gradient arrives, or waits
for it (``algo.on_worker_loss``). A worker that raises stops the run with its traceback.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from qfleet.algos.program import GradientProgram
from qfleet.compute import pin_torch
from qfleet.roles import Fetch, gradient_step
from qfleet.roles.gradients import Aggregator, Gradient, GradientWorker
from qfleet.runtime.base import RoundReport
from qfleet.runtime.errors import WorkerError
from qfleet.runtime.global_side import GlobalSide
from qfleet.runtime.processes import (
    ErrorMsg,
    Inbox,
    arrived,
    context,
    dead_workers,
    leave_signals_to_main,
    signal_stacks,
    stop_processes,
)
from qfleet.runtime.replay_rpc import (
    AddMsg,
    PriorityMsg,
    ReplayClient,
    ReplayLink,
    ReplayServer,
    SampleMsg,
)
from qfleet.runtime.shm import Flag, PauseGate, SharedParams, main_alive
from qfleet.schedules import follow

ROUND_S = 0.1
SAVE_TIMEOUT_S = 120.0  # for every worker to write its own replay for a checkpoint


@dataclass(frozen=True)
class GradMsg:
    worker: int
    incarnation: int
    slot: int  # -1: no gradient in a slot (still filling its replay, or Hogwild)
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


@dataclass(frozen=True)
class SavedMsg:
    """A worker wrote its own replay for checkpoint request ``request`` to ``path``."""

    worker: int
    incarnation: int
    request: int
    path: str


@dataclass
class Link:
    """Everything one worker incarnation shares with the main process."""

    grads: torch.Tensor  # (slots, P) in shared memory
    free: Any  # queue of slot ids the worker may write
    replay: ReplayLink | None

    def close(self) -> None:
        self.free.close()
        self.free.cancel_join_thread()
        if self.replay is not None:
            self.replay.close()


@dataclass
class _Shared:
    """What the main process hands every worker process."""

    program: GradientProgram
    params: SharedParams
    aggregator: Aggregator | None  # Hogwild only: the shared-memory global model
    stop: Flag
    replay_size: Any
    replay_prioritized: bool
    pause: PauseGate | None  # Hogwild: lets a checkpoint copy the shared model whole
    save_request: Any  # a counter: when it moves, each worker saves its own replay ...
    save_dir: str  # ... into this folder
    env_steps: Any  # the run's env steps as the main process last counted them (Hogwild
    # workers set their learning rate from it)


def _worker_main(sh: _Shared, index: int, incarnation: int, link: Link, out: Connection,
                 replay_state: dict[str, np.ndarray], save_request: int) -> None:
    leave_signals_to_main()
    pin_torch(1)
    try:
        replay = None if link.replay is None else ReplayClient(
            link.replay, index, incarnation, out, sh.replay_size,
            sh.replay_prioritized, sh.stop)
        worker = sh.program.make_worker(index, incarnation, replay)
        worker.load_replay_state(replay_state)
        saver = _Saver(sh, worker, incarnation, save_request, out)
        # Hogwild: a fresh copy of the shared model, whatever its version; else the
        # published snapshot when its version moved.
        fetch: Fetch = sh.params.pull if sh.aggregator is None else \
            (lambda version: sh.aggregator.snapshot())  # type: ignore[union-attr]
        while not sh.stop.is_set() and main_alive():
            slot = _take(link.free, sh, saver)
            if slot is None:
                break
            grad = gradient_step(worker, fetch, sh.program.sync_every)
            out.send(_send(sh, worker, grad, link, slot))
        worker.close()
    except SystemExit:
        pass
    except Exception:
        out.send(ErrorMsg(index, incarnation, traceback.format_exc()))
    finally:
        out.close()


class _Saver:
    """Answers the main process's checkpoint requests with this worker's own replay,
    between two work() calls (so the replay is never caught mid-write)."""

    def __init__(self, sh: _Shared, worker: GradientWorker, incarnation: int,
                 answered: int, out: Connection) -> None:
        self.sh, self.worker, self.incarnation, self.out = sh, worker, incarnation, out
        self.answered = answered  # the last request before this worker was started

    def __call__(self) -> None:
        request = self.sh.save_request.value
        if request == self.answered:
            return
        path = os.path.join(self.sh.save_dir, f"worker{self.worker.index}-{request}.safetensors")
        save_numpy(self.worker.replay_state(), path)
        self.out.send(SavedMsg(self.worker.index, self.incarnation, request, path))
        self.answered = request


def _send(sh: _Shared, worker: GradientWorker, grad: Gradient, link: Link,
          slot: int) -> GradMsg:
    if grad.grads_P is not None and sh.aggregator is not None:
        assert sh.pause is not None
        follow(sh.aggregator, int(sh.env_steps.value))  # as of the main's last round
        with sh.pause.step(worker.index):
            grad.applied_at = sh.aggregator.apply([grad.grads_P], [1.0])
        grad.grads_P = None
    if grad.grads_P is None:
        link.free.put(slot)  # nothing to hand over: the slot stays this worker's
        slot = -1
    else:
        link.grads[slot].copy_(grad.grads_P)
    return GradMsg(worker.index, worker.actor.incarnation, slot, grad.base_version,
                   grad.env_steps, grad.episode_returns, grad.loss, grad.q_mean, grad.epsilon,
                   grad.applied_at, grad.rows, grad.episode_lengths, grad.times)


def _take(free: Any, sh: _Shared, saver: _Saver) -> int | None:
    while not sh.stop.is_set() and main_alive():
        saver()  # also while a sync worker waits for its group
        try:
            return int(free.get(timeout=0.1))
        except queue.Empty:
            continue
    return None


@dataclass
class _Worker:
    index: int
    incarnation: int
    process: BaseProcess
    link: Link


class ProcessesGradientRunner(GlobalSide):
    def __init__(self, program: GradientProgram, start_method: str = "auto") -> None:
        super().__init__(program)
        self.ctx = context(start_method)
        if program.hogwild:
            self.aggregator.share_memory()
            self.aggregator.lock = self.ctx.Lock()
        self.params = SharedParams(self.aggregator.model, self.ctx)
        self.params.publish(self.aggregator.model, self.aggregator.version)
        self.server = None if self.shared_replay is None else \
            ReplayServer(self.shared_replay, self.ctx.Value("q", 0, lock=False))
        self.inbox = Inbox(self.ctx)
        self.sh = _Shared(program, self.params,
                          self.aggregator if program.hogwild else None, Flag(self.ctx),
                          None if self.server is None else self.server.size,
                          self.shared_replay is not None and self.shared_replay.prioritized,
                          PauseGate(program.num_workers, self.ctx) if program.hogwild else None,
                          self.ctx.Value("q", 0, lock=False),
                          tempfile.mkdtemp(prefix="qfleet-replays-"), self.ctx.RawValue("q", 0))
        self.deferred: list[Any] = []  # messages that came while a checkpoint waited
        self.restarts = [0] * program.num_workers
        self.links: dict[tuple[int, int], Link] = {}
        self.workers: list[_Worker] = []
        self.workers = [self._spawn(i, 0) for i in range(program.num_workers)]

    def _new_link(self) -> Link:
        p = self.program
        slots = 2 if p.group_size == 1 else 1  # one slot makes a synchronous group's barrier
        size = sum(v.numel() for v in self.aggregator.online.parameters())
        free = self.ctx.Queue()
        for s in range(slots):
            free.put(s)
        replay = None if self.shared_replay is None else ReplayLink(
            p.max_chunk_rows, p.batch_size, p.record, self.ctx)
        return Link(torch.zeros(slots, size).share_memory_(), free, replay)

    def _spawn(self, index: int, incarnation: int) -> _Worker:
        link = self._new_link()
        self.links[(index, incarnation)] = link
        old = self.links.pop((index, incarnation - 2), None)  # no message can still name it
        if old is not None:
            old.close()
        self.inbox.drop((index, incarnation - 2))
        if self.sh.pause is not None:
            self.sh.pause.clear(index)  # a killed predecessor may have died mid-step
        process = self.inbox.start((index, incarnation), lambda out: self.ctx.Process(
            target=_worker_main, name=f"qfleet-worker-{index}", daemon=True,
            args=(self.sh, index, incarnation, link, out, self.restored_replay(index),
                  self.sh.save_request.value)))
        return _Worker(index, incarnation, process, link)

    def step(self) -> RoundReport:
        report = RoundReport()
        self.clock_in()
        self._drain(report, wait=True)
        self._check_health(report)
        self.sh.env_steps.value = self.env_steps
        self.clock_out(report)
        return report

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
            else:
                self._serve_replay(msg)

    def _serve_replay(self, msg: AddMsg | SampleMsg | PriorityMsg) -> None:
        assert self.server is not None
        link = None if isinstance(msg, PriorityMsg) else \
            self.links.get((msg.worker, msg.incarnation))
        self.server.handle(msg, None if link is None else link.replay)

    def _receive_grad(self, msg: GradMsg, report: RoundReport) -> None:
        link = self.links.get((msg.worker, msg.incarnation))
        if link is None:
            return  # from an incarnation long gone
        grads_P = None if msg.slot < 0 else link.grads[msg.slot].clone()
        grad = Gradient(msg.worker, msg.base_version, msg.env_steps, msg.returns, grads_P,
                        msg.loss, msg.q_mean, msg.epsilon, msg.applied_at, msg.rows,
                        msg.lengths, msg.times)
        current = self.workers[msg.worker].incarnation == msg.incarnation
        self.take(grad, current, (link, msg.slot), report)

    def _publish(self) -> None:
        if not self.program.hogwild:  # Hogwild workers read the shared model itself
            self.params.publish(self.aggregator.model, self.aggregator.version)

    def _release(self, token: tuple[Link, int]) -> None:
        link, slot = token
        link.free.put(slot)

    def _check_health(self, report: RoundReport) -> None:
        for i in dead_workers(self.workers, self._drain, self.restarts, "worker", report):
            self.workers[i] = self._spawn(i, self.workers[i].incarnation + 1)
            self.lost(i, report)

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        if self.sh.pause is None:
            tensors, meta, replay = super().state(with_replay)
        else:  # Hogwild workers write the model lock-free: copy it between their steps
            with self.sh.pause.paused(lambda i: self.workers[i].process.is_alive()):
                tensors, meta, replay = super().state(with_replay)
                tensors = {k: v.clone() for k, v in tensors.items()}
        return tensors, meta, replay

    def _incarnations(self) -> list[int]:
        return [w.incarnation for w in self.workers]

    def dump_stacks(self, workers: list[int]) -> str:
        return signal_stacks(self.workers, workers, "worker")

    def local_replays(self) -> dict[int, dict[str, np.ndarray]]:
        """Ask every worker to write its own replay, wait for the answers (serving nothing
        else meanwhile: other messages wait for the next round), read them back."""
        self.sh.save_request.value += 1
        request, paths = self.sh.save_request.value, dict[int, str]()
        deadline = time.monotonic() + SAVE_TIMEOUT_S
        while len(paths) < sum(w.process.is_alive() for w in self.workers):
            if time.monotonic() > deadline:
                raise WorkerError(f"workers did not save their replays within "
                                  f"{SAVE_TIMEOUT_S:.0f} s for the checkpoint")
            for msg in arrived(self.inbox, True, "worker"):
                if isinstance(msg, SavedMsg) and msg.request == request and \
                        msg.incarnation == self.workers[msg.worker].incarnation:
                    paths[msg.worker] = msg.path
                elif not isinstance(msg, SavedMsg):
                    self.deferred.append(msg)
        arrays = {i: load_numpy(path) for i, path in paths.items()}
        for path in paths.values():
            os.unlink(path)
        return arrays

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        """Restart every worker (fresh incarnations, refilled local replays) after the
        global side is restored, so the forked workers see the restored shared state."""
        self._stop_workers()
        super().restore(tensors, meta, replay)
        if self.program.hogwild:
            self.aggregator.share_memory()
        if self.server is not None:
            self.server.size.value = len(self.server.replay)
        self.params.publish(self.aggregator.model, self.aggregator.version)
        self.sh.stop.clear()
        self.sh.env_steps.value = self.env_steps
        self._forget_workers()
        self.workers = [self._spawn(i, state["incarnation"] + 1)
                        for i, state in enumerate(meta["workers"])]
        for key in [k for k in self.links if k[1] != self.workers[k[0]].incarnation]:
            self.links.pop(key).close()  # what workers sent before the restore is void
            self.inbox.drop(key)

    def freeze(self) -> None:
        """Hogwild workers write the shared model on their own: stop them so the final
        eval, the result and the checkpoint all see one model."""
        if self.program.hogwild:
            self._stop_workers()

    def _stop_workers(self) -> None:
        stop_processes([w.process for w in self.workers], self.sh.stop, self.inbox)

    def close(self) -> None:
        self._stop_workers()
        shutil.rmtree(self.sh.save_dir, ignore_errors=True)
        self.inbox.close()
        for link in self.links.values():
            link.close()
