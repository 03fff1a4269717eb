"""Ape-X replay shards as Ray actors (``runtime.replay_on = "actors"`` or "learner_node").

Each actor owns one shard (a ``ShardHost`` actor): beside the actor in its placement-group
bundle ("actors"), so chunks go through the node's own object store and never over the
network, or on the learner's node ("learner_node"). The actor writes its chunks to the
shard itself; the learner only hears the shard's stats (size, total priority, min priority).

The learner reads through ``RemoteReplay``, a Replay whose ``sample`` hands out rows that
were asked for ``runtime.sample_requests`` batches ahead, so the network round trip
overlaps the learner's compute. Rows are asked for in bulk: split over the shards by a
multinomial over their total priorities, one call per shard, each shard drawing in
proportion to priority, so every row is drawn with probability p_i / sum over all shards,
as from one buffer over the union (``ShardedReplay``'s rule, on totals one reply old).
IS weights use the union's min priority. Priorities go back without waiting, with the
shard's next draw (or on their own once a second batch of them is due); a shard applies
one caller's calls in order, so they land before any later draw.

A lost shard (its node died) restarts empty; batch indices carry the shard's generation,
so priority updates meant for the old shard's rows are dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError

from qfleet.replay import Batch, PrioritizedReplay, Replay, Transitions
from qfleet.replay.prioritized import BetaSchedule, importance_weights
from qfleet.replay.sharded import global_ids, route, split_draw
from qfleet.runtime.errors import WorkerError

SAMPLE_TIMEOUT_S = 60.0  # a batch request that takes longer means the shards are stuck


@dataclass(frozen=True)
class ShardStats:
    size: int
    total: float  # sum of priorities; the size for a uniform shard
    min_prio: float  # smallest positive priority (inf when empty or uniform)
    added: int  # transitions ever written (beta anneals over their sum)


class ShardHost:
    """One replay shard in a Ray actor."""

    def __init__(self, make_shard: Callable[[], Replay]) -> None:
        self.replay = make_shard()
        self.added = 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def stats(self) -> ShardStats:
        replay, size = self.replay, len(self.replay)
        if isinstance(replay, PrioritizedReplay):
            total = float(replay.tree.total)
            min_prio = replay.tree.min_positive() if size else float("inf")
            return ShardStats(size, total, min_prio, self.added)
        return ShardStats(size, float(size), float("inf"), self.added)

    def describe(self) -> tuple[int, int, float, int]:
        """(capacity, bytes, beta0, beta_steps); beta0 = -1 for a uniform shard."""
        replay = self.replay
        if isinstance(replay, PrioritizedReplay):
            schedule = replay.schedule
            return replay.capacity, replay.nbytes, schedule.beta0, schedule.beta_steps
        return replay.capacity, replay.nbytes, -1.0, 0

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None) -> ShardStats:
        self.replay.add(chunk, priorities_N)
        self.added += len(chunk)
        return self.stats()

    def sample(self, count: int, updates: list[tuple[np.ndarray, np.ndarray]] | None = None
               ) -> tuple[Transitions | None, np.ndarray, np.ndarray | None, ShardStats]:
        """(rows, their write numbers, their priorities or None if uniform, stats); rows
        None when the shard is empty (it was just restarted). ``updates``: priority
        updates (ids, |td|) to apply first; they ride along to save a call."""
        for ids_B, td_abs_B in updates or []:
            self.replay.update_priorities(ids_B, td_abs_B)
        replay = self.replay
        if len(replay) == 0:
            return None, np.zeros(0, np.int64), None, self.stats()
        if isinstance(replay, PrioritizedReplay):
            slots_B, prio_B = replay.draw(count, replay.rng)
            return replay.storage.get(slots_B), replay.id_N[slots_B], prio_B, self.stats()
        batch = replay.sample(count)
        return batch.data, batch.indices_B, None, self.stats()

    def update_priorities(self, updates: list[tuple[np.ndarray, np.ndarray]]) -> None:
        for ids_B, td_abs_B in updates:
            self.replay.update_priorities(ids_B, td_abs_B)

    def state(self) -> dict[str, np.ndarray]:
        return self.replay.state_dict()

    def restore(self, state: dict[str, np.ndarray]) -> None:
        self.replay.load_state_dict(state)
        self.added = int(state["prio.added"][0]) if "prio.added" in state else len(self.replay)


RemoteShardHost = ray.remote(ShardHost)


@dataclass
class _Request:
    shard: int
    generation: int
    ref: ray.ObjectRef


@dataclass
class _Rows:
    """Rows a shard sent: their data, global indices and priorities (ones if uniform)."""

    data: Transitions
    ids_B: np.ndarray
    prio_B: np.ndarray

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        """One set of rows (a copy, so also out of the read-only object store)."""
        return _Rows(Transitions.concat([p.data for p in parts]),
                     np.concatenate([p.ids_B for p in parts]),
                     np.concatenate([p.prio_B for p in parts]))

    def take(self, rows: slice | np.ndarray) -> _Rows:
        return _Rows(self.data.rows(rows), self.ids_B[rows], self.prio_B[rows])


class RemoteReplay:
    """The learner's view of the shard actors (the Replay protocol), with prefetching."""

    def __init__(self, handles: list[Any], batch_size: int, requests: int,
                 rng: np.random.Generator) -> None:
        self.handles, self.batch_size, self.requests, self.rng = handles, batch_size, \
            requests, rng
        info = ray.get([h.describe.remote() for h in handles])
        self._capacity = sum(i[0] for i in info)
        self._nbytes = sum(i[1] for i in info)
        self.prioritized = info[0][2] >= 0
        self.schedule = BetaSchedule(max(info[0][2], 0.0), info[0][3])
        self.stats: list[ShardStats | None] = [None] * len(handles)
        self.generation = [0] * len(handles)
        self.pending: deque[list[_Request]] = deque()  # draws asked for, oldest first
        # Priority updates per shard not sent yet: they go with the shard's next draw.
        self.updates: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in handles]
        self.ready: list[_Rows] = []  # arrived, not handed out yet
        self.waited_s = 0.0  # time sample() blocked on the network (the prefetch's miss)

    # ------------------------------------------------------------ what the runner tells

    def note(self, shard: int, stats: ShardStats | None) -> None:
        """Stats of a shard, from its writer's reply (None: the writer saw it lost)."""
        self.stats[shard] = stats

    def lost(self, shard: int) -> None:
        """The shard's node died: it comes back empty; its rows' updates are now void."""
        self.generation[shard] += 1
        self.stats[shard] = None
        self.updates[shard] = []

    # ------------------------------------------------------------ Replay protocol

    def __len__(self) -> int:
        return sum(s.size for s in self.stats if s is not None)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def beta(self) -> float:
        return self.schedule.beta(sum(s.added for s in self.stats if s is not None))

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        raise RuntimeError("actors write to their shard actors directly")

    def sample(self, batch_size: int) -> Batch:
        """``batch_size`` rows from a draw asked for before this call; then the draws
        ahead are topped up, so ``sample_requests`` batches stay on their way."""
        ahead = -(-self.requests * self.batch_size // batch_size)  # draws of this size
        rows = self._take(batch_size, ahead)
        self._ask(batch_size, ahead)
        if not self.prioritized:
            return Batch(rows.data, rows.ids_B, None)
        known = [s.min_prio for s in self.stats if s is not None and s.size]
        min_prio = min([*known, float(rows.prio_B.min())])
        return Batch(rows.data, rows.ids_B, importance_weights(rows.prio_B, min_prio,
                                                               self.beta))

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        """Route each row's |td| to its shard, unless that shard was lost since the draw."""
        for key, local_ids_B, td_B in route(indices_B, td_abs_B):
            shard, generation = key % len(self.handles), key // len(self.handles)
            if generation == self.generation[shard]:
                self.updates[shard].append((local_ids_B, td_B.astype(np.float32)))
        self.flush(more_than=1)  # the rest go with the next draw's calls

    def flush(self, more_than: int = 0) -> None:
        """Send each shard's priority updates that wait for a draw, if over ``more_than``."""
        for shard, updates in enumerate(self.updates):
            if len(updates) > more_than:
                self.handles[shard].update_priorities.remote(updates)
                self.updates[shard] = []

    # ------------------------------------------------------------ prefetching

    def _ask(self, n: int, draws: int) -> None:
        """Until ``draws`` draws are on their way: each ``n`` rows split over the shards
        by a multinomial over their totals, one call per shard."""
        totals_K = np.array([s.total if s is not None else 0.0 for s in self.stats])
        while len(self.pending) < draws and totals_K.sum() > 0:
            count_K = split_draw(self.rng, n, totals_K)
            draw = []
            for k in np.flatnonzero(count_K).tolist():
                updates, self.updates[k] = self.updates[k], []
                ref = self.handles[k].sample.remote(int(count_K[k]), updates)
                draw.append(_Request(k, self.generation[k], ref))
            self.pending.append(draw)

    def _take(self, n: int, ahead: int) -> _Rows:
        """``n`` rows: the oldest draws' (waiting for them), asking for more if none."""
        for _ in range(100):
            if sum(len(r.ids_B) for r in self.ready) >= n:
                break
            self._ask(n, ahead + 1)
            if not self.pending:
                self._wait_for_rows()
                self._ask(n, ahead + 1)
            self._receive_draw(self.pending.popleft())
        else:
            raise WorkerError("replay shards returned too few rows in 100 draws")
        if len(self.ready[0].ids_B) == n:  # the usual case: one draw of this size
            return self.ready.pop(0)
        every = _Rows.concat(self.ready)
        rest = every.take(slice(n, None))
        self.ready = [rest] if len(rest.ids_B) else []
        return every.take(slice(0, n))

    def _receive_draw(self, draw: list[_Request]) -> None:
        """Wait for every shard's part of a draw; shuffled, since parts come by shard."""
        parts: list[_Rows] = []
        for req in draw:
            self._receive(req, parts)
        if parts:
            rows = _Rows.concat(parts)
            self.ready.append(rows.take(self.rng.permutation(len(rows.ids_B))))

    def _receive(self, req: _Request, parts: list[_Rows]) -> None:
        """Wait for one shard's rows (none from a shard lost or emptied since)."""
        t0 = time.perf_counter()
        try:
            rows, ids_B, prio_B, stats = ray.get(req.ref, timeout=SAMPLE_TIMEOUT_S)
        except (RayActorError, ObjectLostError):
            if req.generation == self.generation[req.shard]:
                self.lost(req.shard)
            return
        except GetTimeoutError:
            raise WorkerError(f"replay shard {req.shard} sent no rows in "
                              f"{SAMPLE_TIMEOUT_S:.0f} s") from None
        finally:
            self.waited_s += time.perf_counter() - t0
        current = req.generation == self.generation[req.shard]
        if current:
            self.stats[req.shard] = stats
        if rows is not None and current:
            key = req.shard + len(self.handles) * req.generation
            parts.append(_Rows(rows, global_ids(key, ids_B),
                               np.ones(len(ids_B)) if prio_B is None else prio_B))

    def _forget_asked(self) -> None:
        self.pending.clear()
        self.ready = []
        self.updates = [[] for _ in self.handles]

    def _wait_for_rows(self) -> None:
        """Until a shard holds rows: the actors' first writes may still be on their way
        when the learner's first update is due."""
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        self._refresh()
        while not any(s is not None and s.size for s in self.stats):
            if time.monotonic() > deadline:
                raise WorkerError(f"every replay shard was still empty after "
                                  f"{SAMPLE_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
            self._refresh()

    def _refresh(self) -> None:
        """Ask every shard for its stats; one that is restarting (its node died) is lost."""
        refs = [h.stats.remote() for h in self.handles]
        for k, ref in enumerate(refs):
            try:
                self.stats[k] = ray.get(ref, timeout=SAMPLE_TIMEOUT_S)
            except (RayActorError, ObjectLostError):
                self.lost(k)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, np.ndarray]:
        """ShardedReplay's layout, so a checkpoint resumes with the replay anywhere."""
        self.flush()  # the checkpoint holds every priority written so far
        self._forget_asked()  # draws after a checkpoint come after its priorities
        states = [self._state_of(k) for k in range(len(self.handles))]
        added = sum(int(s["prio.added"][0]) for s in states if "prio.added" in s)
        state = {"sharded.keys": np.arange(len(self.handles), dtype=np.int64),
                 "sharded.meta": np.array([len(self.handles), 0, added], dtype=np.int64),
                 "sharded.progress": self.schedule.state()}
        for k, shard_state in enumerate(states):
            state |= {f"shard{k}.{name}": arr for name, arr in shard_state.items()}
        return state

    def _state_of(self, shard: int) -> dict[str, np.ndarray]:
        """A shard's arrays; a shard that Ray is restarting answers once it is back (empty:
        what it held was lost with its node)."""
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        while True:
            try:
                state: dict[str, np.ndarray] = ray.get(self.handles[shard].state.remote(),
                                                       timeout=SAMPLE_TIMEOUT_S)
                return state
            except (RayActorError, ObjectLostError):
                self.lost(shard)
                if time.monotonic() > deadline:
                    raise WorkerError(f"replay shard {shard} did not come back in "
                                      f"{SAMPLE_TIMEOUT_S:.0f} s to be checkpointed") from None
                time.sleep(0.2)

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        keys = [int(k) for k in state["sharded.keys"]]
        if len(keys) != len(self.handles):
            raise ValueError(f"the checkpoint's replay has {len(keys)} shards; this run "
                             f"has {len(self.handles)}")
        self.schedule.load(state["sharded.progress"])
        self._forget_asked()
        refs = []
        for k, key in enumerate(keys):
            prefix = f"shard{key}."
            part = {n[len(prefix):]: a for n, a in state.items() if n.startswith(prefix)}
            refs.append(self.handles[k].restore.remote(part))
        ray.get(refs)
        self._refresh()
