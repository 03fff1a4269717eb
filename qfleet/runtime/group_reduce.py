"""Batch-synchronous groups (aggregation grouped), and async workers as groups of one,
on the processes backend, with no server in the loop.

The global model and its optimizer state live in shared memory (as for Hogwild). Inside a
group the members reduce among themselves, as a sync group does (a ReduceGroup of G,
rounds numbered by the group): each posts its gradient and waits for the round to
complete. Then each member takes a turn on the shared model (PauseGate.turn: one at a
time across all groups); the first to find the round unapplied judges every gradient by
the gate's staleness rule against the shared version, applies the weighted mean
(Aggregator.apply) and marks the round applied. In the same turn each member copies the
shared model when its pull is due, so no copy is torn by another group's step. Between
groups the async rule stays: no group waits for another.

Why the first member and not a leader: a member killed anywhere holds no one up but its
own round, whose membership the main process settles as for sync groups (TeamKeeper).

The main process counts the members' reports; it evaluates and checkpoints copies of the
shared model taken between turns (PauseGate.paused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

import torch

from qfleet.roles import gradient_step
from qfleet.roles.gradients import Aggregator, Gradient, GradientGate, GradientWorker, row_weights
from qfleet.roles.params import ParamSnapshot
from qfleet.runtime.allreduce import (
    JOIN_ASK,
    JOIN_DONE,
    MEMBER_FROM,
    POSTED,
    REPORT_S,
    SPENT,
    ReduceGroup,
)
from qfleet.runtime.reports import Outbox, budget_spent
from qfleet.runtime.shm import PauseGate
from qfleet.schedules import follow


class Team(ReduceGroup):
    """One group's shared memory: a ReduceGroup over its G members (local indices), the
    last round applied, and the round each joining replacement starts at."""

    def __init__(self, size: int, num_params: int, ctx: BaseContext) -> None:
        self.applied = ctx.RawValue("q", -1)
        self.start_round = torch.full((size,), -1, dtype=torch.int64).share_memory_()
        super().__init__(size, num_params, ctx, 0)

    def reset(self, version: int) -> None:
        super().reset(0)  # rounds count from 0 on every start; versions are the model's
        self.applied.value = -1

    def answer(self, k: int, round_: int) -> None:
        """Replacement ``k`` takes part from ``round_`` on (a member already: the round
        its group is waiting in)."""
        self.start_round[k] = round_
        self.hand_over(k, round_, lambda path: None, "")

    def answer_asks(self, index: int, round_: int, between: bool) -> None:
        """As ReduceGroup.answer_joins, with the round instead of a replica."""
        self.answer_asking(index, between, lambda k: self.answer(k, round_))

    def join_round(self, index: int, incarnation: int, idle: Callable[[], bool]) -> int | None:
        """Ask to join; the round to start at, or None when the worker must stop."""
        self.marks[JOIN_ASK, index] = incarnation
        while int(self.marks[JOIN_DONE, index]) != incarnation:
            if not idle():
                return None
            time.sleep(0.001)
        return int(self.start_round[index])


def apply_round(team: Team, round_: int, included: list[int], agg: Aggregator,
                rule: GradientGate, env_steps: int) -> tuple[list[int], list[int], int]:
    """The group's step of ``round_`` on the shared model, by the gate's staleness rule
    (call it in a turn): ([gradients applied], [their staleness sum], gradients dropped)."""
    p, version = round_ % 2, agg.version
    grads: list[torch.Tensor] = []
    rows: list[int] = []
    scales: list[float] = []
    staleness = dropped = 0
    for i in included:
        age = version - int(team.info[p, i, 2])
        scale = rule.scale(age)
        if scale is None:
            dropped += 1
            continue
        grads.append(team.grads[p, i])
        rows.append(int(team.info[p, i, 0]))
        scales.append(scale)
        staleness += age
    if grads:
        follow(agg, env_steps)
        agg.apply(grads, row_weights(rows, scales))
    team.applied.value = round_
    return [len(grads)], [staleness], dropped


@dataclass(frozen=True)
class Common:
    """What the members of every group share."""

    agg: Aggregator  # the global model and optimizer, in shared memory
    pause: PauseGate  # turns on it
    rule: GradientGate  # the staleness rule between groups
    sync_every: int
    run_steps: Callable[[], int]  # the run's env steps as the main process last counted
    # them (the learning-rate schedule follows them)
    taken: Any  # a shared counter: the env steps members took, added in their turns
    budget: int  # train.total_env_steps (0: none): the members stop once ``taken`` is there

    @property
    def spent(self) -> bool:
        return budget_spent(self.budget, self.taken.value)


class TeamMember:
    """One worker of a group: rounds of work, post, wait, turn. Its reports go out merged
    (Outbox); once the run's budget is spent, also while it waits, so the main process's
    count gets there (as a sync group stops by itself at the budget)."""

    def __init__(self, worker: GradientWorker, team: Team, local: int, common: Common,
                 go_on: Callable[[], bool], send: Callable[[Gradient], None]) -> None:
        self.worker, self.team, self.local, self.common = worker, team, local, common
        self.go_on = go_on  # answers checkpoint requests; False: stop
        self.outbox = Outbox(send, REPORT_S)
        own = worker.model.state_dict()
        shared = common.agg.model.state_dict()
        self.own, self.shared = list(own.values()), [shared[k] for k in own]
        self.steps = 0  # env steps since this worker's last post
        self.untaken = 0  # env steps not yet added to ``taken``

    @staticmethod
    def fetch(version: int) -> ParamSnapshot | None:
        """The worker's pull: its model is the newest it may have (``pull``)."""
        return None

    def idle(self) -> bool:
        if self.common.spent:  # every report out, then say so (TeamKeeper.spent)
            self.outbox.flush()
            self.team.marks[SPENT, self.local] = 1
        return self.go_on()

    def work(self) -> Gradient:
        grad = gradient_step(self.worker, self.fetch, self.common.sync_every)
        self.steps += grad.env_steps
        self.untaken += grad.env_steps
        return grad

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """A turn on the shared model; the steps taken so far are counted in it."""
        with self.common.pause.turn(self.worker.index):
            self.common.taken.value += self.untaken
            self.untaken = 0
            yield

    def pull(self) -> None:
        """Copy the shared model into the worker's in one go (in a turn: untorn)."""
        version = self.common.agg.version
        if version != self.worker.actor.version:
            torch._foreach_copy_(self.own, self.shared)
            self.worker.actor.moved(version)

    def copy(self) -> None:
        with self.turn():
            self.pull()

    def round(self, round_: int) -> Gradient | None:
        """Round ``round_``'s report (None: the worker must stop)."""
        team, local, common = self.team, self.local, self.common
        team.answer_asks(local, round_, between=True)
        grad = self.work()
        if grad.grads_P is None:  # still filling its replay
            self.copy()
            return grad
        clock = self.worker.actor.clock
        included = team.reduce(local, round_, grad, self.steps,
                               lambda: self._idle(round_, grad))
        self.steps = 0
        if included is None:
            return None
        clock.lap("sync")
        grad.groups, grad.stale, dropped = [0], [0], 0
        with self.turn():
            if team.applied.value != round_:
                grad.groups, grad.stale, dropped = apply_round(
                    team, round_, included, common.agg, common.rule, common.run_steps())
            if self.worker.wants_params(common.sync_every):
                self.pull()
            grad.applied_at = common.agg.version
        clock.lap("apply")
        grad.grads_P, grad.dropped = None, dropped
        return grad

    def _idle(self, round_: int, grad: Gradient) -> bool:
        """While it waits in a round. Once the budget is spent, the steps of the round's
        work are counted and reported first (the round may never complete), so that a
        member marked spent never counts again."""
        self.team.answer_asks(self.local, round_, between=False)
        if self.common.spent and self.untaken:
            with self.turn():
                pass  # the turn counts them
            self.outbox.add(_steps_of(grad))
        return self.idle()


