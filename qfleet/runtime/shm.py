"""Shared-memory transport for one machine: versioned parameters and chunk slots.

Both are allocated by the main process before it starts the workers, as torch tensors in
shared memory (torch unlinks the segments at once, so nothing is left in /dev/shm even
after a SIGKILL). Forked workers inherit them; spawned ones receive them pickled, which
for a shared tensor sends its handle, never its data. Only small control messages travel
through queues; arrays never do.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing as mp
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
from typing import Any

import numpy as np
import torch
from torch import nn

from qfleet.replay import Field, RecordSpec, Transitions, frame_codec
from qfleet.roles import ParamSnapshot

Context = ForkContext | ForkServerContext | SpawnContext  # runtime.start_method's
PRIORITY = "priority_N"  # beside the record's fields: the actor's initial priorities
FRAMES, FRAME_COUNT = "frames_KHW", "frame_count"  # a coded chunk's distinct frames


def _shared(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    return torch.from_numpy(np.zeros(shape, dtype=dtype)).share_memory_()


def main_alive() -> bool:
    """In a worker: whether the process that started it still runs (fork, forkserver or
    spawn alike; a worker must not outlive a main process that was killed)."""
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


class Flag:
    """A flag every process reads and the main process sets: one shared byte, no lock. A
    multiprocessing Event takes a lock even to read, and a worker killed while it held it
    (SIGKILL, a restore replacing it) would leave every later reader waiting forever."""

    def __init__(self, ctx: Context) -> None:
        self.value = ctx.RawValue("b", 0)

    def set(self) -> None:
        self.value.value = 1

    def clear(self) -> None:
        self.value.value = 0

    def is_set(self) -> bool:
        return bool(self.value.value)


class SharedParams:
    """One flat shared buffer of a module's state_dict plus a version number.

    One process publishes; readers copy without a lock (a seqlock: ``seq`` is odd while a
    publish writes, and a copy taken across a change of ``seq`` is taken again), so a reader
    killed mid-copy can never block the publisher. An actor checks the version first and
    copies only when it moved (Sample Factory's policy_versions, on one machine).
    """

    def __init__(self, module: nn.Module, ctx: Context) -> None:
        state = module.state_dict()
        self.layout = [(k, tuple(v.shape), v.numel(), v.dtype) for k, v in state.items()]
        total = sum(n for _, _, n, _ in self.layout)
        self.flat = torch.zeros(total, dtype=torch.float32).share_memory_()
        self.version = ctx.RawValue("q", -1)
        self.seq = ctx.RawValue("q", 0)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        views, offset = {}, 0
        for name, shape, n, dtype in self.layout:
            views[name] = flat[offset: offset + n].view(shape).to(dtype)
            offset += n
        return views

    def publish(self, module: nn.Module, version: int) -> None:
        self.seq.value += 1  # odd: a write is under way
        offset = 0
        for (_, _, n, _), value in zip(self.layout, module.state_dict().values(), strict=True):
            self.flat[offset: offset + n].copy_(value.detach().reshape(-1))
            offset += n
        self.version.value = version
        self.seq.value += 1

    def pull(self, known_version: int, patience: int = 0) -> ParamSnapshot | None:
        """A private copy of the newest parameters, or None if ``known_version`` is newest
        or the publisher died mid-write (its ``seq`` stays odd for ever: the caller's own
        ``main_alive`` check then ends the worker; the main process, where that never
        fails, gives up after ``patience`` tries instead)."""
        if self.version.value == known_version:
            return None
        tries = 0
        while True:
            seq = self.seq.value
            if seq % 2 == 0:
                version, flat = int(self.version.value), self.flat.clone()
                if self.seq.value == seq:  # no publish began meanwhile: one version
                    return ParamSnapshot(version, self._views(flat))
            tries += 1
            # ~0.1 s of odd seq: killed?
            if tries == patience or (tries % 1000 == 0 and not main_alive()):
                return None
            time.sleep(0.0001)


class ChunkSlots:
    """S preallocated chunk buffers for one actor, one shared array per field of the
    program's record spec (plus the Ape-X priorities); a slot is owned by the actor until
    it sends the slot's id, and by the learner until it hands the id back."""

    def __init__(self, num_slots: int, max_rows: int, record: RecordSpec,
                 ctx: Context) -> None:
        self.max_rows = max_rows
        self.coded = frame_codec.coded(record)  # frame stacks: each distinct frame once
        fields = {**(frame_codec.wire_spec(record) if self.coded else record),
                  PRIORITY: Field(np.dtype(np.float32))}
        self.tensors = {name: _shared((num_slots, max_rows, *f.shape), f.dtype)
                        for name, f in fields.items()}
        if self.coded:
            frame = record[frame_codec.STACKS[0]]
            self.tensors[FRAMES] = _shared(
                (num_slots, frame_codec.max_frames(record, max_rows), *frame.shape[1:]),
                frame.dtype)
            self.tensors[FRAME_COUNT] = _shared((num_slots,), np.dtype(np.int64))
        self.arrays = {name: t.numpy() for name, t in self.tensors.items()}
        self.free: mp.Queue[int] = ctx.Queue()
        for slot in range(num_slots):
            self.free.put(slot)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "arrays"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # the arrays are views of the shared tensors again
        self.arrays = {name: t.numpy() for name, t in self.tensors.items()}

    def write(self, slot: int, data: Transitions, priorities_N: np.ndarray | None) -> int:
        rows = len(data)
        if rows > self.max_rows:
            raise ValueError(f"chunk of {rows} transitions exceeds the slot size {self.max_rows}")
        fields = data.fields()
        if self.coded:
            fields, frames_KHW = frame_codec.encode(fields)
            self.arrays[FRAMES][slot, :len(frames_KHW)] = frames_KHW
            self.arrays[FRAME_COUNT][slot] = len(frames_KHW)
        for name, src in fields.items():
            self.arrays[name][slot, :rows] = src
        if priorities_N is not None:
            self.arrays[PRIORITY][slot, :rows] = priorities_N
        return rows

    def read(self, slot: int, rows: int, with_priorities: bool) -> tuple[Transitions,
                                                                         np.ndarray | None]:
        """Views into the slot (frame stacks: fresh arrays): valid until the slot id is
        handed back to ``free``."""
        fields = {name: a[slot, :rows] for name, a in self.arrays.items()
                  if name not in (PRIORITY, FRAMES, FRAME_COUNT)}
        if self.coded:
            count = int(self.arrays[FRAME_COUNT][slot])
            fields = frame_codec.decode(fields, self.arrays[FRAMES][slot, :count])
        data = Transitions.from_fields(fields)
        prio = self.arrays[PRIORITY][slot, :rows] if with_priorities else None
        return data, prio

    def close(self) -> None:
        self.free.close()
        self.free.cancel_join_thread()


# Between tries for a turn: from 20 us, doubling to TURN_SLEEP_S. A turn is held for a
# step (~1 ms on 2 cores), which tries every 20 us would poll about 50 times.
TURN_SLEEP_S = 0.5e-3


class ProcessLock:
    """A lock between processes (and threads) that the kernel releases when its holder
    dies: an fcntl lock on a file of its own. A worker SIGKILLed while it held a
    multiprocessing.Lock kept it forever, and every other process, the main one
    included, hung on it."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="qfleet-lock-")
        self._fd, self._pid, self._threads = fd, os.getpid(), threading.Lock()
        weakref.finalize(self, _remove_in, self._pid, fd, self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # a spawned worker opens the file itself

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._fd, self._pid = state["path"], -1, -1

    def __enter__(self) -> None:
        if self._pid != os.getpid():  # fcntl locks belong to a process: a forked child
            # locks through a descriptor of its own (and a thread lock nobody holds)
            self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
            self._threads = threading.Lock()
        self._threads.acquire()
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._threads.release()


def _remove_in(pid: int, fd: int, path: str) -> None:
    if os.getpid() == pid:  # only the creator; a forked child's copy dies with the child
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class PauseGate:
    """Lets the main process copy a shared model that Hogwild workers write lock-free.

    Workers never wait for each other: each marks itself busy around its optimizer step
    (under a lock held only for the flag). ``paused()`` stops new steps, waits for the
    busy ones to finish, and yields a moment in which the model is one consistent state.
    """

    def __init__(self, num_workers: int, ctx: Context) -> None:
        self.lock = ProcessLock()  # a worker may be killed while it holds it
        self.pause = ctx.Value("b", 0, lock=False)
        self.busy_W = torch.zeros(num_workers, dtype=torch.int8).share_memory_()

    @contextlib.contextmanager
    def step(self, worker: int) -> Iterator[None]:
        while True:
            with self.lock:
                if not self.pause.value:
                    self.busy_W[worker] = 1
                    break
            time.sleep(0.001)
        try:
            yield
        finally:
            self.busy_W[worker] = 0

    @contextlib.contextmanager
    def turn(self, worker: int) -> Iterator[None]:
        """``step``, but alone: no other worker is in its step or turn meanwhile (grouped
        groups step the shared model one at a time, and copy it untorn)."""
        pause = 20e-6
        while True:
            with self.lock:
                if not self.pause.value and not self.busy_W.any():
                    self.busy_W[worker] = 1
                    break
            time.sleep(pause)
            pause = min(2 * pause, TURN_SLEEP_S)
        try:
            yield
        finally:
            self.busy_W[worker] = 0

    @contextlib.contextmanager
    def paused(self, alive: Callable[[int], bool]) -> Iterator[None]:
        """``alive(i)``: whether worker i still runs (one killed mid-step stays busy)."""
        with self.lock:
            self.pause.value = 1
        try:
            while any(busy and alive(i) for i, busy in enumerate(self.busy_W.tolist())):
                time.sleep(0.001)
            yield
        finally:
            with self.lock:
                self.pause.value = 0

    def clear(self, worker: int) -> None:
        self.busy_W[worker] = 0
