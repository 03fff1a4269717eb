"""The replay that several gradient-worker processes share (replay.scope shared/sharded).

It lives in the main process. A worker holds a ``ReplayClient``: writes travel as chunk
slots in shared memory (like Ape-X chunks), priority updates as small messages, and
``sample`` asks the main process, which writes the batch into the worker's batch slot
and answers on the worker's reply queue. The client keeps one request in flight (it asks
for the next batch as soon as it has copied one out), so a worker rarely waits for the
round trip; the price is that a batch is drawn before the previous batch's priorities
are written back (as an Ape-X learner's prefetching does). ``ReplayServer`` is the
main-process half.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from qfleet.replay import Batch, RecordSpec, Replay, Transitions
from qfleet.runtime.shm import ChunkSlots, Context, Flag, main_alive

SLOTS = 4


@dataclass(frozen=True)
class AddMsg:
    worker: int
    incarnation: int
    slot: int
    rows: int


@dataclass(frozen=True)
class SampleMsg:
    worker: int
    incarnation: int
    rows: int


@dataclass(frozen=True)
class PriorityMsg:
    indices_B: np.ndarray
    td_abs_B: np.ndarray


class ReplayLink:
    """One worker's shared-memory end of the replay: chunk slots up, a batch slot down."""

    def __init__(self, max_chunk_rows: int, batch_rows: int, record: RecordSpec,
                 ctx: Context) -> None:
        self.chunks = ChunkSlots(SLOTS, max_chunk_rows, record, ctx)
        self.batch = ChunkSlots(1, batch_rows, record, ctx)
        self.replies: Any = ctx.Queue()

    def close(self) -> None:
        for q in (self.chunks.free, self.batch.free, self.replies):
            q.close()
            q.cancel_join_thread()


class ReplayClient:
    """What a worker process calls ``replay``; every call ends in the main process."""

    def __init__(self, link: ReplayLink, worker: int, incarnation: int, out: Connection,
                 size: Any, prioritized: bool, stop: Flag) -> None:
        self.link, self.worker, self.incarnation = link, worker, incarnation
        self.out, self.size, self.prioritized, self.stop = out, size, prioritized, stop
        self.rng = np.random.default_rng(0)  # unused: the server's replay draws the samples
        self.requested = 0  # rows of the batch in flight, 0 if none

    def __len__(self) -> int:
        return int(self.size.value)

    @property
    def capacity(self) -> int:
        raise NotImplementedError("the shared replay's capacity is the main process's")

    @property
    def nbytes(self) -> int:
        return 0  # the arrays live in the main process

    def state_dict(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("the main process checkpoints the shared replay")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("the main process checkpoints the shared replay")

    def _wait(self, q: Any) -> Any:
        while not self.stop.is_set() and main_alive():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        raise SystemExit(0)  # the run is stopping: leave the worker loop quietly

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        slot = int(self._wait(self.link.chunks.free))
        rows = self.link.chunks.write(slot, chunk, priorities_N)
        self.out.send(AddMsg(self.worker, self.incarnation, slot, rows))

    def sample(self, batch_size: int) -> Batch:
        if self.requested != batch_size:
            if self.requested:  # a batch of another size is in flight: drop it
                self._wait(self.link.replies)
            self.out.send(SampleMsg(self.worker, self.incarnation, batch_size))
        indices_B, has_weights = self._wait(self.link.replies)
        data, weights_B = self.link.batch.read(0, len(indices_B), has_weights)
        copy = data.map(np.array)
        batch = Batch(copy, indices_B, None if weights_B is None else np.array(weights_B))
        self.out.send(SampleMsg(self.worker, self.incarnation, batch_size))  # the next one
        self.requested = batch_size
        return batch

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        self.out.send(PriorityMsg(indices_B, td_abs_B.astype(np.float32)))


class ReplayServer:
    """The main-process half: applies AddMsg / SampleMsg / PriorityMsg to the replay."""

    def __init__(self, replay: Replay, size: Any) -> None:
        self.replay, self.size = replay, size

    def handle(self, msg: AddMsg | SampleMsg | PriorityMsg, link: ReplayLink | None) -> int:
        """Serve one message (``link``: the sender's, None if it is gone); returns the env
        transitions added."""
        if isinstance(msg, PriorityMsg):
            self.replay.update_priorities(msg.indices_B, msg.td_abs_B)
            return 0
        if link is None:
            return 0
        if isinstance(msg, SampleMsg):
            batch = self.replay.sample(msg.rows)
            link.batch.write(0, batch.data, batch.weights_B)
            link.replies.put((batch.indices_B, batch.weights_B is not None))
            return 0
        data, _ = link.chunks.read(msg.slot, msg.rows, False)
        self.replay.add(data, shard=msg.worker)
        link.chunks.free.put(msg.slot)
        self.size.value = len(self.replay)
        return msg.rows
