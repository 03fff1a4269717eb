"""The Ray backend: each actor a Ray actor (1 CPU, spread over the cluster's nodes by a
placement group); the learner in this driver process (or in a learner actor, see
``ray_learner``), and the replay beside it, as with the processes backend, or in shard
actors beside the actors (``runtime.replay_on``, see ``ray_replay``).

Chunks travel through the object store: the driver keeps IN_FLIGHT ``collect`` calls per
actor and takes whatever has arrived with ``ray.wait``; one call returns the chunks of about
CALL_S of collection, so small chunks do not pay a Ray call each. With shard actors an
actor writes its chunks to its shard itself and the call returns only their counts.
Parameters are one ``ray.put`` of a ParamSnapshot per version; every call carries the
newest ref (nested in a list, so Ray does not fetch it for the call) and an actor fetches
it only when the version moved.

Faults: an actor whose process or node is lost is restarted by Ray (``max_restarts``) in its
placement-group bundle, which Ray moves to a surviving node; the driver counts the loss and
bumps the slot's incarnation, so the new process builds its Actor with fresh seeds. Data
already delivered stays in that actor's shard. An exception raised by the actor's own code
is a bug, not a fault: it stops the run with a WorkerError carrying the remote traceback.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray
from ray.exceptions import ObjectLostError, RayActorError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qfleet.algos.program import ActorLearnerProgram
from qfleet.compute import pin_torch
from qfleet.config import ConfigError
from qfleet.replay import Transitions
from qfleet.roles import Actor, ActorLoop, Chunk, ParamSnapshot
from qfleet.runtime.base import LearnerSide, RayOptions, RoundReport
from qfleet.runtime.errors import count_restart
from qfleet.runtime.ray_common import LOCAL_SYSTEM_CONFIG as LOCAL_SYSTEM_CONFIG
from qfleet.runtime.ray_common import (
    POLL_S,
    Host,
    Slot,
    connect,
    first_line,
    in_bundle,
    place_bundles,
    signal_stacks,
    teardown,
    this_node,
)
from qfleet.runtime.ray_replay import RemoteReplay, RemoteShardHost, ShardStats

IN_FLIGHT = 2  # collect calls queued per actor: one running, one ready to start at once
CALL_S = 0.02  # an actor fills one collect call with chunks for about this long
MAX_CHUNKS_PER_CALL = 16


@dataclass(frozen=True)
class ActorSpec:
    """What an actor process needs: not the learner's network (it may live on a GPU)."""

    make_actor: Callable[[int, int], Actor]  # a closure: Ray ships it with cloudpickle
    chunk_steps: int
    sync_every: int
    # The shard actors' name prefix ("<prefix><index>"), or "": the driver holds the
    # replay. A name, not a handle: Ray warns a restartable actor built from a handle
    # may not restart.
    shard_prefix: str = ""


@dataclass
class Delivery:
    """A collect call's reply: the chunks (only their counts when the actor wrote their
    rows to its shard) and the shard's stats after the actor's previous write."""

    chunks: list[Chunk]
    shard_stats: ShardStats | None = None
    shard_lost: bool = False


