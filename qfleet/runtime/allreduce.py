"""Synchronous aggregation among worker processes, with no server in the loop.

Every worker of a sync group holds a replica of the global model and its optimizer. Round
``v`` is the step from version ``v``: each member writes its flat gradient (with its rows
and the env steps it took since its last post) into its row of the buffer for ``v``'s
parity and then marks ``posted[parity, i] = v``. Once every member has posted ``v``, each
worker averages the posted gradients in worker order with the aggregator's own arithmetic
(``Aggregator.apply``, the gate's row weights) and steps its replica: the same start, the
same mean, the same optimizer state, so the replicas stay bit-identical to each other and
to the inline run. The main process only counts, evaluates and checkpoints.

Why two buffers: a worker writes round v+2 only after every member posted v+1, i.e. after
each finished reading round v.

Membership (``member_from[i]``: the first round worker i takes part in; -1: out). The main
process takes a dead worker out (``on_worker_loss = proceed``) or leaves it in (``wait``:
the group waits for the replacement). A round's gradients are those with
``posted == v``, read after the membership: a dead worker's marks no longer change, so
every survivor decides the same set. A replacement collects with the published
parameters until it has a gradient to give, then asks to join; the leader (the lowest
live member, named by the main process) writes its replica to a file between two rounds
(or, if the replacement is a member, while it waits for it) and makes it a member from
its current version. With no live member left, the main process answers from its own
copy: the newest published parameters and the optimizer state it last saw.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from multiprocessing.context import BaseContext

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qfleet.checkpoint import flatten_optimizer, unflatten_optimizer
from qfleet.roles import gradient_step
from qfleet.roles.gradients import Aggregator, Gradient, GradientWorker, row_weights
from qfleet.roles.params import ParamSnapshot
from qfleet.runtime.reports import Outbox, all_spent, budget_spent
from qfleet.runtime.shm import SharedParams
from qfleet.schedules import follow

POSTED = 0  # rows 0 and 1: the round posted into each parity's buffer
MEMBER_FROM, JOIN_ASK, JOIN_DONE = 2, 3, 4
SPENT = 5  # 1: this worker stopped at the run's budget
# Between looks at the group's marks while waiting for a round: from SLEEP_S, doubling to
# MAX_SLEEP_S. A worker that looked every 20 us took CPU from the one it waited for (two
# workers and the main process on 2 cores: W = 2 made 1.24x W = 1's env steps/s).
SLEEP_S, MAX_SLEEP_S = 20e-6, 0.1e-3
REPORT_S = 0.02  # a member reports to the main process at most this often (Outbox)
PUBLISH_S = 0.05  # the leader publishes its replica for the main's evaluations this often


class Replica:
    """A worker's copy of the global model and optimizer, and the run's env steps as the
    group counts them (what the learning-rate schedule follows)."""

    def __init__(self, aggregator: Aggregator, env_steps: int) -> None:
        self.agg, self.env_steps = aggregator, env_steps

    @property
    def version(self) -> int:
        return self.agg.version

    def fetch(self, version: int) -> ParamSnapshot | None:
        return None if version == self.version else self.agg.snapshot()

    def step(self, grads: list[torch.Tensor], weights: list[float], env_steps: int) -> int:
        self.env_steps += env_steps
        follow(self.agg, self.env_steps)
        return self.agg.apply(grads, weights)

    def save(self, path: str) -> None:
        save_replica(path, self.agg, self.env_steps)


def replica_tensors(agg: Aggregator, env_steps: int,
                    version: int | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The model, the optimizer state, the version and the env steps: tensors of their
    own and one JSON string (a file's metadata, or a Ray object)."""
    opt_tensors, opt_meta = flatten_optimizer(agg.opt.state_dict())
    tensors = {k: v.detach().clone().contiguous()
               for k, v in (agg.model.state_dict() | opt_tensors).items()}
    meta = {"version": agg.version if version is None else version, "env_steps": env_steps,
            "optimizer": opt_meta}
    return tensors, json.dumps(meta)


def as_replica(agg: Aggregator, tensors: dict[str, torch.Tensor], meta_json: str) -> Replica:
    """``agg`` becomes the replica in ``tensors``, in tensors of its own: a spawned
    worker's program arrives with its tensors in shared memory, one copy for every
    process, and each replica must step its own (measured: W steps on one model)."""
    with torch.no_grad():
        for t in itertools.chain(agg.model.parameters(), agg.model.buffers()):
            t.data = t.data.clone()
    meta = json.loads(meta_json)
    agg.model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("opt.")})
    agg.opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    agg.version_1.fill_(meta["version"])
    return Replica(agg, int(meta["env_steps"]))


