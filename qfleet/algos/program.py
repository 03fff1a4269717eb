"""What an algorithm hands a backend: role factories plus the schedule that connects them.

Two shapes of program cover every row of DESIGN.md's table: actors feeding one learner
(DQN, Ape-X, A3C's queue variant), and gradient workers feeding an aggregator (Gorila,
batch-synchronous DQN, A3C, A2C)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from qfleet.config import Config, aggregation_of, group_size_of
from qfleet.replay import RecordSpec, Replay
from qfleet.replay.arrays import Alloc
from qfleet.roles import Actor, DQNLearner
from qfleet.roles.ac_learner import ACLearner
from qfleet.roles.gradients import Aggregator, GradientWorker


@dataclass(frozen=True)
class Schedule:
    batch_size: int
    learning_starts: int  # env steps before the first update
    train_every: int  # env steps per training round
    updates_per_round: int
    chunk_steps: int  # vector steps per actor chunk
    max_replay_ratio: float = 0.0  # 0 = no cap beyond the round schedule
    prefetch: int = 1  # prioritized batches drawn before their priorities are written back
    background_sample: bool = False  # draw the next prioritized group while this one trains
    on_policy: bool = False  # the replay is a queue: one update per batch_size rows in it

    @property
    def target_replay_ratio(self) -> float | None:
        """Sampled / inserted transitions the schedule aims at (None: on-policy)."""
        if self.on_policy:
            return None
        ratio = self.updates_per_round * self.batch_size / self.train_every
        return min(ratio, self.max_replay_ratio) if self.max_replay_ratio > 0 else ratio

    def updates_owed(self, env_steps: int) -> int:
        """Total updates due after ``env_steps`` (the replay ratio, as a step function)."""
        if env_steps < self.learning_starts:
            return 0
        rounds = (env_steps - self.learning_starts) // self.train_every + 1
        owed = rounds * self.updates_per_round
        if self.max_replay_ratio > 0:
            owed = min(owed, int(self.max_replay_ratio * env_steps / self.batch_size))
        return owed


@dataclass(frozen=True)
class ActorLearnerProgram:
    """Actors -> replay -> learner, parameters flowing back as versioned snapshots."""

    num_actors: int
    make_actor: Callable[[int, int], Actor]  # (actor index, incarnation) -> Actor
    make_learner: Callable[[], DQNLearner | ACLearner]
    make_replay: Callable[[], Replay]
    make_eval_net: Callable[[], nn.Module]
    schedule: Schedule
    sync_every: int  # env steps an actor takes between checks for new parameters
    record: RecordSpec  # the fields of the transitions actors send (transports copy by it)
    max_chunk_rows: int  # the most transitions one chunk can hold (sizes transport slots)
    # One shard of ``count`` that together hold the replay (a shard per actor, for a
    # backend that keeps the replay beside its writers); None: the replay is not shardable.
    make_shard: Callable[[int, int], Replay] | None = None
    # Actor i writes to shard i of a sharded replay (Ape-X); else writes spread over the
    # shards round-robin, so every shard fills whatever the actor count.
    shard_per_actor: bool = False

    @property
    def batch_size(self) -> int:
        return self.schedule.batch_size


class ReplayMaker(Protocol):
    """Builds the replay several workers share; ``alloc``: where its arrays live (a
    backend with worker processes puts them in shared memory)."""

    def __call__(self, alloc: Alloc = ...) -> Replay: ...


@dataclass(frozen=True)
class GradientProgram:
    """Workers -> gradients -> aggregator -> versioned parameters -> workers.

    Workers send one gradient per ``work()``; ``group_size`` of them are averaged into one
    global step (W = sync, 1 = async); a worker pulls the global parameters after every
    ``sync_every`` gradients it sent. ``hogwild``: on a multi-process backend the workers
    apply their own gradients to a shared-memory global model instead of sending them.
    """

    num_workers: int
    make_worker: Callable[[int, int, Replay | None], GradientWorker]  # index, incarnation,
    # the replay every worker shares (scope shared/sharded), or None: each its own or none
    make_aggregator: Callable[[], Aggregator]
    make_shared_replay: ReplayMaker | None
    make_eval_net: Callable[[], nn.Module]
    group_size: int
    max_staleness: int
    stale: str  # "drop" | "scale"
    wait_for_restart: bool  # sync: a lost worker's group waits for its replacement
    sync_every: int
    hogwild: bool
    batch_size: int
    local_replay: bool = False  # each worker keeps its own replay (checkpointed by the backend)
    sync: bool = False  # aggregation sync: one group of all workers, every step waits for all
    total_env_steps: int = 0  # the run's budget (0: none): a sync group that steps on its own
    # stops there

    @property
    def num_actors(self) -> int:
        return self.num_workers


def gradient_program(cfg: Config, *, make_worker: Callable[[int, int, Replay | None],
                                                         GradientWorker],
                     make_aggregator: Callable[[], Aggregator],
                     make_shared_replay: ReplayMaker | None,
                     make_eval_net: Callable[[], nn.Module], hogwild: bool,
                     batch_size: int | None = None,
                     local_replay: bool = False) -> GradientProgram:
    """The aggregation fields every gradient scheme reads the same way from ``cfg``."""
    return GradientProgram(
        num_workers=cfg.actors.count, make_worker=make_worker,
        make_aggregator=make_aggregator, make_shared_replay=make_shared_replay,
        make_eval_net=make_eval_net, group_size=group_size_of(cfg),
        max_staleness=cfg.algo.max_staleness, stale=cfg.algo.stale,
        wait_for_restart=cfg.algo.on_worker_loss == "wait", sync_every=cfg.algo.sync_every,
        hogwild=hogwild, batch_size=batch_size or cfg.learner.batch_size,
        local_replay=local_replay, sync=aggregation_of(cfg) == "sync",
        total_env_steps=cfg.train.total_env_steps)