def _steps_of(grad: Gradient) -> Gradient:
    """``grad``'s env steps and episodes as a report of their own; ``grad`` keeps none."""
    steps = dataclasses.replace(grad, grads_P=None, applied_at=-1, groups=[], stale=[],
                                reports=0, times={})
    grad.env_steps, grad.episode_returns, grad.episode_lengths = 0, [], []
    return steps


def run_team_member(member: TeamMember, joins: bool) -> None:
    """A group member's loop. A replacement (``joins``) collects on copies of the shared
    model until its first gradient, drops that one and joins its group's next round.
    Once the budget is spent it only waits to be stopped."""
    round_: int | None = None if joins else 0
    member.copy()
    while member.idle():
        if member.common.spent:
            time.sleep(0.01)
            continue
        if round_ is None:
            grad = member.work()
            member.copy()
            if grad.grads_P is not None:
                grad.grads_P = None
                round_ = member.team.join_round(member.local, member.worker.actor.incarnation,
                                                member.idle)
                if round_ is None:
                    break
                member.copy()  # the group may have stepped while it waited to join
        else:
            report = member.round(round_)
            if report is None:
                break
            grad = report
            if report.groups:
                round_ += 1
        member.outbox.add(grad)
    member.outbox.flush()


class TeamKeeper:
    """The main process's side of one group: members taken out (proceed) and joins
    answered when no member of the group is left."""

    def __init__(self, team: Team, wait_for_restart: bool) -> None:
        self.team, self.wait = team, wait_for_restart

    def lost(self, local: int) -> None:
        if not self.wait:
            self.team.marks[MEMBER_FROM, local] = -1

    def tend(self, alive: list[bool]) -> None:
        """Name the lowest live member the one who answers joins; with none, answer them."""
        members = self.team.members(alive)
        if self.team.leader.value not in members:
            self.team.leader.value = min(members, default=-1)
        asking = self.team.asking()
        if members or not asking:
            return
        posted = self.team.marks[POSTED:POSTED + 2]
        round_ = int(posted.max()) + 1  # after any round the dead posted, which is void
        posted.fill_(-1)
        for k in asking:
            self.team.answer(k, round_)