def save_replica(path: str, agg: Aggregator, env_steps: int, version: int | None = None) -> None:
    """``replica_tensors`` written whole (a reader never sees half a file: it is renamed
    into place)."""
    tensors, meta = replica_tensors(agg, env_steps, version)
    save_file(tensors, path + ".part", metadata={"replica": meta})
    os.replace(path + ".part", path)


def load_replica(path: str, agg: Aggregator) -> Replica:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()["replica"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    return as_replica(agg, tensors, meta)


def join_path(folder: str, worker: int, incarnation: int) -> str:
    return os.path.join(folder, f"join-{worker}-{incarnation}.safetensors")


def start_path(folder: str) -> str:
    return os.path.join(folder, "start.safetensors")


class ReduceGroup:
    """The shared memory of one sync group: the main process creates it, every worker
    process reads and writes it (no lock: each mark has one writer at a time)."""

    def __init__(self, num_workers: int, size: int, ctx: BaseContext, version: int) -> None:
        self.grads = torch.zeros(2, num_workers, size).share_memory_()
        # rows, env steps, base version of each posted gradient
        self.info = torch.zeros(2, num_workers, 3, dtype=torch.float64).share_memory_()
        self.marks = torch.full((6, num_workers), -1, dtype=torch.int64).share_memory_()
        self.leader = ctx.RawValue("q", 0)
        self.reset(version)

    def reset(self, version: int) -> None:
        """Every worker a member from ``version``, nothing posted or asked (a fresh start)."""
        self.marks.fill_(-1)
        self.marks[MEMBER_FROM] = version
        self.leader.value = 0

    def post(self, worker: int, v: int, grad: Gradient, steps: int) -> None:
        p = v % 2
        assert grad.grads_P is not None
        self.grads[p, worker].copy_(grad.grads_P)
        self.info[p, worker] = torch.tensor([grad.rows, steps, grad.base_version],
                                            dtype=torch.float64)
        self.marks[POSTED + p, worker] = v  # last: the gradient is whole once this is seen

    def complete(self, v: int) -> list[int] | None:
        """The workers whose gradients round ``v`` averages, once every member posted it."""
        posted = self.marks[POSTED + v % 2].tolist()
        member_from = self.marks[MEMBER_FROM].tolist()  # after the posts: see the docstring
        if any(0 <= first <= v and posted[i] != v for i, first in enumerate(member_from)):
            return None
        posted = self.marks[POSTED + v % 2].tolist()  # the dead's marks are final by now
        return [i for i, mark in enumerate(posted) if mark == v]

    def gradients(self, v: int, included: list[int]) -> tuple[list[torch.Tensor], list[float],
                                                              int]:
        p = v % 2
        rows = [int(self.info[p, i, 0]) for i in included]
        steps = sum(int(self.info[p, i, 1]) for i in included)
        return ([self.grads[p, i] for i in included], row_weights(rows, [1.0] * len(rows)),
                steps)

    def staleness(self, v: int, included: list[int]) -> int:
        """How many versions older than ``v`` the round's gradients are, summed (pulls
        every ``sync_every`` > 1 gradients compute on older parameters)."""
        return sum(v - int(self.info[v % 2, i, 2]) for i in included)

    def members(self, alive: list[bool]) -> list[int]:
        """The live workers that are members and not waiting for a join answer."""
        marks = self.marks
        member_from = marks[MEMBER_FROM].tolist()
        joined = (marks[JOIN_ASK] == marks[JOIN_DONE]).tolist()
        return [i for i, up in enumerate(alive) if up and member_from[i] >= 0 and joined[i]]

    def spent(self, alive: list[bool]) -> bool:
        """Every live worker marked itself stopped at the run's budget."""
        return all_spent(self.marks[SPENT].tolist(), alive)

    def asking(self) -> list[int]:
        """The replacements that asked to join and have no answer yet."""
        ask, done = self.marks[JOIN_ASK].tolist(), self.marks[JOIN_DONE].tolist()
        return [k for k in range(len(ask)) if ask[k] >= 0 and ask[k] != done[k]]

    def hand_over(self, k: int, version: int, write: Callable[[str], None],
                  folder: str) -> None:
        """Make replacement ``k`` a member from ``version`` (if it is not one), ``write``
        the replica it starts from into its file, then tell it."""
        if int(self.marks[MEMBER_FROM, k]) < 0:
            self.marks[MEMBER_FROM, k] = version
        incarnation = int(self.marks[JOIN_ASK, k])
        write(join_path(folder, k, incarnation))
        self.marks[JOIN_DONE, k] = incarnation

    def answer_joins(self, index: int, replica: Replica, folder: str, between: bool) -> None:
        """The leader hands its replica to each replacement that asked. One that is not a
        member joins from this version, only ``between`` rounds (no one can complete the
        round this worker has not posted)."""
        self.answer_asking(index, between, lambda k: self.hand_over(
            k, replica.version, replica.save, folder))

    def answer_asking(self, index: int, between: bool, answer: Callable[[int], None]) -> None:
        """If worker ``index`` leads: ``answer`` each replacement that asked and may join
        now (see answer_joins)."""
        if self.leader.value != index:
            return
        for k in self.asking():
            if between or int(self.marks[MEMBER_FROM, k]) >= 0:
                answer(k)

    def reduce(self, index: int, v: int, grad: Gradient, steps: int,
               idle: Callable[[], bool]) -> list[int] | None:
        """Post ``grad`` for round ``v``, then wait for the round (wait_round)."""
        self.post(index, v, grad, steps)
        return self.wait_round(v, idle)

    def wait_round(self, v: int, idle: Callable[[], bool]) -> list[int] | None:
        """Wait until round ``v`` is complete; ``idle`` runs meanwhile and returns False
        when the worker must stop (then None)."""
        pause = SLEEP_S
        while (included := self.complete(v)) is None:
            if not idle():
                return None
            time.sleep(pause)
            pause = min(2 * pause, MAX_SLEEP_S)
        return included

    def join(self, index: int, incarnation: int, folder: str, agg: Aggregator,
             idle: Callable[[], bool]) -> Replica | None:
        self.marks[JOIN_ASK, index] = incarnation
        while int(self.marks[JOIN_DONE, index]) != incarnation:
            if not idle():
                return None
            time.sleep(0.001)
        return load_replica(join_path(folder, index, incarnation), agg)


def run_member(worker: GradientWorker, group: ReduceGroup, replica: Replica | None,
               params: SharedParams, folder: str, sync_every: int,
               idle: Callable[[Replica | None], bool], send: Callable[[Gradient], None],
               make_aggregator: Callable[[], Aggregator], budget: int = 0,
               report_s: float = REPORT_S) -> None:
    """One worker's loop in a sync group. ``replica`` None: a replacement, which collects
    with the published parameters until its first gradient, drops that one (computed on
    whatever version it pulled) and joins. ``idle`` answers checkpoint requests and says
    whether to go on. Once the group counts ``budget`` env steps (0: never) every member
    stops at the same round and waits to be stopped: no main process paces the group.
    Reports go out merged every ``report_s`` (0: each round)."""
    member = Member(worker, group, folder, sync_every, idle)
    outbox = Outbox(send, report_s)
    published = time.monotonic()
    while idle(replica):
        if replica is not None and budget_spent(budget, replica.env_steps):
            outbox.flush()
            group.marks[SPENT, worker.index] = 1
            time.sleep(0.01)
            continue
        if replica is not None:
            grad = member.round(replica)
            if grad is None:
                break
        else:
            grad = gradient_step(worker, params.pull, sync_every)
            member.steps += grad.env_steps
            if grad.grads_P is not None:
                grad.grads_P = None
                replica = group.join(worker.index, worker.actor.incarnation, folder,
                                     make_aggregator(), lambda: idle(None))
        outbox.add(grad)
        if replica is not None and group.leader.value == worker.index and \
                time.monotonic() - published > PUBLISH_S:
            params.publish(replica.agg.model, replica.version)
            published = time.monotonic()
    outbox.flush()


def work_on(worker: GradientWorker, replica: Replica, sync_every: int) -> Gradient:
    """A member's gradient_step: it pulls from its own replica (with ``sync_every`` 1 it
    acts and computes on the replica's model itself, no copy each round; again when the
    member is re-seated on a replica, which may reuse the model object)."""
    if sync_every == 1 and (worker.model is not replica.agg.model or
                            worker.version != replica.version):
        worker.share(replica.agg.model, replica.version)
    return gradient_step(worker, replica.fetch, sync_every)


def step_replica(worker: GradientWorker, replica: Replica, grads: list[torch.Tensor],
                 weights: list[float], env_steps: int) -> int:
    """The group's step on this member's replica; returns the version it made."""
    version = replica.step(grads, weights, env_steps)
    if worker.model is replica.agg.model:
        worker.actor.moved(version)  # its net moved under it
    return version


class Member:
    """One round of a group member: work, post, wait for the others, step the replica."""

    def __init__(self, worker: GradientWorker, group: ReduceGroup, folder: str,
                 sync_every: int, idle: Callable[[Replica | None], bool]) -> None:
        self.worker, self.group, self.folder, self.sync_every = worker, group, folder, sync_every
        self.idle = idle
        self.steps = 0  # env steps since this worker's last post

    def round(self, replica: Replica) -> Gradient | None:
        """The gradient's report (``applied_at``: the version the step made; no
        gradient while the replay fills), or None when the worker must stop."""
        index, group = self.worker.index, self.group
        group.answer_joins(index, replica, self.folder, between=True)
        v, grad = replica.version, work_on(self.worker, replica, self.sync_every)
        self.steps += grad.env_steps
        if grad.grads_P is None:  # still filling its replay
            return grad
        clock = self.worker.actor.clock  # its laps go into the next round's report
        included = group.reduce(index, v, grad, self.steps, lambda: self._idle(replica))
        self.steps = 0
        if included is None:
            return None
        clock.lap("sync")
        grad.applied_at = step_replica(self.worker, replica, *group.gradients(v, included))
        clock.lap("apply")
        grad.grads_P, grad.groups = None, [len(included)]
        grad.stale = [group.staleness(v, included)]
        return grad

    def _idle(self, replica: Replica) -> bool:
        self.group.answer_joins(self.worker.index, replica, self.folder, between=False)
        return self.idle(replica)


class Keeper:
    """The main process's side of a sync group: the replica every first worker starts
    from, the leader (kept until it dies: two publishers would break the seqlock), members
    taken out, and joins answered from its own copy when no member is left."""

    def __init__(self, group: ReduceGroup, folder: str, wait_for_restart: bool) -> None:
        self.group, self.folder, self.wait = group, folder, wait_for_restart
        self.seen = -1  # the published version last loaded into the main's model

    def start(self, agg: Aggregator, env_steps: int) -> None:
        """Before the first workers start (a run's start or a restore)."""
        save_replica(start_path(self.folder), agg, env_steps)
        self.group.reset(agg.version)
        self.seen = agg.version

    def lost(self, worker: int) -> None:
        if not self.wait:  # proceed: the group's rounds go on without it
            self.group.marks[MEMBER_FROM, worker] = -1

    def refresh(self, agg: Aggregator, params: SharedParams) -> None:
        """The main's model follows what the leader publishes (evaluations, the result)."""
        snapshot = params.pull(self.seen, patience=100)
        if snapshot is not None:
            agg.model.load_state_dict(snapshot.params)
            self.seen = snapshot.version

    def tend(self, alive: list[bool], agg: Aggregator, params: SharedParams,
             env_steps: int) -> set[int]:
        """Each round: name a new leader if the old one died; answer joins if no member
        is left. Returns the workers that are not members (replacements not yet joined)."""
        members = self.group.members(alive)
        leader = int(self.group.leader.value)
        if leader < 0 or leader not in members:
            if leader >= 0 and not alive[leader] and params.seq.value % 2:
                params.seq.value += 1  # it died while publishing: the buffer is whole again
            self.group.leader.value = leader = min(members, default=-1)
        if leader < 0:
            self._answer(agg, params, env_steps)
        return {i for i, first in enumerate(self.group.marks[MEMBER_FROM].tolist()) if first < 0}

    def spent(self, alive: list[bool]) -> bool:
        """Every live worker stopped at the run's budget (the main process's count may
        fall short of it by reports a killed worker never sent: it must stop anyway)."""
        return self.group.spent(alive)

    def _answer(self, agg: Aggregator, params: SharedParams, env_steps: int) -> None:
        asking = self.group.asking()
        if not asking:
            return
        self.refresh(agg, params)
        self.group.marks[POSTED:POSTED + 2] = -1  # no one waits in a round: the dead's go
        for k in asking:
            self.group.hand_over(k, self.seen, lambda path: save_replica(
                path, agg, env_steps, self.seen), self.folder)
