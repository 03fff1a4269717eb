"""The processes backend: each actor in a worker process, learner and replay in this one.

Workers are forked, or spawned (``runtime.start_method``: the program is plain data and
bound methods, so it pickles; shared memory travels as handles). An actor writes a chunk
into one of its shared slots and sends only the slot id and counters; the learner copies
the slot into that actor's replay shard and hands the slot back. Parameters flow the other
way through SharedParams.

Faults: a worker killed by a signal is restarted with fresh seeds (same shard, so data it
already delivered stays); a worker that raises stops the run with its traceback.
"""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for_readers
from multiprocessing.process import BaseProcess
from typing import Any, Protocol, cast

from qfleet.algos.program import ActorLearnerProgram
from qfleet.compute import pin_torch
from qfleet.config import resolve_start_method
from qfleet.roles import ActorLoop, Chunk
from qfleet.runtime.base import LearnerSide, RoundReport
from qfleet.runtime.errors import WorkerError, count_restart
from qfleet.runtime.shm import ChunkSlots, Context, Flag, SharedParams, main_alive

SLOTS_PER_ACTOR = 4
POLL_S = 0.05  # how long the learner waits for data when it is ahead of the actors
SHUTDOWN_S = 10.0
STACKS_S = 0.5  # for a stalled worker to print its stacks


@dataclass(frozen=True)
class ChunkMsg:
    actor: int
    incarnation: int
    slot: int
    rows: int
    env_steps: int
    returns: list[float]
    lengths: list[int]
    param_version: int
    epsilon: float | None
    has_priorities: bool
    times: dict[str, float]


@dataclass(frozen=True)
class ErrorMsg:
    actor: int
    incarnation: int
    traceback: str


def leave_signals_to_main() -> None:
    """Ctrl-C or SIGTERM sent to the whole process group (a terminal, `timeout`, a batch
    scheduler) is the main process's to handle: it checkpoints, then stops the workers.
    A worker that died of it too would be restarted and reported as a crash. SIGUSR1
    prints the worker's stacks (for the stall watchdog: ``signal_stacks``)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def _actor_main(program: ActorLearnerProgram, index: int, incarnation: int,
                slots: ChunkSlots, out: Connection, params: SharedParams, stop: Flag) -> None:
    leave_signals_to_main()
    pin_torch(1)
    try:
        loop = ActorLoop(program.make_actor(index, incarnation), program.schedule.chunk_steps,
                         program.sync_every)
        while not stop.is_set() and main_alive():
            chunk = loop.step(params.pull)
            slot = _take_slot(slots, stop)
            if slot is None:
                break
            rows = slots.write(slot, chunk.transitions, chunk.priorities_N)
            out.send(ChunkMsg(index, incarnation, slot, rows, chunk.env_steps,
                              chunk.episode_returns, chunk.episode_lengths,
                              chunk.param_version, chunk.epsilon,
                              chunk.priorities_N is not None, chunk.times))
        loop.actor.close()
    except Exception:
        out.send(ErrorMsg(index, incarnation, traceback.format_exc()))
    finally:
        out.close()


def _take_slot(slots: ChunkSlots, stop: Flag) -> int | None:
    while not stop.is_set() and main_alive():
        try:
            return int(slots.free.get(timeout=0.1))
        except queue.Empty:
            continue
    return None


def death_cause(process: BaseProcess) -> str:
    code = process.exitcode or 0
    return signal.Signals(-code).name if code < 0 else f"exit code {code}"


class Inbox:
    """What worker processes send the main process: one pipe per worker incarnation, whose
    only writer is that worker.

    Not one multiprocessing.Queue for all: its writers share a lock that a worker's feeder
    thread holds across each write, and a worker that ends or is killed while holding it
    leaves it held, so every later message of every worker is lost and the run hangs (a
    resumed run did, on a loaded CI machine). A dying worker spoils only its own pipe; a
    message it left half-written reads as the end of that pipe."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.readers: dict[tuple[int, int], Connection] = {}  # by (worker, incarnation)
        self.held: list[Any] = []  # read while stopping workers, handed out next

    def start(self, key: tuple[int, int], process: Callable[[Connection], BaseProcess],
              ) -> BaseProcess:
        """Start the process ``process(writer)`` builds; its messages arrive here."""
        reader, writer = self.ctx.Pipe(duplex=False)
        started = process(writer)
        started.start()
        writer.close()  # the worker's copy is the only one: its end is this pipe's end
        self.drop(key)
        self.readers[key] = reader
        return started

    def drop(self, key: tuple[int, int]) -> None:
        """Forget an incarnation's pipe: nothing it sends any more counts."""
        reader = self.readers.pop(key, None)
        if reader is not None:
            reader.close()

    def ready(self, timeout: float) -> list[Any]:
        """One whole message from each pipe that has one, waiting up to ``timeout`` s."""
        if self.held:
            held, self.held = self.held, []
            return held
        return self._read(timeout)

    def _read(self, timeout: float) -> list[Any]:
        by_reader = {id(r): k for k, r in self.readers.items()}
        messages = []
        for reader in wait_for_readers(list(self.readers.values()), timeout):
            assert isinstance(reader, Connection)
            try:
                messages.append(reader.recv())
            except (EOFError, OSError):  # its worker ended: nothing more will come
                self.drop(by_reader[id(reader)])
        return messages

    def hold(self, timeout: float) -> None:
        """Read what is there into ``held``, so no worker blocks on a full pipe while
        the main process waits for it to stop."""
        self.held += self._read(timeout)

    def close(self) -> None:
        for key in list(self.readers):
            self.drop(key)