class ActorHost(Host):
    """One actor slot in a Ray worker process. The Actor is built on the first call and
    rebuilt whenever the driver's incarnation for the slot moves (after a restart)."""

    def __init__(self, spec: ActorSpec, index: int) -> None:
        super().__init__()
        pin_torch(1)
        self.spec, self.index = spec, index
        self.loop: ActorLoop | None = None
        self.shard: Any = None
        self.writing: ray.ObjectRef | None = None  # the previous write to the shard

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def collect(self, incarnation: int, version: int,
                params: list[ray.ObjectRef]) -> Delivery:
        """Chunks for CALL_S of collection: a Ray call costs about a millisecond of CPU on
        each side, too much to pay per small chunk (CartPole chunks take a few ms)."""
        loop = self.loop
        if loop is None or loop.actor.incarnation != incarnation:
            if loop is not None:
                loop.actor.close()
            loop = self.loop = ActorLoop(self.spec.make_actor(self.index, incarnation),
                                         self.spec.chunk_steps, self.spec.sync_every)

        def fetch(held: int) -> ParamSnapshot | None:  # from the object store if it moved
            return None if held == version else ray.get(params[0])

        chunks: list[Chunk] = []
        t_end = time.monotonic() + CALL_S
        while not chunks or (time.monotonic() < t_end and len(chunks) < MAX_CHUNKS_PER_CALL):
            chunks.append(loop.step(fetch))
        return self._write(chunks) if self.spec.shard_prefix else Delivery(chunks)

    def _write(self, chunks: list[Chunk]) -> Delivery:
        """Send the rows to this actor's shard; wait for the previous write first, so a
        slow shard holds the actor back instead of piling up writes."""
        if self.shard is None:
            self.shard = ray.get_actor(f"{self.spec.shard_prefix}{self.index}")
        delivery = Delivery([replace(c, transitions=_no_rows(c.transitions), priorities_N=None)
                             for c in chunks])
        if self.writing is not None:
            try:
                delivery.shard_stats = ray.get(self.writing)
            except (RayActorError, ObjectLostError):  # restarted (empty) by Ray
                delivery.shard_lost = True
        prios = [c.priorities_N for c in chunks]
        self.writing = self.shard.add.remote(
            Transitions.concat([c.transitions for c in chunks]),
            None if any(p is None for p in prios) else np.concatenate(prios))  # type: ignore[arg-type]
        return delivery


def _no_rows(t: Transitions) -> Transitions:
    return t.map(lambda a: a[:0].copy())


RemoteHost = ray.remote(ActorHost)


@dataclass
class _Slot(Slot):
    calls: dict[ray.ObjectRef, int] = field(default_factory=dict)  # ref -> incarnation


