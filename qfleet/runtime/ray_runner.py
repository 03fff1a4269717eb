"""The Ray backend: each actor a Ray actor (1 CPU, spread over the cluster's nodes by a
placement group), learner and replay in this driver process, as with the processes backend.

Chunks travel through the object store: the driver keeps IN_FLIGHT ``collect`` calls per
actor and takes whatever has arrived with ``ray.wait``; one call returns the chunks of about
CALL_S of collection, so small chunks do not pay a Ray call each. Parameters are one
``ray.put`` of a ParamSnapshot per version; every call carries the newest ref (nested in a
list, so Ray does not fetch it for the call) and an actor fetches it only when the version
moved.

Faults: an actor whose process or node is lost is restarted by Ray (``max_restarts``) in its
placement-group bundle, which Ray moves to a surviving node; the driver counts the loss and
bumps the slot's incarnation, so the new process builds its Actor with fresh seeds. Data
already delivered stays in that actor's shard. An exception raised by the actor's own code
is a bug, not a fault: it stops the run with a WorkerError carrying the remote traceback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, ObjectLostError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import ConfigError
from qfleet.roles import Actor, Chunk, ParamSnapshot
from qfleet.runtime.base import LearnerSide, RoundReport
from qfleet.runtime.processes import MAX_RESTARTS, WorkerError

IN_FLIGHT = 2  # collect calls queued per actor: one running, one ready to start at once
POLL_S = 0.05  # how long the learner waits for data when it is ahead of the actors
PLACEMENT_TIMEOUT_S = 120.0
PROBE_S = 0.5  # between probes of an actor that Ray is restarting
CALL_S = 0.02  # an actor fills one collect call with chunks for about this long
MAX_CHUNKS_PER_CALL = 16
# Ray starts workers at nice 15, so on a machine shared with anything else the actors get
# a fraction of the CPU the processes backend's actors (nice 0) get. Ours are the workload.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


@dataclass(frozen=True)
class ActorSpec:
    """What an actor process needs: not the learner's network (it may live on a GPU)."""

    make_actor: Callable[[int, int], Actor]  # a closure: Ray ships it with cloudpickle
    chunk_steps: int
    sync_every: int


class ActorHost:
    """One actor slot in a Ray worker process. The Actor is built on the first call and
    rebuilt whenever the driver's incarnation for the slot moves (after a restart)."""

    def __init__(self, spec: ActorSpec, index: int) -> None:
        torch.set_num_threads(1)
        self.spec, self.index = spec, index
        self.actor: Actor | None = None
        self.since_sync = 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def collect(self, incarnation: int, version: int,
                params: list[ray.ObjectRef]) -> list[Chunk]:
        """Chunks for CALL_S of collection: a Ray call costs about a millisecond of CPU on
        each side, too much to pay per small chunk (CartPole chunks take a few ms)."""
        actor = self.actor
        if actor is None or actor.incarnation != incarnation:
            if actor is not None:
                actor.close()
            actor = self.actor = self.spec.make_actor(self.index, incarnation)
            self.since_sync = self.spec.sync_every
        chunks: list[Chunk] = []
        t_end = time.monotonic() + CALL_S
        while not chunks or (time.monotonic() < t_end and len(chunks) < MAX_CHUNKS_PER_CALL):
            if self.since_sync >= self.spec.sync_every:
                if version != actor.version:  # fetch only when the learner moved on
                    snapshot: ParamSnapshot = ray.get(params[0])
                    actor.set_params(snapshot)
                self.since_sync = 0
            chunks.append(actor.collect(self.spec.chunk_steps))
            self.since_sync += chunks[-1].env_steps
        return chunks


RemoteHost = ray.remote(ActorHost)


@dataclass
class _Slot:
    index: int
    incarnation: int
    handle: Any  # ray.actor.ActorHandle
    calls: dict[ray.ObjectRef, int] = field(default_factory=dict)  # ref -> incarnation
    recovering: bool = False  # lost; no collect calls until a probe call answers
    probe: ray.ObjectRef | None = None
    probe_at: float = 0.0  # monotonic time of the next probe


def connect(address: str, num_actors: int) -> tuple[bool, str | None]:
    """ray.init for runtime.address; (whether this call started/joined Ray, dashboard URL)."""
    if ray.is_initialized():  # the caller (a test, a notebook) already chose the cluster
        return False, None
    if address == "local":
        # As many CPUs as the machine has, at least one per actor: the processes backend
        # oversubscribes the same way, and a placement group that cannot fit would hang.
        ctx = ray.init(num_cpus=max(os.cpu_count() or 1, num_actors), include_dashboard=None,
                       _system_config=LOCAL_SYSTEM_CONFIG)
    else:
        ctx = ray.init(address=address)
    return True, getattr(ctx, "dashboard_url", None) or None


