"""Gradient schemes' roles (Gorila, A3C, A2C): workers compute gradients on their own data
with a local model; the aggregator (parameter server) applies them to the global model;
the gate decides which gradients are averaged together and which are too stale.

Parameters move as one versioned ``model``: an ``nn.ModuleDict`` with the ``online`` net
and, for DQN, the ``target`` net that the aggregator refreshes every few global updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qfleet.config import LearnerConfig
from qfleet.losses import LossOut, TorchBatch
from qfleet.replay import Batch, Replay
from qfleet.roles.actor import Actor
from qfleet.roles.learner import make_optimizer, to_torch
from qfleet.roles.params import ParamSnapshot
from qfleet.schedules import LrSchedule

COLLECTED = "worker.collected"  # beside a worker's replay arrays in a checkpoint
ACTED = "worker.env_steps"  # handed to a restored worker: its actor's env steps so far

# (online, target or None, batch) -> loss and per-sample TD errors / advantages
LossFn = Callable[[nn.Module, nn.Module | None, TorchBatch], LossOut]


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1)
                      for p in params])


def set_grads(params: list[nn.Parameter], flat_P: torch.Tensor, copy: bool = True) -> None:
    """Each parameter's grad from its slice of ``flat_P``: a copy, or (``copy`` False, for
    a caller that owns ``flat_P`` until the next step) a view."""
    offset = 0
    for p in params:
        grad = flat_P[offset: offset + p.numel()].view_as(p)
        p.grad = grad.clone() if copy else grad
        offset += p.numel()


@dataclass
class Gradient:
    """What a worker sends after one ``work()``: its data counters and, once its replay
    holds enough, the gradient of its loss at global version ``base_version``."""

    worker: int
    base_version: int
    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    grads_P: torch.Tensor | None = None  # flat, in the global model's parameter order
    loss: float = 0.0
    q_mean: float = 0.0
    epsilon: float | None = None
    applied_at: int = -1  # Hogwild: the global version right after the worker applied it
    rows: int = 0  # transitions in the batch behind grads_P (0 = unknown: equal weights)
    episode_lengths: list[int] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)  # seconds by activity (Clock)
    # A sync group member's report (allreduce), merged over the steps since its last one:
    groups: list[int] = field(default_factory=list)  # gradients in each step, the last
    # made version ``applied_at``
    reports: int = 1  # gradients whose loss and q_mean are summed here
    stale: list[int] = field(default_factory=list)  # each step's staleness sum (as groups)
    dropped: int = 0  # a grouped member's report: gradients its group steps dropped as stale


class GradientWorker:
    """Collect a chunk with the local model, add it to the replay (or use it as is,
    on-policy), compute the gradient of the loss on one batch. ``replay`` may be the
    worker's own, or one that several workers share (scope shared/sharded)."""

    def __init__(self, index: int, actor: Actor, target: nn.Module | None,
                 replay: Replay | None, loss_fn: LossFn, *, chunk_steps: int, batch_size: int,
                 learning_starts: int, owns_replay: bool = False) -> None:
        self.index, self.actor, self.replay, self.loss_fn = index, actor, replay, loss_fn
        self.owns_replay = owns_replay and replay is not None  # its own, not a shared one
        self.model = nn.ModuleDict({"online": actor.net} | ({} if target is None
                                                            else {"target": target}))
        self.params = list(actor.net.parameters())
        self.chunk_steps, self.batch_size = chunk_steps, batch_size
        self.learning_starts = learning_starts
        self.sent = 0  # gradients sent since the last parameter pull
        self.sent_total = 0
        self.collected = 0  # env steps since this worker started (its replay's fill)

    @property
    def version(self) -> int:
        return self.actor.version

    def set_params(self, snapshot: ParamSnapshot) -> None:
        if snapshot.version != self.actor.version:
            self.model.load_state_dict(snapshot.params)
            self.actor.version = snapshot.version
        self.sent = 0

    def share(self, model: nn.ModuleDict, version: int) -> None:
        """Act and compute on ``model`` itself from now on: a sync group member's replica,
        which its step moves in place (each step then calls ``actor.moved``)."""
        self.model = model
        self.actor.net = model["online"].eval()
        self.params = list(model["online"].parameters())
        self.actor.moved(version)

    def pulled(self, snapshot: ParamSnapshot | None) -> None:
        """A pull happened: new parameters, or None when the ones held are the newest."""
        if snapshot is None:
            self.sent = 0
        else:
            self.set_params(snapshot)

    def work(self) -> Gradient:
        chunk = self.actor.collect(self.chunk_steps)
        out = Gradient(self.index, self.actor.version, chunk.env_steps, chunk.episode_returns,
                       epsilon=chunk.epsilon, episode_lengths=chunk.episode_lengths)
        if self.replay is None:  # on-policy: the chunk is the batch
            batch = Batch(chunk.transitions, np.arange(len(chunk.transitions)), None)
        else:
            self.replay.add(chunk.transitions, shard=self.index)
            self.collected += chunk.env_steps
            if self.collected < self.learning_starts or len(self.replay) < self.batch_size:
                self.actor.clock.lap("learn")
                return out
            batch = self.replay.sample(self.batch_size)
        loss = self._backward(batch)
        if self.replay is not None and self.replay.prioritized:
            self.replay.update_priorities(batch.indices_B, loss.td_B.abs().numpy())
        out.grads_P, out.rows = flat_grads(self.params), len(batch)
        out.loss, out.q_mean = float(loss.loss.detach()), float(loss.q_mean)
        self.actor.clock.lap("learn")
        self.sent += 1
        self.sent_total += 1
        return out

    def replay_state(self) -> dict[str, np.ndarray]:
        """This worker's own replay for a checkpoint (its arrays and how much it had
        collected); {} when it shares a replay or has none."""
        if not self.owns_replay or self.replay is None:
            return {}
        return self.replay.state_dict() | {COLLECTED: np.array([self.collected])}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """A restored worker: its actor's env steps (its epsilon schedule continues) and
        its own replay, if the checkpoint kept them."""
        if ACTED in state:
            self.actor.env_steps = int(state[ACTED][0])
        self.load_replay_state({k: v for k, v in state.items() if k != ACTED})

    def load_replay_state(self, state: dict[str, np.ndarray]) -> None:
        """Refill this worker's own replay from a checkpoint: it trains again at once."""
        if not state or not self.owns_replay or self.replay is None:
            return
        self.replay.load_state_dict({k: v for k, v in state.items() if k != COLLECTED})
        self.collected = int(state[COLLECTED][0])

    def wants_params(self, sync_every: int) -> bool:
        """Due a pull: after ``sync_every`` gradients, and before every ``work()`` until the
        first gradient (a fresh worker must not compute on parameters it got at start)."""
        return self.sent >= sync_every or self.sent_total == 0

    def _backward(self, batch: Batch) -> LossOut:
        data = to_torch(batch, torch.device("cpu"))
        net = self.model["online"]
        net.train()
        target = self.model["target"] if "target" in self.model else None  # noqa: SIM401
        out = self.loss_fn(net, target, data)
        net.zero_grad(set_to_none=True)
        out.loss.backward()
        net.eval()
        return out

    def close(self) -> None:
        self.actor.close()