class RayRunner(LearnerSide):
    def __init__(self, program: ActorLearnerProgram,
                 options: RayOptions | None = None) -> None:
        opts = options or RayOptions()
        self.started_ray, dashboard = connect(opts.address, program.num_actors)
        self.notes = [f"ray: dashboard at http://{dashboard}"] if dashboard else []
        self.restarts = [0] * program.num_actors
        self.shards: list[Any] = []
        try:
            self.pg = place_bundles(program.num_actors, "actors", opts.group_name)
            prefix = self._make_shards(program, opts)
            replay = None if not self.shards else RemoteReplay(
                self.shards, program.batch_size, opts.sample_requests,
                np.random.default_rng([0, 7919]))
            super().__init__(program, replay)
            # By value, not a ray.put ref: a restarted actor must not depend on an object
            # that lived on a lost node (Ray warns about exactly that for such actors).
            self.spec = ActorSpec(program.make_actor, program.schedule.chunk_steps,
                                  program.sync_every, prefix)
            self._publish()
            self.slots = [_Slot(i, 0, self._new_host(i)) for i in range(program.num_actors)]
            for slot in self.slots:
                self._fill(slot)
        except BaseException:
            self.close()  # nothing half-started is left on the cluster (or Ray running)
            raise

    # ------------------------------------------------------------ placement

    def _make_shards(self, program: ActorLearnerProgram, opts: RayOptions) -> str:
        """One shard actor per actor, in its bundle or on this node; returns their prefix."""
        if opts.replay_on == "learner":
            return ""
        make_shard = program.make_shard
        if make_shard is None:
            raise ConfigError(f"runtime.replay_on = {opts.replay_on!r}: this algorithm's "
                              "replay cannot be sharded; use 'learner'")
        prefix = f"qfleet-shard-{id(self):x}-{time.monotonic_ns():x}-"
        count = program.num_actors
        for i in range(count):
            where = this_node() if opts.replay_on == "learner_node" else \
                PlacementGroupSchedulingStrategy(placement_group=self.pg,
                                                 placement_group_bundle_index=i)
            self.shards.append(RemoteShardHost.options(
                num_cpus=0, name=f"{prefix}{i}", max_restarts=-1, max_task_retries=0,
                scheduling_strategy=where).remote(functools.partial(make_shard, i, count)))
        return prefix

    def _new_host(self, index: int) -> Any:
        return in_bundle(RemoteHost, self.pg, index, self.spec, index)

    def node_ids(self) -> list[str]:
        """The node each actor runs on now (asks the actors)."""
        return list(ray.get([s.handle.node_id.remote() for s in self.slots]))

    # ------------------------------------------------------------ data

    def _publish(self) -> None:
        self.params_version = self.learner.version
        self.params_ref = ray.put(self.learner.snapshot())

    def _fill(self, slot: _Slot) -> None:
        if slot.recovering:  # calls now would fail with "the actor is restarting": probe
            slot.start_probe(lambda handle: handle.node_id.remote())
            return
        while len(slot.calls) < IN_FLIGHT:
            ref = slot.handle.collect.remote(slot.incarnation, self.params_version,
                                             [self.params_ref])
            slot.calls[ref] = slot.incarnation

    def _tend(self, report: RoundReport) -> None:
        report.notes, self.notes = self.notes + report.notes, []  # e.g. the dashboard

    def _drain(self, report: RoundReport, wait: bool) -> None:
        """Take every reply that has arrived (waiting briefly if asked); a held-back
        learner queues no new calls, so idle actors wait."""
        owner = {ref: slot for slot in self.slots
                 for ref in [*slot.calls, *([slot.probe] if slot.probe else [])]}
        refs = list(owner)
        if wait and refs:
            ray.wait(refs, num_returns=1, timeout=POLL_S)
        elif wait:  # every actor is between probes: nothing to wait on, do not spin
            time.sleep(POLL_S)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
        for ref in ready:
            slot = owner[ref]
            if ref == slot.probe:
                slot.probed(self._new_host)
            else:
                self._take(slot, ref, slot.calls.pop(ref), report)
        for slot in self.slots:
            self._fill(slot)

    def _take(self, slot: _Slot, ref: ray.ObjectRef, tag: int, report: RoundReport) -> None:
        delivery: Delivery | None = slot.result(
            ref, tag, "actor", lambda err: self._lost(slot, err, report))
        if delivery is None:
            return
        if isinstance(self.replay, RemoteReplay):  # the rows are in the actor's shard
            if delivery.shard_lost:
                self.replay.lost(slot.index)
            self.replay.note(slot.index, delivery.shard_stats)
            for chunk in delivery.chunks:
                self.count(slot.index, chunk, report)
            return
        for chunk in delivery.chunks:
            self.write(slot.index, chunk, report)  # copies out of the object store

    def _lost(self, slot: _Slot, err: Exception, report: RoundReport) -> None:
        """The actor's process or node is gone: count it, wait for Ray's restart (or replace
        the actor if Ray will not restart it) and go on with fresh seeds."""
        count_restart(self.restarts, slot.index, "actor",
                      f"{type(err).__name__}: {first_line(err)}", report)
        slot.lose(err, self._new_host)

    def describe(self) -> str:
        text = super().describe()
        if isinstance(self.replay, RemoteReplay):
            text += f" in {len(self.shards)} shard actors, {self.replay.requests} " \
                "batches requested ahead"
        return text

    # ------------------------------------------------------------ checkpoint state

    def _incarnations(self) -> list[int]:
        return [s.incarnation for s in self.slots]

    def dump_stacks(self, actors: list[int]) -> str:
        return signal_stacks(list(self.slots), actors, "actor")

    def _reincarnate(self, i: int, incarnation: int) -> None:
        slot = self.slots[i]  # its calls in flight belong to the old run: dropped
        slot.incarnation = incarnation
        slot.calls.clear()
        if not slot.recovering:
            self._fill(slot)

    def close(self) -> None:
        slots: list[_Slot] = self.__dict__.pop("slots", [])
        pg: PlacementGroup | None = self.__dict__.pop("pg", None)
        teardown([s.handle for s in slots] + self.__dict__.pop("shards", []), pg,
                 self.started_ray)
        self.started_ray = False

