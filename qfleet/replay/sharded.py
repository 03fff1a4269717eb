"""Sharded prioritized replay (distributed prioritized replay, Horgan et al. 2018).

K shards, each a PrioritizedReplay owned by one writer. A batch first splits its B draws
across shards by a multinomial over the shards' total priorities, then draws inside each
shard in proportion to priority, so every transition is drawn with probability
p_i / sum over all shards: the same distribution as one buffer over the union. IS
weights use the union's min priority, so they equal the one-buffer weights too.

Shards come and go: dropping one loses only its own data, and priority updates still in
flight for it are ignored. Batch indices carry the shard key in their high bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from qfleet.replay.prioritized import (
    Annealed,
    BetaSchedule,
    PrioritizedReplay,
    importance_weights,
)
from qfleet.replay.transitions import Batch, Transitions

KEY_SHIFT = 40  # a shard may write 2**40 transitions before its indices would collide
LOCAL_MASK = (1 << KEY_SHIFT) - 1


# The sampling rules of any sharded replay, whether its shards are objects in this process
# (ShardedReplay) or Ray actors answering prefetched calls (runtime.ray_replay.RemoteReplay).

def split_draw(rng: np.random.Generator, count: int, total_K: np.ndarray) -> np.ndarray:
    """How many of ``count`` draws each shard makes: multinomial over total priorities,
    so with proportional draws inside each shard every row has probability p_i / sum p."""
    return rng.multinomial(count, total_K / total_K.sum())


def global_ids(key: int, local_ids_B: np.ndarray) -> np.ndarray:
    """Batch indices: the shard's key in the high bits, its own write number below."""
    return (key << KEY_SHIFT) | local_ids_B


def route(indices_B: np.ndarray, td_abs_B: np.ndarray) -> Iterator[tuple[int, np.ndarray,
                                                                          np.ndarray]]:
    """(shard key, its own write numbers, their |td|) for each shard a batch drew from."""
    ids_B = np.asarray(indices_B, dtype=np.int64)
    td_B = np.asarray(td_abs_B)
    key_B = ids_B >> KEY_SHIFT
    for key in np.unique(key_B).tolist():
        mine_B = key_B == key
        yield key, ids_B[mine_B] & LOCAL_MASK, td_B[mine_B]


Guard = Callable[[int], AbstractContextManager[object]]


def unguarded(key: int) -> AbstractContextManager[object]:
    return nullcontext()


class ShardedReplay(Annealed):
    """``guard(key)``: held around every use of shard ``key``'s state (a lock, where
    several processes share the shards: runtime.shm_replay)."""

    prioritized = True

    def __init__(self, new_shard: Callable[[], PrioritizedReplay], rng: np.random.Generator,
                 num_shards: int, *, beta0: float = 0.4, beta_steps: int = 0) -> None:
        self.new_shard, self.rng = new_shard, rng
        self.shards: dict[int, PrioritizedReplay] = {}
        self.schedule = BetaSchedule(beta0, beta_steps)
        self.guard: Guard = unguarded
        self.lost = 0  # transitions added to shards since dropped
        self._next_key = 0
        self._turn = 0  # round-robin cursor for writes that name no shard
        for _ in range(num_shards):
            self.add_shard()

    # ------------------------------------------------------------ shards

    def add_shard(self) -> int:
        """Create an empty shard; returns its key (keys are never reused)."""
        key = self._next_key
        self._next_key += 1
        self.shards[key] = self.new_shard()
        return key

    def drop_shard(self, key: int) -> None:
        """Forget a shard (its writer died): its data is lost, sampling goes on."""
        self.lost += self.shards.pop(key).added

    @property
    def added(self) -> int:  # type: ignore[override]
        return self.lost + sum(s.added for s in self.shards.values())

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards.values())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards.values())

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.shards.values())

    # ------------------------------------------------------------ data path

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        """Write to shard ``shard`` (the writer's own). A writer naming no shard, or one
        that does not exist (more writers than shards), is mapped onto the live shards:
        round-robin per write, or by its number, so every write lands somewhere."""
        if shard not in self.shards:
            keys = sorted(self.shards)
            if not keys:
                raise RuntimeError("no shards to write to")
            if shard is None:
                shard, self._turn = keys[self._turn % len(keys)], self._turn + 1
            else:
                shard = keys[shard % len(keys)]
        with self.guard(shard):
            self.shards[shard].add(chunk, priorities_N)

    def sample(self, batch_size: int, beta: float | None = None) -> Batch:
        keys = [k for k, s in self.shards.items() if len(s)]
        total_K = np.array([self.shards[k].tree.total for k in keys])
        if not keys or not total_K.sum() > 0:
            raise RuntimeError("cannot sample from an empty replay")
        count_K = split_draw(self.rng, batch_size, total_K)
        parts, ids, prios = [], [], []
        for key, count in zip(keys, count_K, strict=True):
            if count == 0:
                continue
            shard = self.shards[key]
            with self.guard(key):
                slots_b, prio_b = shard.draw(int(count), self.rng)
                parts.append(shard.storage.get(slots_b))
                ids.append(global_ids(key, shard.id_N[slots_b]))
            prios.append(prio_b)
        min_prio = min(self.shards[k].tree.min_positive() for k in keys)
        weights_B = importance_weights(np.concatenate(prios), min_prio,
                                       self.beta if beta is None else beta)
        return Batch(Transitions.concat(parts), np.concatenate(ids), weights_B)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        """Route each update to its shard; updates for dropped shards are ignored."""
        for key, local_ids_B, td_B in route(indices_B, td_abs_B):
            if key in self.shards:
                with self.guard(key):
                    self.shards[key].update_priorities(local_ids_B, td_B)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, np.ndarray]:
        keys = sorted(self.shards)
        state = {"sharded.keys": np.array(keys, dtype=np.int64),
                 "sharded.meta": np.array([self._next_key, self._turn, self.added],
                                          dtype=np.int64),
                 "sharded.progress": self.schedule.state()}
        for key in keys:
            with self.guard(key):  # guarded, it may change once let go: copy it
                copy = np.array if self.guard is not unguarded else np.asarray
                state |= {f"shard{key}.{name}": copy(arr)
                          for name, arr in self.shards[key].state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        keys = [int(k) for k in state["sharded.keys"]]
        self._next_key, self._turn, added = (int(v) for v in state["sharded.meta"])
        self.schedule.load(state["sharded.progress"])
        self.shards = {key: self.shards[key] if key in self.shards else self.new_shard()
                       for key in keys}  # (an empty shard is falsy: no `or`)
        for key in keys:
            prefix = f"shard{key}."
            with self.guard(key):
                self.shards[key].load_state_dict(
                    {name[len(prefix):]: arr for name, arr in state.items()
                     if name.startswith(prefix)})
        self.lost = added - sum(s.added for s in self.shards.values())
