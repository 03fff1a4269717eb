"""What every backend shares: the learner side (replay + learner + counters) and the report.

A backend decides where actors run and how chunks reach the replay; the learner side,
the update schedule and the checkpoint layout are the same everywhere, so they live here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, cast

import numpy as np
import torch

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.checkpoint import flatten_optimizer, unflatten_optimizer, with_prefix
from qfleet.replay import Batch, Replay
from qfleet.replay import describe as describe_replay
from qfleet.roles import Chunk, DQNLearner, UpdateStats
from qfleet.roles.clock import Clock
from qfleet.roles.learner import Staged
from qfleet.schedules import follow


@dataclass(frozen=True)
class RayOptions:
    """The ``runtime`` fields only the Ray backend reads (see config.RuntimeConfig)."""

    address: str = "local"
    replay_on: str = "learner"  # "learner" | "learner_node" | "actors"
    sample_requests: int = 4
    learner_host: str = "driver"  # "driver" | "actor"
    learner_device: str = "cpu"  # learner.device: what the learner actor asks Ray for
    torch_threads: int = 1  # runtime.torch_threads, for the learner actor
    group_name: str = ""  # the actors' placement group, for whoever must clean it up


@dataclass
class RoundReport:
    """What happened in one ``runner.step()``; the experiment loop aggregates these."""

    env_steps: int = 0
    updates: int = 0
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    steps_by_actor: dict[int, int] = field(default_factory=dict)
    returns_by_actor: dict[int, list[float]] = field(default_factory=dict)
    loss_sum: float = 0.0
    q_sum: float = 0.0
    loss_count: int = 0  # updates (actor-learner) or gradients (gradient schemes) in loss_sum
    staleness_sum: int = 0  # gradient schemes: global updates between compute and apply
    grads_applied: int = 0
    grads_dropped: int = 0
    param_lag_sum: int = 0
    chunks: int = 0
    epsilon: float | None = None  # of actor 0, for the progress line
    actor_restarts: int = 0
    notes: list[str] = field(default_factory=list)  # events worth a line on the console
    times: dict[str, float] = field(default_factory=dict)  # "role.activity" -> seconds

    def add_times(self, role: str, times: dict[str, float]) -> None:
        for activity, seconds in times.items():
            key = f"{role}.{activity}"
            self.times[key] = self.times.get(key, 0.0) + seconds

    def add_chunk(self, actor: int, chunk: Chunk, learner_version: int) -> None:
        self.env_steps += chunk.env_steps
        self.steps_by_actor[actor] = self.steps_by_actor.get(actor, 0) + chunk.env_steps
        self.episode_returns += chunk.episode_returns
        self.episode_lengths += chunk.episode_lengths
        self.returns_by_actor.setdefault(actor, []).extend(chunk.episode_returns)
        self.param_lag_sum += learner_version - chunk.param_version
        self.chunks += 1
        self.add_times("actor", chunk.times)
        if actor == 0:
            self.epsilon = chunk.epsilon

    def add_updates(self, stats: list[UpdateStats]) -> None:
        if stats:  # one sync for the whole round instead of one per update
            self.loss_sum += float(torch.stack([s.loss for s in stats]).sum())
            self.q_sum += float(torch.stack([s.q_mean for s in stats]).sum())
            self.updates += len(stats)
            self.loss_count += len(stats)


OUTSIDE = "outside"  # a clock's time between rounds (logging, evals): no role's


class Ahead:
    """``fn(*args)`` running in a thread from now on; ``result()`` waits and returns it
    (or raises what it raised)."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._out: Any = None
        self._err: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name="qfleet-sample-ahead")
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._out = fn(*args)
        except BaseException as err:  # handed to the caller of result()
            self._err = err

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self.wait()
        if self._err is not None:
            raise self._err
        return self._out

Tensors: TypeAlias = dict[str, torch.Tensor]
Meta: TypeAlias = dict[str, Any]
Arrays: TypeAlias = dict[str, np.ndarray]