class RayRunner(LearnerSide):
    def __init__(self, program: ActorLearnerProgram, address: str = "local") -> None:
        super().__init__(program)
        self.started_ray, dashboard = connect(address, program.num_actors)
        self.notes = [f"ray: dashboard at http://{dashboard}"] if dashboard else []
        # By value, not a ray.put ref: a restarted actor must not depend on an object that
        # lived on a lost node (Ray warns about exactly that for actors with max_restarts).
        self.spec = ActorSpec(program.make_actor, program.schedule.chunk_steps,
                              program.sync_every)
        self.restarts = [0] * program.num_actors
        try:
            self.pg = self._place(program.num_actors)
            self._publish()
            self.slots = [_Slot(i, 0, self._new_host(i)) for i in range(program.num_actors)]
            for slot in self.slots:
                self._fill(slot)
        except BaseException:
            self.close()  # nothing half-started is left on the cluster (or Ray running)
            raise

    # ------------------------------------------------------------ placement

    def _place(self, count: int) -> PlacementGroup:
        """One 1-CPU bundle per actor, SPREAD: on distinct nodes where the cluster allows."""
        pg = placement_group([{"CPU": 1}] * count, strategy="SPREAD")
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(pg)
            cpus = ray.cluster_resources().get("CPU", 0)
            raise ConfigError(f"actors.count = {count}: the Ray cluster could not place "
                              f"{count} actors of 1 CPU each in {PLACEMENT_TIMEOUT_S:.0f} s "
                              f"(it has {cpus:g} CPUs); add nodes or lower actors.count")
        return pg

    def _new_host(self, index: int) -> Any:
        # Ray restarts a lost actor in its bundle (moved to a live node if its node died);
        # its calls are not retried (max_task_retries=0): the driver decides what is lost.
        return RemoteHost.options(
            num_cpus=1, max_restarts=-1, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=index),
        ).remote(self.spec, index)

    def node_ids(self) -> list[str]:
        """The node each actor runs on now (asks the actors)."""
        return list(ray.get([s.handle.node_id.remote() for s in self.slots]))

    # ------------------------------------------------------------ data

    def _publish(self) -> None:
        self.params_version = self.learner.version
        self.params_ref = ray.put(self.learner.snapshot())

    def _fill(self, slot: _Slot) -> None:
        if slot.recovering:  # calls now would fail with "the actor is restarting": probe
            if slot.probe is None and time.monotonic() >= slot.probe_at:
                slot.probe = slot.handle.node_id.remote()
            return
        while len(slot.calls) < IN_FLIGHT:
            ref = slot.handle.collect.remote(slot.incarnation, self.params_version,
                                             [self.params_ref])
            slot.calls[ref] = slot.incarnation

    def step(self) -> RoundReport:
        report, per_round = RoundReport(), self.program.schedule.updates_per_round
        report.notes, self.notes = self.notes, []
        owed = self.updates_owed()
        # Backpressure: while the learner owes more than a round it takes no chunks and
        # queues no new calls, so actors idle instead of outrunning the replay ratio.
        if owed <= per_round:
            self._drain(report, wait=owed == 0)
        stats = self.train(min(self.updates_owed(), per_round))
        report.add_updates(stats)
        if stats:
            self._publish()
        return report

    def _drain(self, report: RoundReport, wait: bool) -> None:
        """Write every chunk that has arrived into replay (waiting briefly if asked)."""
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
                self._probed(slot, ref)
            else:
                self._take(slot, ref, slot.calls.pop(ref), report)
        for slot in self.slots:
            self._fill(slot)

    def _take(self, slot: _Slot, ref: ray.ObjectRef, tag: int, report: RoundReport) -> None:
        try:
            chunks: list[Chunk] = ray.get(ref)
        except RayTaskError as err:  # the actor's own code raised: a bug, stop the run
            raise WorkerError(f"actor {slot.index} (incarnation {tag}) failed:\n{err}") \
                from None
        except (RayActorError, ObjectLostError) as err:
            if tag == slot.incarnation:  # else the loss this call reports is counted
                self._lost(slot, err, report)
            return
        for chunk in chunks:
            self.write(slot.index, chunk, report)  # copies out of the object store

    def _lost(self, slot: _Slot, err: Exception, report: RoundReport) -> None:
        """The actor's process or node is gone: count it, wait for Ray's restart (or replace
        the actor if Ray will not restart it) and go on with fresh seeds."""
        i = slot.index
        self.restarts[i] += 1
        if self.restarts[i] > MAX_RESTARTS:
            raise WorkerError(f"actor {i} was lost {self.restarts[i]} times; giving up "
                              f"(last: {type(err).__name__}: {err})")
        slot.incarnation += 1
        slot.recovering, slot.probe_at = True, 0.0
        if isinstance(err, ActorDiedError):
            self._replace(slot)
        report.actor_restarts += 1
        first_line = (str(err).strip().splitlines() or [""])[0]
        report.notes.append(f"actor {i} lost ({type(err).__name__}: {first_line[:100]}); "
                            "restarting it with fresh seeds")

    def _probed(self, slot: _Slot, ref: ray.ObjectRef) -> None:
        slot.probe = None
        try:
            ray.get(ref)
        except RayActorError as err:  # still restarting (or gone for good): ask again later
            slot.probe_at = time.monotonic() + PROBE_S
            if isinstance(err, ActorDiedError):
                self._replace(slot)
            return
        slot.recovering = False

    def _replace(self, slot: _Slot) -> None:
        """A new Ray actor for the slot: Ray will not restart the old one (dead for good)."""
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self._new_host(slot.index)

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, Any]]:
        tensors, meta, replay = super().state(with_replay)
        meta["actors"] = [{"incarnation": s.incarnation} for s in self.slots]
        return tensors, meta, replay

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, Any]) -> None:
        super().restore(tensors, meta, replay)
        self._publish()
        # Fresh incarnations, so a resumed run does not replay the seeds of the first one;
        # chunks already in flight belong to the old run and are dropped.
        for slot, saved in zip(self.slots, meta.get("actors", []), strict=False):
            slot.incarnation = saved["incarnation"] + 1
            slot.calls.clear()
            if not slot.recovering:
                self._fill(slot)

    def close(self) -> None:
        try:
            for slot in self.__dict__.pop("slots", []):
                ray.kill(slot.handle, no_restart=True)
            pg: PlacementGroup | None = self.__dict__.pop("pg", None)
            if pg is not None:
                remove_placement_group(pg)
        except RayError:  # the cluster is already gone: nothing left there to clean up
            pass
        finally:
            if self.started_ray:
                ray.shutdown()
                self.started_ray = False