class Aggregator:
    """The global model and its optimizer. ``apply`` averages gradients into one step.

    With Hogwild the model, the optimizer state and ``version_1`` live in shared memory and
    every worker process holds an Aggregator over them; ``lock`` then guards the counter
    only, the parameter writes are lock-free on purpose."""

    def __init__(self, model: nn.ModuleDict, cfg: LearnerConfig,
                 lock: Any = None, schedule: LrSchedule | None = None) -> None:
        self.model, self.cfg, self.schedule = model, cfg, schedule
        self.online: nn.Module = model["online"]
        self.target: nn.Module | None = \
            model["target"] if "target" in model else None  # noqa: SIM401
        self.params = list(self.online.parameters())
        self.opt = make_optimizer(self.params, cfg)
        self.version_1 = torch.zeros(1, dtype=torch.int64)
        self.lock = lock or contextlib.nullcontext()

    @property
    def version(self) -> int:
        return int(self.version_1[0])

    def apply(self, grads: list[torch.Tensor], weights: list[float]) -> int:
        """One optimizer step on the weighted mean of ``grads`` (sync: W equal weights);
        returns the global version it produced."""
        mean_P = grads[0].mul(weights[0])  # summed in list order, in place: a sync group's
        for grads_P, weight in zip(grads[1:], weights[1:], strict=True):  # replicas do this
            mean_P.add_(grads_P, alpha=weight)  # same arithmetic, bit for bit
        mean_P.div_(len(grads))
        set_grads(self.params, mean_P, copy=False)  # mean_P is this step's own
        if self.cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.opt.step()
        with self.lock:
            self.version_1 += 1
            version = int(self.version_1[0])
        if self.target is not None and version % self.cfg.target_update_every == 0:
            self.target.load_state_dict(self.online.state_dict())
        return version

    def share_memory(self) -> None:
        """Put the model, the optimizer state and the version in shared memory (Hogwild).

        Optimizer state is created lazily at the first step, so a fresh optimizer takes
        one step with zero gradients first (Adam/RMSprop leave parameters unchanged on zero
        moments) and then resets its step counters."""
        self.model.share_memory()
        fresh = not self.opt.state
        if fresh:
            set_grads(self.params, torch.zeros(sum(p.numel() for p in self.params)))
            self.opt.step()
        for state in self.opt.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    if key == "step" and fresh:
                        value.zero_()
                    value.share_memory_()
        self.version_1.share_memory_()

    def snapshot(self) -> ParamSnapshot:
        return ParamSnapshot.of(self.model, self.version)


