"""The Ray backend for gradient schemes (Gorila, batch-synchronous groups, A3C, A2C).

Each gradient worker is a Ray actor (1 CPU, spread over the nodes by a placement group)
holding a GradientWorker (``ray_grad_hosts.GradHost``); this driver holds the global side:
the aggregator (global model, its one optimizer), the gate and the counters. Parameters are
one ``ray.put`` of a ParamSnapshot per global version; a worker fetches it when the version
moved and it is due a pull (``algo.sync_every``).

Sync (group_size == W): the workers form a ``torch.distributed`` process group (gloo),
set up through Ray: rank 0 names its node's IP and a free port, every member joins, each
seated on the same replica of the global model and optimizer. Each call runs several
rounds; in each the members all_gather their gradients and every one takes the same step
on its own replica (``ray_sync``), bit-identical to the inline run. The driver only counts
what the members report, follows the model rank 0 hands back for its evaluations, and
takes a replica for checkpoints. A lost worker breaks the group: the driver counts it, Ray
restarts it, and the group is rebuilt (destroy, then init on a new port) from the newest
live replica with the live workers (``algo.on_worker_loss = "proceed"``) or once the
replacement is up ("wait"). Collectives and rendezvous have a timeout, so nothing waits
forever on a member that is gone.

Async / grouped: no collective. The driver keeps calls in flight per worker (two for
async; one for a group member, reissued once its group stepped, which is the barrier),
takes what arrived with ``ray.wait`` and feeds the gate exactly as the processes backend
does. Hogwild (A3C) needs memory shared by all workers, which nodes do not have: on Ray it
runs as async through the driver's aggregator (said once, in the first step's notes).

replay.scope shared/sharded: the replay lives in one Ray actor (``ReplayHost``) on the
driver's node; workers reach it through a client, and checkpoints ask it for its state.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import (
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
)
from ray.util.placement_group import PlacementGroup

from qfleet.algos.program import GradientProgram
from qfleet.runtime import ray_common as rc
from qfleet.runtime.allreduce import as_replica, replica_tensors
from qfleet.runtime.base import RayOptions, RoundReport
from qfleet.runtime.errors import count_restart
from qfleet.runtime.global_side import GlobalSide
from qfleet.runtime.ray_grad_hosts import GradHost, HostSpec, ReplayHost, Sent
from qfleet.runtime.ray_sync import Rounds
from qfleet.runtime.reports import budget_spent

COLLECTIVE_TIMEOUT_S = 30.0  # a collective or rendezvous waiting longer has lost a member
CALL_TIMEOUT_S = 30.0  # for the driver's own small calls (a free port, a replay's state)
# Sync: a call runs as many rounds as take about SYNC_CALL_S (measured by rank 0). Each
# call costs every member 15-20 ms of Ray round trip and driver loop (measured): 0.05 s
# calls gave 96 updates/s, 0.2 s calls 128. The driver counts and follows the model once
# per call.
SYNC_CALL_S, MAX_ROUNDS = 0.2, 256
HOGWILD_NOTE = ("a3c hogwild: Ray workers on different nodes cannot share memory, so each "
                "gradient goes to the driver's aggregator and is applied on arrival (async)")

RemoteGradHost = ray.remote(GradHost)
RemoteReplayHost = ray.remote(ReplayHost)


@dataclass
class _Slot(rc.Slot):
    calls: dict[ray.ObjectRef, int] = field(default_factory=dict)  # async: ref -> incarnation


@dataclass
class _Call:
    """One member's call in a sync round (a step, or joining a new process group)."""

    slot: _Slot
    incarnation: int
    rank: int
    done: bool = False
    result: Rounds | Sent | str | None = None  # None: the actor was lost


