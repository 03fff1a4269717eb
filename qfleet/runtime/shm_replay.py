"""The replay that gradient-worker processes share (replay.scope shared/sharded), placed in
shared memory: every worker adds to it and samples from it directly, and the main process
only reads it (its size, checkpoints). Nothing of it travels through the main process.

The replay is built as anywhere else, with an allocator (``ShmAlloc``) that puts its state
arrays in shared memory. Each shard (the whole replay, for scope shared) is used under a
``ShardGuard``: a lock the kernel frees if its holder dies, and a mark set while it is
held. A holder killed inside leaves the mark behind, and the next one rebuilds the shard's
tree from its leaves (a leaf is one float, always written whole; the sums above it may be
half done). A row being written when its writer died may hold a mix of two transitions:
a slot among thousands, sampled like any other.

Sent to a spawned worker, a ``SharedReplay`` pickles its arrays as handles to the same
memory (``persistent_id``), never their contents; a forked worker inherits it.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
import torch

from qfleet.replay import Batch, PrioritizedReplay, Replay, ShardedReplay, Transitions
from qfleet.runtime.shm import ProcessLock


class ShmAlloc:
    """An ``Alloc`` (replay.arrays) whose arrays live in shared memory: each one a shared
    torch byte buffer seen as NumPy (torch unlinks the segment at once, so nothing is left
    in /dev/shm even after a SIGKILL)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    def __call__(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8).share_memory_()
        self.buffers.append(buffer)
        return buffer.numpy()[:nbytes].view(dtype).reshape(shape)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _no_alloc, ()  # a worker must not grow the shared replay privately


def _no_alloc() -> Any:
    return _refuse


def _refuse(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    raise RuntimeError("a shared replay allocates its arrays in the main process only")


class ShardGuard:
    """Held around every use of one shard's state (see the module docstring)."""

    def __init__(self, shard: Replay, mark_1: np.ndarray) -> None:
        self.shard, self.mark_1, self.lock = shard, mark_1, ProcessLock()

    def __enter__(self) -> None:
        self.lock.__enter__()
        if self.mark_1[0]:  # its last holder died inside
            repair(self.shard)
        self.mark_1[0] = 1

    def __exit__(self, *exc: object) -> None:
        self.mark_1[0] = 0
        self.lock.__exit__()


def repair(shard: Replay) -> None:
    """Make a shard consistent again after a holder died inside: its tree's sums and mins
    are recomputed from the leaves (uniform replay has no tree)."""
    if isinstance(shard, PrioritizedReplay):
        shard.tree.set_all(np.array(shard.tree.priorities_N))


class Locked:
    """A replay whose every use holds one guard (scope shared: one replay, all workers)."""

    def __init__(self, replay: Replay, guard: ShardGuard) -> None:
        self.replay, self.guard = replay, guard
        self.prioritized = replay.prioritized

    @property
    def rng(self) -> np.random.Generator:
        return self.replay.rng

    @rng.setter
    def rng(self, rng: np.random.Generator) -> None:
        self.replay.rng = rng

    def __len__(self) -> int:
        return len(self.replay)

    @property
    def capacity(self) -> int:
        return self.replay.capacity

    @property
    def nbytes(self) -> int:
        return self.replay.nbytes

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        with self.guard:
            self.replay.add(chunk, priorities_N, shard)

    def sample(self, batch_size: int) -> Batch:
        with self.guard:
            return self.replay.sample(batch_size)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        with self.guard:
            self.replay.update_priorities(indices_B, td_abs_B)

    def state_dict(self) -> dict[str, np.ndarray]:
        with self.guard:  # copies: the arrays move on once the guard is let go
            return {k: np.array(v) for k, v in self.replay.state_dict().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        with self.guard:
            self.replay.load_state_dict(state)


class SharedReplay:
    """A replay in shared memory and its guards; ``replay`` is what the processes use."""

    def __init__(self, replay: Replay, alloc: ShmAlloc) -> None:
        self.alloc = alloc
        if isinstance(replay, ShardedReplay):
            marks_K = alloc((len(replay.shards),), np.int8)
            guards = {key: ShardGuard(shard, marks_K[i: i + 1])
                      for i, (key, shard) in enumerate(replay.shards.items())}
            replay.guard = guards.__getitem__
            self.replay: Replay = replay
        else:
            self.replay = Locked(replay, ShardGuard(replay, alloc((1,), np.int8)))
        # each worker's draws get a stream of their own, from this number (seeded by the run)
        self.seed = int(replay.rng.integers(2 ** 62))

    def for_worker(self, index: int, incarnation: int) -> Replay:
        """The replay as worker ``index`` uses it: the same memory, its own draws."""
        self.replay.rng = np.random.default_rng([self.seed, index, incarnation])
        return self.replay

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        payload = io.BytesIO()
        _ArrayPickler(payload, self.alloc.buffers).dump((self.replay, self.seed))
        return _attach, (payload.getvalue(), self.alloc.buffers)


def _attach(payload: bytes, buffers: list[torch.Tensor]) -> SharedReplay:
    """The other end of ``SharedReplay.__reduce__``, in the receiving process."""
    shared = SharedReplay.__new__(SharedReplay)
    shared.alloc = ShmAlloc()
    shared.alloc.buffers = buffers
    shared.replay, shared.seed = _ArrayUnpickler(io.BytesIO(payload), buffers).load()
    return shared


class _ArrayPickler(pickle.Pickler):
    """Pickles an array that lies in one of ``buffers`` as (buffer, offset, layout)."""

    def __init__(self, file: io.BytesIO, buffers: list[torch.Tensor]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.spans = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in buffers]

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray or obj.nbytes == 0:
            return None
        address = obj.__array_interface__["data"][0]
        for i, (lo, hi) in enumerate(self.spans):
            if lo <= address < hi:
                return i, address - lo, obj.shape, obj.dtype.str, obj.strides
        return None


class _ArrayUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, buffers: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.roots = [b.numpy() for b in buffers]

    def persistent_load(self, pid: Any) -> np.ndarray:
        i, offset, shape, dtype, strides = pid
        return np.ndarray(shape, np.dtype(dtype), buffer=self.roots[i], offset=offset,
                          strides=strides)