Ready = tuple[list[torch.Tensor], list[float]] | None  # gradients and weights for one step


@dataclass
class GradientGate:
    """Which gradients are averaged and when: workers form groups of ``group_size``
    (W = sync, 1 = async, between = batch-synchronous groups). A group's step is taken
    once every live member has sent. Each gradient is weighted by its rows over the
    group's mean rows, so the step is the mean over all rows even when rollouts differ in
    length. Outside sync, a gradient older than ``max_staleness`` global updates is
    dropped or scaled by (max_staleness + 1) / (staleness + 1)."""

    num_workers: int
    group_size: int
    max_staleness: int
    stale: str = "drop"
    pending: dict[int, Gradient] = field(default_factory=dict)
    staleness_sum: int = 0
    applied: int = 0  # gradients that went into a step
    dropped: int = 0

    def group_of(self, worker: int) -> range:
        first = worker // self.group_size * self.group_size
        return range(first, first + self.group_size)

    def offer(self, grad: Gradient, version: int,
              live: Collection[int]) -> Ready:
        """Hold ``grad``; return (gradients, weights) for one step if its group is complete."""
        self.pending[grad.worker] = grad
        return self.ready(grad.worker, version, live)

    def ready(self, worker: int, version: int,
              live: Collection[int]) -> Ready:
        members = [w for w in self.group_of(worker) if w in live or w in self.pending]
        if not members or any(w not in self.pending for w in members if w in live):
            return None
        kept: list[tuple[Gradient, torch.Tensor, float]] = []
        for w in members:
            g = self.pending.pop(w, None)
            if g is None or g.grads_P is None:
                continue
            staleness = version - g.base_version
            scale = self.scale(staleness)
            if scale is None:
                self.dropped += 1
                continue
            self.staleness_sum += staleness
            self.applied += 1
            kept.append((g, g.grads_P, scale))
        grads = [grads_P for _, grads_P, _ in kept]
        weights = row_weights([g.rows for g, _, _ in kept], [scale for _, _, scale in kept])
        return (grads, weights) if grads else None

    def scale(self, staleness: int) -> float | None:
        """A gradient's weight for being ``staleness`` versions old; None: dropped."""
        if staleness <= self.max_staleness or self.group_size == self.num_workers:
            return 1.0
        if self.stale == "drop":
            return None
        return (self.max_staleness + 1) / (staleness + 1)


def row_weights(rows: list[int], scales: list[float]) -> list[float]:
    """Each gradient's weight in a step's mean: its rows over the group's mean rows (so the
    step is the mean over all rows), times its staleness scale."""
    mean_rows = sum(rows) / max(1, len(rows))
    return [scale * (r / mean_rows if mean_rows else 1.0) for r, scale in zip(rows, scales,
                                                                             strict=True)]
