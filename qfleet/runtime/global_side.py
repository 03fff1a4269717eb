"""What every backend shares for gradient schemes: the global side (aggregator, gate,
the replay workers share if any, counters), the gradient loop's rules and the
checkpoint layout.

The counterpart of ``LearnerSide`` for actor-learner programs. A transport delivers each
gradient (or a worker's report of steps it took itself) with ``take`` and reports a lost
worker with ``lost``; the rules of who is in a group and when a replacement joins are
here.

Workers' own replays (replay.scope local) go into the checkpoint under ``worker<i>.``;
each backend fetches them from wherever its workers run (``local_replays``) and hands
them back to the restarted workers (``restored_worker``), with the env steps each
worker's actor had taken (so epsilon schedules continue).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import torch

from qfleet.algos.program import GradientProgram
from qfleet.checkpoint import flatten_optimizer, unflatten_optimizer, with_prefix
from qfleet.replay import Replay
from qfleet.replay import describe as describe_replay
from qfleet.roles.clock import Clock
from qfleet.roles.gradients import ACTED, Gradient, GradientGate, Ready
from qfleet.runtime.base import OUTSIDE, RoundReport
from qfleet.schedules import follow


class GlobalSide:
    def __init__(self, program: GradientProgram) -> None:
        self.program = program
        self.aggregator = program.make_aggregator()
        self.shared_replay = self.new_shared_replay()
        self.gate = GradientGate(program.num_workers, program.group_size,
                                 program.max_staleness, program.stale)
        self.env_steps = 0
        self.waiting: set[int] = set()  # replacements not yet in their group
        self.clock = Clock()  # the aggregator's own time split
        self.saved_replays: dict[int, dict[str, np.ndarray]] = {}  # by worker, from restore
        self.worker_steps = [0] * program.num_workers  # env steps each worker's data had
        self.teams = False  # grouped members step a shared model and report their own steps

    def new_shared_replay(self) -> Replay | None:
        """The replay workers share (scope shared/sharded), or None; a backend may place
        it elsewhere."""
        make = self.program.make_shared_replay
        return None if make is None else make()

    @property
    def updates(self) -> int:
        return self.aggregator.version

    @property
    def policy_net(self) -> torch.nn.Module:
        return self.aggregator.online

    @property
    def replay_size(self) -> int:
        return 0 if self.shared_replay is None else len(self.shared_replay)

    def freeze(self) -> None:
        """Stop anything that writes the global model outside ``step()`` (nothing here;
        Hogwild workers do, and their backend overrides this)."""

    def dump_stacks(self, workers: list[int]) -> str:
        return "workers in this process never stall without its round stalling"

    def describe(self) -> str:
        if self.shared_replay is not None:
            return "shared " + describe_replay(self.shared_replay)
        return f"gradient workers: {self.program.num_workers}, each with its own data"

    @property
    def live(self) -> set[int]:
        """The workers a group step waits for."""
        return set(range(self.program.num_workers)) - self.waiting

    def take(self, grad: Gradient, current: bool, report: RoundReport) -> None:
        """A gradient arrived (``current``: from the worker's newest incarnation). A
        replacement joins its group with a gradient computed on the current version; one
        computed while the group stepped without it is counted but not averaged in (the
        worker computes again on the newest parameters)."""
        if grad.grads_P is not None and current and grad.worker in self.waiting:
            if grad.base_version != self.updates:
                grad.grads_P = None
            else:
                self.waiting.discard(grad.worker)
        self.receive(grad, self.live, report)

    def lost(self, worker: int, report: RoundReport) -> None:
        """Worker ``worker`` is gone (a replacement is on its way): its gradient in the
        gate stays; unless the group waits for the replacement, it goes on without it."""
        if self.program.group_size > 1 and not self.program.wait_for_restart:
            self.waiting.add(worker)  # async has no group to rejoin: staleness rules there
        self.flush(worker, self.live, report)

    def _forget_workers(self) -> None:
        """A restore restarts every worker: nothing they sent or hold is pending."""
        self.gate.pending.clear()
        self.waiting.clear()

    def clock_in(self) -> None:
        """At the start of a round: the time since the last one was no role's."""
        self.clock.lap(OUTSIDE)

    def clock_out(self, report: RoundReport) -> None:
        """The aggregator's time split of this round into ``report``."""
        self.clock.lap("wait")
        times = self.clock.take()
        times.pop(OUTSIDE, None)
        report.add_times("aggregator", times)

    def receive(self, grad: Gradient, live: Collection[int], report: RoundReport) -> None:
        """Count a worker's message; take a global step if it completed its group."""
        self.clock.lap("wait")
        self.env_steps += grad.env_steps
        self.worker_steps[grad.worker] += grad.env_steps
        report.env_steps += grad.env_steps
        report.steps_by_actor[grad.worker] = report.steps_by_actor.get(grad.worker, 0) + \
            grad.env_steps
        report.episode_returns += grad.episode_returns
        report.episode_lengths += grad.episode_lengths
        report.returns_by_actor.setdefault(grad.worker, []).extend(grad.episode_returns)
        report.add_times("worker", grad.times)
        if grad.worker == 0 and grad.epsilon is not None:
            report.epsilon = grad.epsilon
        if grad.grads_P is None and grad.applied_at < 0:
            return
        report.loss_sum += grad.loss
        report.q_sum += grad.q_mean
        report.loss_count += grad.reports
        if grad.groups and self.teams:  # its group stepped the shared model
            self._count_team_steps(grad, report)
            return
        if grad.groups:  # a sync group stepped its replicas: each member reports the steps
            self._count_group_step(grad, report)
            return
        if grad.applied_at >= 0:  # a Hogwild worker applied it to the shared model itself
            report.updates += 1
            report.grads_applied += 1
            report.staleness_sum += grad.applied_at - 1 - grad.base_version
            return
        self._step_if_ready(lambda version: self.gate.offer(grad, version, live), report)

    def _count_group_step(self, grad: Gradient, report: RoundReport) -> None:
        """Each step counted once, by the first member's report of its version (with the
        group's gradients then, whoever of them is still alive to tell)."""
        new = grad.applied_at - self.updates
        if new <= 0:
            return
        report.updates += new
        report.grads_applied += sum(grad.groups[-new:])
        report.staleness_sum += sum(grad.stale[-new:])
        self.aggregator.version_1.fill_(grad.applied_at)

    @staticmethod
    def _count_team_steps(grad: Gradient, report: RoundReport) -> None:
        """A grouped member's steps: the ones it applied itself (0 in ``groups`` where
        another member of its group did)."""
        report.updates += sum(1 for n in grad.groups if n)
        report.grads_applied += sum(grad.groups)
        report.grads_dropped += grad.dropped
        report.staleness_sum += sum(grad.stale)

    def flush(self, worker: int, live: Collection[int], report: RoundReport) -> None:
        """A worker left ``live``: its group may now be complete without it."""
        self._step_if_ready(lambda version: self.gate.ready(worker, version, live), report)

    def _step_if_ready(self, gate_call: Callable[[int], Ready], report: RoundReport) -> None:
        before = (self.gate.applied, self.gate.dropped, self.gate.staleness_sum)
        ready = gate_call(self.aggregator.version)
        if ready is not None:
            follow(self.aggregator, self.env_steps)
            self.aggregator.apply(*ready)
            report.updates += 1
        self.clock.lap("apply")
        report.grads_applied += self.gate.applied - before[0]
        report.grads_dropped += self.gate.dropped - before[1]
        report.staleness_sum += self.gate.staleness_sum - before[2]

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        agg = self.aggregator
        # online.* (+ target.*), as LearnerSide saves; copies, since the model and optimizer
        # move on in place (a sync group's driver loads each new model into its own)
        opt_tensors, opt_meta = flatten_optimizer(agg.opt.state_dict())
        tensors = {k: v.detach().clone() for k, v in (agg.model.state_dict() | opt_tensors).items()}
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"env_steps": self.env_steps, "updates": agg.version, "optimizer": opt_meta,
                "workers": self._worker_states()}
        replay: dict[str, np.ndarray] = {}
        if self.shared_replay is not None:
            meta["replay_rng"] = self.shared_replay.rng.bit_generator.state
            if with_replay:
                replay = self.shared_replay.state_dict()
        if with_replay and self.program.local_replay:
            for i, arrays in self.local_replays().items():
                replay |= {f"worker{i}.{k}": v for k, v in arrays.items()}
        return tensors, meta, replay

    def _worker_states(self) -> list[dict[str, Any]]:
        """What a checkpoint keeps of each worker: its incarnation (a resumed run restarts
        each as the next one, with fresh seeds) and its env steps."""
        return [{"incarnation": k, "env_steps": steps}
                for k, steps in zip(self._incarnations(), self.worker_steps, strict=True)]

    def _incarnations(self) -> list[int]:
        raise NotImplementedError

    def local_replays(self) -> dict[int, dict[str, np.ndarray]]:
        """Each live worker's own replay arrays (GradientWorker.replay_state), by index."""
        return {}

    def restored_worker(self, worker: int) -> dict[str, np.ndarray]:
        """What ``worker`` restarts from after a restore (GradientWorker.load_state): its
        env steps and its own replay's arrays, handed out once."""
        return self.saved_replays.pop(worker, {})

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        agg = self.aggregator
        agg.model.load_state_dict({k: v for k, v in tensors.items()
                                   if k.startswith(("online.", "target."))})
        agg.opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        agg.version_1.fill_(meta["updates"])
        torch.set_rng_state(tensors["torch_rng"])
        self.env_steps = meta["env_steps"]
        workers = meta["workers"]
        self.worker_steps = [int(w.get("env_steps", 0)) for w in workers]
        self.saved_replays = {i: with_prefix(replay, f"worker{i}.") | {
            ACTED: np.array([self.worker_steps[i]])} for i in range(len(workers))}
        if self.shared_replay is not None:
            self.shared_replay.rng.bit_generator.state = meta["replay_rng"]
            shared = {k: v for k, v in replay.items() if not k.startswith("worker")}
            if shared:
                self.shared_replay.load_state_dict(shared)