class Runner(Protocol):
    """What the experiment loop (and a user driving a backend by hand) calls: one round of
    the scheme per ``step()``, the counters, the network to evaluate, checkpoint state.
    Every backend's runner, for both program shapes, is one."""

    @property
    def program(self) -> ActorLearnerProgram | GradientProgram: ...

    @property
    def env_steps(self) -> int: ...

    @property
    def updates(self) -> int: ...

    @property
    def replay_size(self) -> int: ...

    @property
    def policy_net(self) -> torch.nn.Module: ...

    def step(self) -> RoundReport: ...

    def describe(self) -> str:
        """One line for the start of a run."""
        ...

    def freeze(self) -> None:
        """Stop anything that writes the parameters outside ``step()`` (before a final
        eval and checkpoint)."""
        ...

    def state(self, with_replay: bool) -> tuple[Tensors, Meta, Arrays]: ...

    def dump_stacks(self, workers: list[int]) -> str:
        """Have these workers (actors or gradient workers) print where they are (the
        stall watchdog); says where the stacks went."""
        ...

    def restore(self, tensors: Tensors, meta: Meta, replay: Arrays) -> None: ...

    def close(self) -> None: ...


class LearnerSide:
    """Replay, learner and the counters that tie the update schedule to env steps."""

    def __init__(self, program: ActorLearnerProgram, replay: Replay | None = None) -> None:
        self.program = program
        self.replay = program.make_replay() if replay is None else replay
        self.learner = program.make_learner()
        self.env_steps = 0
        # Updates the schedule owed while a replay restored empty was refilling: forgiven,
        # so a resumed run does not burst hundreds of updates on a few fresh transitions.
        self.forgiven = 0
        self.refill_until = 0
        self.clock = Clock()  # the learner's own time split

    @property
    def updates(self) -> int:
        return self.learner.version

    @property
    def policy_net(self) -> torch.nn.Module:
        return self.learner.online

    def write(self, actor: int, chunk: Chunk, report: RoundReport) -> None:
        """Put one actor's chunk into the replay (its own shard, for Ape-X)."""
        shard = actor if self.program.shard_per_actor else None
        self.clock.lap("wait")
        self.replay.add(chunk.transitions, chunk.priorities_N, shard=shard)
        self.clock.lap("ingest")
        self.count(actor, chunk, report)

    def count(self, actor: int, chunk: Chunk, report: RoundReport) -> None:
        """Count a chunk's steps and episodes (its rows are in replay already)."""
        self.env_steps += chunk.env_steps
        report.add_chunk(actor, chunk, self.learner.version)

    def describe(self) -> str:
        return describe_replay(self.replay)

    def freeze(self) -> None:
        """Stop anything that writes the parameters outside ``step()`` (nothing here)."""

    def dump_stacks(self, actors: list[int]) -> str:
        return "actors in this process never stall without its round stalling"

    @property
    def replay_size(self) -> int:
        return len(self.replay)

    def step(self) -> RoundReport:
        """One round where actors run on their own (processes, Ray): take the chunks that
        arrived, train at most one round's updates, publish. Backpressure: while the
        learner owes more than a round it takes no chunks, so actors wait (for slots or
        calls) instead of outrunning the schedule's replay ratio."""
        report, per_round = RoundReport(), self.program.schedule.updates_per_round
        self.clock.lap(OUTSIDE)
        owed = self.updates_owed()
        if owed <= per_round:
            self._drain(report, wait=owed == 0)
        self._tend(report)
        self.clock.lap("wait")
        stats = self.train(min(self.updates_owed(), per_round))
        report.add_updates(stats)
        if stats:
            self._publish()
        self.clock_out(report)
        return report

    def clock_out(self, report: RoundReport) -> None:
        """The learner's time split of this round into ``report``."""
        self.clock.lap("publish")
        times = self.clock.take()
        times.pop(OUTSIDE, None)
        report.add_times("learner", times)

    def _drain(self, report: RoundReport, wait: bool) -> None:
        """Put every chunk that has arrived into replay (waiting briefly if ``wait``)."""
        raise NotImplementedError

    def _tend(self, report: RoundReport) -> None:
        """Once a round whatever the backpressure: notice lost workers, say what happened."""

    def _publish(self) -> None:
        """Make the learner's parameters the ones actors pull next."""
        raise NotImplementedError

    def updates_owed(self) -> int:
        sched = self.program.schedule
        if sched.on_policy:  # a rollout queue: train on every full batch in it
            return len(self.replay) // sched.batch_size
        owed = max(0, sched.updates_owed(self.env_steps) - self.learner.version - self.forgiven)
        if self.env_steps < self.refill_until:
            self.forgiven, owed = self.forgiven + owed, 0
        return owed

    def train(self, count: int) -> list[UpdateStats]:
        if count == 0:
            return []
        follow(self.learner, self.env_steps)  # the round's updates share one rate
        batch_size = self.program.schedule.batch_size
        clock = self.clock
        if not self.replay.prioritized:  # draws are independent: fetch the round at once
            batch = self.replay.sample(count * batch_size)
            clock.lap("sample")
            uniform_stats = self.learner.update_many(batch, count)
            clock.lap("update")
            return uniform_stats
        return self._train_prioritized(count, batch_size)

    def _train_prioritized(self, count: int, batch_size: int) -> list[UpdateStats]:
        """Draw `prefetch` batches at once (an Ape-X learner's prefetch queue), update on
        each, then write their priorities back; prefetch = 1 is strictly sequential. With
        background_sample the next group is drawn in a thread while this one trains, so
        it comes from the priorities before this group's are written."""
        groups = [min(self.program.schedule.prefetch, count - done)
                  for done in range(0, count, self.program.schedule.prefetch)]
        learner = cast(DQNLearner, self.learner)  # the only learner of a prioritized replay
        ahead: Ahead | None = None
        try:
            drawn, stats = self._draw(groups[0], batch_size, learner), list[UpdateStats]()
            for k, group in enumerate(groups):
                (batch, staged), later = drawn, groups[k + 1] if k + 1 < len(groups) else 0
                if later and self.program.schedule.background_sample:
                    ahead = Ahead(self._draw, later, batch_size, learner)
                self.clock.lap("sample")
                group_stats = (learner.update_many(batch, group) if staged is None
                               else learner.update_many(batch, group, staged))
                self.clock.lap("update")
                td_abs = torch.cat([s.td_abs_B for s in group_stats]).cpu().numpy()
                if ahead is not None:  # the thread must be done with the tree first
                    drawn, ahead = ahead.result(), None
                    self.clock.lap("sample")
                self.replay.update_priorities(batch.indices_B, td_abs)
                self.clock.lap("priorities")
                if later and not self.program.schedule.background_sample:
                    drawn = self._draw(later, batch_size, learner)
                stats += group_stats
            return stats
        finally:
            if ahead is not None:  # an update raised: leave the replay to no thread
                ahead.wait()

    def _draw(self, group: int, batch_size: int,
              learner: DQNLearner) -> tuple[Batch, Staged | None]:
        """``group`` batches in one draw (shuffled: stratified draws come out sorted), and,
        for a background draw, already on the learner's device."""
        batch = self.replay.sample(group * batch_size)
        if group > 1:
            batch = batch.take(self.replay.rng.permutation(len(batch)))
        staged = learner.stage(batch) if self.program.schedule.background_sample else None
        return batch, staged

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        """(tensors, JSON-able meta, replay arrays) for a checkpoint."""
        learner = self.learner
        tensors = {f"online.{k}": v for k, v in learner.online.state_dict().items()}
        if learner.target is not None:
            tensors |= {f"target.{k}": v for k, v in learner.target.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(learner.opt.state_dict())
        tensors |= opt_tensors
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"env_steps": self.env_steps, "updates": learner.version,
                "forgiven": self.forgiven, "refill_until": self.refill_until,
                "optimizer": opt_meta, "replay_rng": self.replay.rng.bit_generator.state,
                "actors": self._actor_states()}
        return tensors, meta, self.replay.state_dict() if with_replay else {}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        learner = self.learner
        learner.online.load_state_dict(with_prefix(tensors, "online."))
        if learner.target is not None:
            learner.target.load_state_dict(with_prefix(tensors, "target."))
        learner.opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        learner.version = meta["updates"]
        torch.set_rng_state(tensors["torch_rng"])
        self.env_steps = meta["env_steps"]
        self.replay.rng.bit_generator.state = meta["replay_rng"]
        self.forgiven, self.refill_until = meta["forgiven"], meta["refill_until"]
        if replay:
            self.replay.load_state_dict(replay)
        else:  # not saved (checkpoint.replay = false): collect afresh before training again
            self.refill_until = self.env_steps + self.program.schedule.learning_starts
        self._publish()
        self._restart_actors(meta.get("actors", []))

    def _actor_states(self) -> list[dict[str, Any]]:
        """What a checkpoint keeps of each actor: its incarnation. A resumed run restarts
        every actor as the next one, so it does not replay the first run's seeds, and
        chunks collected before the restore are void."""
        return [{"incarnation": k} for k in self._incarnations()]

    def _restart_actors(self, saved: list[dict[str, Any]]) -> None:
        for i, state in enumerate(saved[: len(self._incarnations())]):
            self._reincarnate(i, state["incarnation"] + 1)

    def _incarnations(self) -> list[int]:
        raise NotImplementedError

    def _reincarnate(self, i: int, incarnation: int) -> None:
        """Replace actor ``i`` by a fresh one numbered ``incarnation``."""
        raise NotImplementedError