class RayGradientRunner(GlobalSide):
    def __init__(self, program: GradientProgram, options: RayOptions | None = None,
                 collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
        opts = options or RayOptions()
        # The shared replay lives in a ReplayHost actor, not in this process.
        super().__init__(dataclasses.replace(program, make_shared_replay=None))
        self.program = program
        self.started_ray, dashboard = rc.connect(opts.address, program.num_workers)
        self.notes = [f"ray: dashboard at http://{dashboard}"] if dashboard else []
        if program.hogwild:
            self.notes.append(HOGWILD_NOTE)
        self.collective = not program.hogwild and program.num_workers > 1 and \
            program.group_size == program.num_workers
        self.restarts = [0] * program.num_workers
        self.group: list[int] = []  # sync: the process group's members, in rank order
        self.round: dict[ray.ObjectRef, _Call] = {}
        self.round_members: list[int] | None = None  # an init round's members; None: a step
        self.per_call = 1  # sync: rounds per call
        self.own_is_newest = True  # sync: the driver's model and optimizer start a group
        self.frozen = False
        try:
            self.replay_name = f"qfleet-replay-{uuid.uuid4().hex[:12]}"
            self.replay_host = self._new_replay_host()
            prioritized = self.replay_host is not None and \
                ray.get(self.replay_host.describe.remote(), timeout=CALL_TIMEOUT_S)[1]
            self.spec = HostSpec(program.make_worker, program.make_aggregator,
                                 program.sync_every, collective_timeout_s,
                                 "" if self.replay_host is None else self.replay_name,
                                 prioritized, program.total_env_steps,
                                 program.wait_for_restart)
            self.pg = rc.place_bundles(program.num_workers, "gradient workers", opts.group_name)
            self._put_params()
            self.slots = [_Slot(i, 0, self._new_host(i)) for i in range(program.num_workers)]
        except BaseException:
            self.close()  # nothing half-started is left on the cluster (or Ray running)
            raise

    def _new_replay_host(self) -> Any:
        """The shared replay (scope shared/sharded) in a Ray actor next to the driver: it
        lives and fails with the driver, like the processes backend's, and takes no CPU
        from the workers' bundles."""
        if self.program.make_shared_replay is None:
            return None
        return RemoteReplayHost.options(num_cpus=0, name=self.replay_name,
                                        scheduling_strategy=rc.this_node()) \
            .remote(self.program.make_shared_replay)

    def _new_host(self, index: int) -> Any:
        return rc.in_bundle(RemoteGradHost, self.pg, index, self.spec, index)

    def worker_info(self) -> list[dict[str, Any]]:
        """Each worker's node and process-group membership (asks the workers)."""
        return list(ray.get([s.handle.info.remote() for s in self.slots],
                            timeout=CALL_TIMEOUT_S))

    def _put_params(self) -> None:
        """Publish lazily: one object per version, put before the next calls go out."""
        self.params_version = self.aggregator.version
        self.params_ref = ray.put(self.aggregator.snapshot())

    def step(self) -> RoundReport:
        report = RoundReport()
        report.notes, self.notes = self.notes, []
        self.clock_in()
        self._check_probes()
        if self.collective:
            self._sync_round(report)
        else:
            self._async_drain(report)
        self.clock_out(report)
        return report

    # ------------------------------------------------------------ async and grouped

    def _async_drain(self, report: RoundReport) -> None:
        owner = {ref: slot for slot in self.slots for ref in slot.calls}
        if owner:
            ray.wait(list(owner), num_returns=1, timeout=rc.POLL_S)
            ready, _ = ray.wait(list(owner), num_returns=len(owner), timeout=0)
        else:  # every worker is between probes (or not started yet): do not spin
            ready = []
            if any(s.recovering for s in self.slots):
                time.sleep(rc.POLL_S)
        for ref in ready:
            slot = owner[ref]
            sent = self._get(slot, ref, slot.calls.pop(ref), report)
            if isinstance(sent, Sent):
                self._deliver(slot, sent, report)
        if self.aggregator.version != self.params_version:
            self._put_params()  # before new calls, so they carry the newest parameters
        for slot in self.slots:
            self._fill(slot)

    def _fill(self, slot: _Slot) -> None:
        """Two calls in flight for async; one for a group member, and only once its last
        gradient left the gate, so it computes the next one on the group's new step."""
        grouped = self.program.group_size > 1 and not self.program.hogwild
        limit = 1 if grouped else 2
        if slot.recovering or (grouped and slot.index in self.gate.pending):
            return
        while len(slot.calls) < limit:
            ref = slot.handle.work.remote(slot.incarnation, self.params_version,
                                          [self.params_ref])
            slot.calls[ref] = slot.incarnation

    def _deliver(self, slot: _Slot, sent: Sent, report: RoundReport) -> None:
        for k, grad in enumerate(sent.works):
            if k == len(sent.works) - 1 and sent.grads_P is not None:
                grad.grads_P = torch.from_numpy(sent.grads_P.copy())  # out of the store
            self.take(grad, True, report)

    # ------------------------------------------------------------ sync: the collective

    def _sync_round(self, report: RoundReport) -> None:
        if not self.round:
            self._start_round(report)
        if not self.round:
            time.sleep(rc.POLL_S)  # waiting for a replacement: do not spin
            return
        waiting = [ref for ref, call in self.round.items() if not call.done]
        ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=rc.POLL_S)
        for ref in ready:
            call = self.round[ref]
            call.result = self._get(call.slot, ref, call.incarnation, report)
            call.done = True
        if all(call.done for call in self.round.values()):
            calls, members, self.round = list(self.round.values()), self.round_members, {}
            if members is None:
                self._finish_rounds(calls, report)
            else:
                failed = [c.result for c in calls if c.result]
                self.group = members if all(c.result == "" for c in calls) else []
                if failed:
                    report.notes.append(f"ray: process group not formed ({failed[0]}); "
                                        "trying again")

    def _start_round(self, report: RoundReport) -> None:
        ready = [s.index for s in self.slots if not s.recovering]
        budget = self.program.total_env_steps
        if self.frozen or not ready or budget_spent(budget, self.env_steps) or \
                (self.program.wait_for_restart and len(ready) < len(self.slots)):
            return
        if ready != self.group:
            self._join_group(ready, report)
            return
        self.round_members = None
        for rank, i in enumerate(self.group):
            slot = self.slots[i]
            ref = slot.handle.sync_rounds.remote(slot.incarnation, self.per_call)
            self.round[ref] = _Call(slot, slot.incarnation, rank)

    def _join_group(self, members: list[int], report: RoundReport) -> None:
        """A new process group for ``members``, rendezvous at rank 0's node on a new port
        (after a loss the old group's peers are gone, so it cannot be reused), every
        member seated on the newest replica."""
        self.group = []
        leader = self.slots[members[0]]
        try:
            ip, port = ray.get(leader.handle.address.remote(), timeout=CALL_TIMEOUT_S)
        except GetTimeoutError:
            return  # a busy or moving node: try again next step
        except (RayActorError, ObjectLostError) as err:
            self._lost(leader, err, report)
            return
        if self.own_is_newest:  # the start or a restore: the driver's own are the run's
            self.own_is_newest = False
        else:
            self._take_replica(members)
        replica = ray.put(replica_tensors(self.aggregator, self.env_steps))
        self.round_members = members
        for rank, i in enumerate(members):
            slot = self.slots[i]
            ref = slot.handle.init_group.remote(ip, port, rank, len(members), replica)
            self.round[ref] = _Call(slot, slot.incarnation, rank)

    def _take_replica(self, members: list[int]) -> None:
        """The driver's model and optimizer become the newest of ``members``' replicas
        (asked after their calls in flight). Not before a group formed on the driver's
        own (the start, a restore: members still hold the old run's), nor when no member
        has one (all were lost: the driver keeps the model rank 0 last handed back and the
        optimizer state it last took, as the processes backend does)."""
        if self.own_is_newest:
            return
        refs = [self.slots[i].handle.replica.remote() for i in members]
        newest: tuple[dict[str, torch.Tensor], str] | None = None
        for ref in refs:
            try:
                got = ray.get(ref, timeout=COLLECTIVE_TIMEOUT_S)
            except (RayActorError, ObjectLostError, GetTimeoutError):
                continue  # lost meanwhile: its next call tells
            if got is not None and (newest is None or _version(got) > _version(newest)):
                newest = got
        if newest is not None:
            as_replica(self.aggregator, *newest)

    def _finish_rounds(self, calls: list[_Call], report: RoundReport) -> None:
        """Count every member's report; follow rank 0's model."""
        for call in calls:
            if isinstance(call.result, Rounds) and call.result.report is not None:
                self.receive(call.result.report, self.live, report)
        leader = calls[0].result
        if isinstance(leader, Rounds) and leader.params is not None:
            self.aggregator.model.load_state_dict(leader.params)
            if leader.rounds:
                per_round_s = max(leader.seconds / leader.rounds, 1e-6)
                self.per_call = max(1, min(MAX_ROUNDS, int(SYNC_CALL_S / per_round_s)))
            if leader.spent:  # a lost member's last steps may never have been reported
                self.env_steps = max(self.env_steps, self.program.total_env_steps)
        if any(not isinstance(c.result, Rounds) or c.result.failed for c in calls):
            self.group = []  # a member was lost mid-round: rebuild before the next one
            why = next((c.result.failed for c in calls
                        if isinstance(c.result, Rounds) and c.result.failed), "")
            if why:
                report.notes.append(f"ray: collective failed ({why}); rebuilding the group")

    def freeze(self) -> None:
        """Sync: no more rounds; the driver takes a member's replica (its steps stop once
        the calls in flight end)."""
        if self.collective and not self.frozen:
            self._take_replica(self.group)
            self.frozen = True

    # ------------------------------------------------------------ faults

    def _get(self, slot: _Slot, ref: ray.ObjectRef, tag: int,
             report: RoundReport) -> Rounds | Sent | str | None:
        """A call's result; None if the actor was lost (counted once per incarnation)."""
        result: Rounds | Sent | str | None = slot.result(
            ref, tag, "worker", lambda err: self._lost(slot, err, report))
        return result if tag == slot.incarnation else None  # an old incarnation's is void

    def _lost(self, slot: _Slot, err: Exception, report: RoundReport) -> None:
        """The worker's process or node is gone: count it, wait for Ray's restart (or
        replace the actor if Ray will not restart it); its group may go on without it."""
        count_restart(self.restarts, slot.index, "worker",
                      f"{type(err).__name__}: {rc.first_line(err)}", report)
        slot.lose(err, self._new_host)
        if slot.index in self.group:
            self.group = []
        if not self.collective:  # the collective's group is ``self.group``, not the gate's
            self.lost(slot.index, report)

    def _check_probes(self) -> None:
        """Probe restarting actors without blocking; one that answers is back."""
        for slot in self.slots:
            if slot.probe is not None and ray.wait([slot.probe], timeout=0)[0]:
                slot.probed(self._new_host)
            slot.start_probe(lambda handle: handle.info.remote())

    # ------------------------------------------------------------ checkpoint state

    @property
    def replay_size(self) -> int:
        if self.replay_host is None:
            return 0
        return int(ray.get(self.replay_host.size.remote(), timeout=CALL_TIMEOUT_S))

    def describe(self) -> str:
        if self.replay_host is not None:
            text = ray.get(self.replay_host.describe.remote(), timeout=CALL_TIMEOUT_S)[0]
            return f"shared {text} (in a Ray actor)"
        return super().describe()

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        if self.collective and not self.frozen:
            self._take_replica(self.group)  # the model and optimizer the group holds
        tensors, meta, replay = super().state(with_replay)
        if self.replay_host is not None:
            meta["replay_rng"], replay = ray.get(self.replay_host.state.remote(with_replay))
        return tensors, meta, replay

    def _incarnations(self) -> list[int]:
        return [s.incarnation for s in self.slots]

    def dump_stacks(self, workers: list[int]) -> str:
        return rc.signal_stacks(list(self.slots), workers, "worker")

    def local_replays(self) -> dict[int, dict[str, np.ndarray]]:
        """Each live worker's own replay, asked after the calls it has in flight."""
        refs = {i: s.handle.replay_state.remote(s.incarnation) for i, s in enumerate(self.slots)
                if not s.recovering}
        out: dict[int, dict[str, np.ndarray]] = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=COLLECTIVE_TIMEOUT_S)
            except (RayActorError, GetTimeoutError):  # lost meanwhile: its replay goes too
                continue
        return out

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        """Workers rebuild with fresh incarnations (fresh seeds, refilled local replays);
        calls in flight belong to the old run and are dropped."""
        super().restore(tensors, meta, replay)
        if self.replay_host is not None:
            ray.get(self.replay_host.restore.remote(meta["replay_rng"], replay))
        self._forget_workers()
        self.round, self.round_members = {}, None
        self.group, self.own_is_newest, self.frozen = [], True, False
        for i, (slot, saved) in enumerate(zip(self.slots, meta.get("workers", []), strict=False)):
            slot.incarnation = saved["incarnation"] + 1
            slot.calls.clear()
            if part := self.restored_worker(i):
                slot.handle.load_state.remote(slot.incarnation, ray.put(part))
        self._put_params()

    def close(self) -> None:
        slots: list[_Slot] = self.__dict__.pop("slots", [])
        host = self.__dict__.pop("replay_host", None)
        pg: PlacementGroup | None = self.__dict__.pop("pg", None)
        rc.teardown([s.handle for s in slots] + ([] if host is None else [host]), pg,
                 self.started_ray)
        self.started_ray = False


def _version(replica: tuple[dict[str, torch.Tensor], str]) -> int:
    return int(json.loads(replica[1])["version"])
