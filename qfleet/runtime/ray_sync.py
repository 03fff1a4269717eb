"""A Ray gradient worker's seat in a sync group: its replica of the global model and
optimizer, stepped by the worker itself (as on the processes backend, ``allreduce``).

One call runs ``count`` rounds. A round: work once (a member that holds an unused gradient
does not), then an ``all_gather`` of one vector per member (through shared memory when every member
runs on one machine: node_exchange) (its flat gradient, whether it
has one, its rows and staleness, the env steps it took this round), then every member
takes the same step on its replica: the gathered gradients in rank (= worker) order,
with the aggregator's own arithmetic and the gate's row weights, so the replicas stay
bit-identical to each other and to the inline run. No parameters move while the group
steps; the leader hands its model to the driver at the end of each call (evaluations).

Every member leaves a call at the same round: after ``count`` rounds, when the gathered
env steps reach the run's budget, or when a member's own code raised (its vector says so;
it raises after the collective, so no peer waits for a timeout).

A round steps once the members that have ever had a gradient all have one (``proceed``: a
replacement refilling its replay does not hold the group up) or, with ``wait``, once every
member has one; until then a member keeps its gradient and does not work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qfleet.roles.gradients import Aggregator, Gradient, GradientWorker, row_weights
from qfleet.runtime.allreduce import Replica, as_replica, step_replica, work_on
from qfleet.runtime.node_exchange import NodeExchange
from qfleet.runtime.reports import budget_spent, merge

# after the gradient in a gathered vector (small counts: exact in float32):
HAS, ROWS, STEPS, STALE = 0, 1, 2, 3
FIELDS = 4
FILLING, NONE, GRADIENT, RAISED = 0.0, 1.0, 2.0, -1.0  # values of HAS


@dataclass
class Rounds:
    """One call's result. ``report``: the member's counts merged over its rounds (losses
    and group steps as a processes member reports them); the leader's ``params`` and
    ``version`` after the last round; ``spent``: the group reached the run's budget."""

    report: Gradient | None = None
    params: dict[str, torch.Tensor] | None = None
    version: int = -1
    rounds: int = 0
    seconds: float = 0.0
    spent: bool = False
    failed: str = ""  # the collective failed (a peer was lost): why


class SyncSeat:
    def __init__(self, agg: Aggregator, tensors: dict[str, torch.Tensor], meta: str,
                 wait: bool) -> None:
        self.replica: Replica = as_replica(agg, tensors, meta)
        self.size = sum(p.numel() for p in agg.params)
        self.wait = wait
        self.held: Gradient | None = None
        self.had_grad = False
        self.exchange: NodeExchange | None = None  # members on one machine: no gloo rounds

    def keep_if_current(self, held: Gradient | None) -> None:
        """A member re-seated after a loss keeps its unused gradient if the new replica is
        at the version it was computed on (the group re-formed before stepping)."""
        if held is not None and held.base_version == self.replica.version:
            self.held, self.had_grad = held, True

    def run(self, worker: GradientWorker, sync_every: int, count: int, budget: int,
            first_line: Callable[[BaseException], str]) -> Rounds:
        out, t0 = Rounds(), time.monotonic()
        while out.rounds < count:
            if budget_spent(budget, self.replica.env_steps):
                out.spent = True
                break
            try:
                go_on = self._round(worker, sync_every, out)
            except _CollectiveFailed as err:
                out.failed = first_line(err.__cause__ or err)
                break
            out.rounds += 1
            if not go_on:
                break
        out.seconds = time.monotonic() - t0
        out.version = self.replica.version
        return out

    def _round(self, worker: GradientWorker, sync_every: int, out: Rounds) -> bool:
        error: Exception | None = None
        steps = 0
        if self.held is None:
            try:
                grad = work_on(worker, self.replica, sync_every)
            except Exception as err:  # raised after the collective
                error = err
            else:
                steps = grad.env_steps
                _report(out, dataclasses.replace(grad, grads_P=None))  # counts, no loss
                if grad.grads_P is not None:
                    self.held, self.had_grad = grad, True
        parts = self._gather(self._vector(error, steps))
        if error is not None:
            raise error
        return self._step(worker, parts, out)

    def _vector(self, error: Exception | None, steps: int) -> torch.Tensor:
        vec = torch.zeros(self.size + FIELDS, dtype=torch.float32)
        held = self.held
        has = RAISED if error else GRADIENT if held else NONE if self.had_grad else FILLING
        vec[self.size + HAS], vec[self.size + STEPS] = has, float(steps)
        if held is not None and held.grads_P is not None:
            vec[:self.size] = held.grads_P
            vec[self.size + ROWS] = float(held.rows)
            vec[self.size + STALE] = float(self.replica.version - held.base_version)
        return vec

    def _gather(self, vec: torch.Tensor) -> list[torch.Tensor]:
        try:
            if self.exchange is not None:
                return self.exchange.all_gather(vec)
            parts = [torch.empty_like(vec) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, vec)
        except Exception as err:  # a peer lost or timed out: a fault
            raise _CollectiveFailed() from err
        return parts

    def _step(self, worker: GradientWorker, parts: list[torch.Tensor], out: Rounds) -> bool:
        """The round's step on the replica, if it is due; False when a peer raised."""
        size, clock = self.size, worker.actor.clock
        has = [float(p[size + HAS]) for p in parts]
        self.replica.env_steps += sum(int(p[size + STEPS]) for p in parts)
        if RAISED in has:
            return False
        clock.lap("sync")
        due = [h == GRADIENT for h in has if self.wait or h != FILLING]
        if due and all(due):
            included = [p for p, h in zip(parts, has, strict=True) if h == GRADIENT]
            weights = row_weights([int(p[size + ROWS]) for p in included], [1.0] * len(included))
            stale = sum(int(p[size + STALE]) for p in included)
            version = step_replica(worker, self.replica, [p[:size] for p in included],
                                   weights, 0)
            held, self.held = self.held, None
            if held is not None:  # its loss counts now, with the step it went into
                _report(out, dataclasses.replace(
                    held, grads_P=None, env_steps=0, episode_returns=[], episode_lengths=[],
                    times={}, groups=[len(included)], stale=[stale], applied_at=version))
            clock.lap("apply")
        return True


class _CollectiveFailed(Exception):
    pass


def _report(out: Rounds, grad: Gradient) -> None:
    out.report = grad if out.report is None else merge(out.report, grad)
