"""What an algorithm hands a backend: role factories plus the schedule that connects them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from torch import nn

from qfleet.replay import Replay
from qfleet.roles import Actor, DQNLearner


@dataclass(frozen=True)
class Schedule:
    batch_size: int
    learning_starts: int  # env steps before the first update
    train_every: int  # env steps per training round
    updates_per_round: int
    chunk_steps: int  # vector steps per actor chunk
    max_replay_ratio: float = 0.0  # 0 = no cap beyond the round schedule
    prefetch: int = 1  # prioritized batches drawn before their priorities are written back

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
    make_learner: Callable[[], DQNLearner]
    make_replay: Callable[[], Replay]
    make_eval_net: Callable[[], nn.Module]
    schedule: Schedule
    sync_every: int  # env steps an actor takes between checks for new parameters
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    max_chunk_rows: int  # the most transitions one chunk can hold (sizes transport slots)