def arrived(inbox: Inbox, wait: bool, role: str, until: float = float("inf")) -> Iterator[Any]:
    """The messages workers sent, waiting POLL_S for the first if ``wait``, until none is
    left or the monotonic clock passes ``until``. A worker's ErrorMsg (its own code
    raised) stops the run with the worker's traceback."""
    block = wait
    while time.monotonic() < until:
        messages = inbox.ready(POLL_S if block else 0.0)
        if not messages:
            return
        block = False
        for msg in messages:
            if isinstance(msg, ErrorMsg):
                raise WorkerError(f"{role} {msg.actor} (incarnation {msg.incarnation}) "
                                  f"failed:\n{msg.traceback}")
            yield msg


class _HasProcess(Protocol):
    process: BaseProcess


def dead_workers(workers: Sequence[_HasProcess], drain: Callable[[RoundReport, bool], None],
                 restarts: list[int], role: str, report: RoundReport) -> Iterator[int]:
    """The index of each worker process that died, counted as a restart. Messages are
    read first: a worker's own error (an ErrorMsg) explains its death and raises."""
    for i, worker in enumerate(workers):
        if not worker.process.is_alive():
            drain(report, False)
            count_restart(restarts, i, role, death_cause(worker.process), report)
            yield i


def signal_stacks(workers: Sequence[_HasProcess], indices: list[int], role: str) -> str:
    """Have each worker in ``indices`` print its stacks to stderr (SIGUSR1, faulthandler)."""
    for i in indices:  # one at a time, so their lines do not interleave
        pid = workers[i].process.pid
        if pid is not None and workers[i].process.is_alive():
            os.kill(pid, signal.SIGUSR1)
            time.sleep(STACKS_S)  # it writes on its own: before the error line, not after
    return f"each {role}'s stack (faulthandler, on stderr) is printed above"


def stop_processes(processes: list[BaseProcess], stop: Flag, inbox: Inbox) -> None:
    """Ask workers to stop, give them SHUTDOWN_S together, then kill what is left.
    Meanwhile their messages are read and held: a worker may be sending one."""
    stop.set()
    deadline = time.monotonic() + SHUTDOWN_S
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        inbox.hold(POLL_S)
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)


@dataclass
class _Worker:
    index: int
    incarnation: int
    process: BaseProcess
    slots: ChunkSlots


def context(start_method: str) -> Context:
    return cast(Context, get_context(resolve_start_method(start_method)))


class ProcessesRunner(LearnerSide):
    def __init__(self, program: ActorLearnerProgram, start_method: str = "auto") -> None:
        super().__init__(program)
        self.ctx = context(start_method)
        self.params = SharedParams(self.learner.online, self.ctx)
        self._publish()
        self.inbox = Inbox(self.ctx)
        self.stop = Flag(self.ctx)
        self.slots: dict[tuple[int, int], ChunkSlots] = {}
        self.restarts = [0] * program.num_actors
        self.workers: list[_Worker] = []
        self.workers = [self._spawn(i, 0) for i in range(program.num_actors)]

    def _spawn(self, index: int, incarnation: int) -> _Worker:
        p = self.program
        slots = ChunkSlots(SLOTS_PER_ACTOR, p.max_chunk_rows, p.record, self.ctx)
        self.slots[(index, incarnation)] = slots
        self.slots.pop((index, incarnation - 2), None)  # no message can still name it
        self.inbox.drop((index, incarnation - 2))
        process = self.inbox.start((index, incarnation), lambda out: self.ctx.Process(
            target=_actor_main, name=f"qfleet-actor-{index}", daemon=True,
            args=(p, index, incarnation, slots, out, self.params, self.stop)))
        return _Worker(index, incarnation, process, slots)

    def _publish(self) -> None:
        self.params.publish(self.learner.online, self.learner.version)

    def _drain(self, report: RoundReport, wait: bool) -> None:
        for msg in arrived(self.inbox, wait, "actor"):
            self._receive(msg, report)

    def _receive(self, msg: ChunkMsg, report: RoundReport) -> None:
        slots = self.slots.get((msg.actor, msg.incarnation))
        if slots is None:
            return  # from an incarnation long gone
        data, prio = slots.read(msg.slot, msg.rows, msg.has_priorities)
        chunk = Chunk(data, msg.env_steps, msg.returns, msg.lengths, msg.param_version,
                      msg.epsilon, prio, msg.times)
        self.write(msg.actor, chunk, report)  # copies into the replay shard
        slots.free.put(msg.slot)

    def _tend(self, report: RoundReport) -> None:
        """Restart every actor process that died (a worker's own error raises first)."""
        for i in dead_workers(self.workers, self._drain, self.restarts, "actor", report):
            self.workers[i] = self._spawn(i, self.workers[i].incarnation + 1)

    def _incarnations(self) -> list[int]:
        return [w.incarnation for w in self.workers]

    def dump_stacks(self, actors: list[int]) -> str:
        return signal_stacks(self.workers, actors, "actor")

    def _reincarnate(self, i: int, incarnation: int) -> None:
        worker = self.workers[i]
        worker.process.kill()
        worker.process.join(timeout=SHUTDOWN_S)
        self.workers[i] = self._spawn(worker.index, incarnation)
        for key in [k for k in self.slots if k[0] == i and k[1] != incarnation]:
            self.slots.pop(key).close()  # chunks collected before the restore are void
            self.inbox.drop(key)

    def close(self) -> None:
        stop_processes([w.process for w in self.workers], self.stop, self.inbox)
        self.inbox.close()
        for slots in self.slots.values():
            slots.close()
