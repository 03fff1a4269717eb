"""DQN (Mnih et al. 2015) with double, dueling, n-step and Huber options.

Row of DESIGN.md: loss DQN, data path local replay, aggregation single learner.
Wiring only: actors write n-step chunks into the replay, one learner samples it, and
actors pull the learner's snapshot when its version moved. ``wire`` is shared with
Ape-X, which differs only in exploration, initial priorities and replay shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from qfleet.algos.program import ActorLearnerProgram, Schedule
from qfleet.config import Config, ReplayConfig, replay_kind_of
from qfleet.envs import probe_spaces
from qfleet.nets import QNetwork, make_q_network
from qfleet.policies import EpsilonSchedule
from qfleet.replay import Replay, make_replay, transition_spec
from qfleet.roles import Actor, DQNLearner
from qfleet.roles.learner import pick_device
from qfleet.schedules import LrSchedule

Epsilon = Callable[[int], float]  # env steps -> exploration rate


def build(cfg: Config) -> ActorLearnerProgram:
    steps_per_actor = cfg.train.total_env_steps // cfg.actors.count
    epsilon = EpsilonSchedule(cfg.actors.eps_start, cfg.actors.eps_end,
                              int(cfg.actors.eps_fraction * steps_per_actor),
                              cfg.actors.eps_schedule)
    replay_cfg = dataclasses.replace(cfg.replay, kind=replay_kind_of(cfg))
    return wire(cfg, (epsilon,) * cfg.actors.count, scores=False, replay_cfg=replay_cfg)


@dataclass(frozen=True)
class Parts:
    """What the roles are built from. Plain data and bound methods only, so a program can
    be pickled to workers that are spawned rather than forked."""

    cfg: Config
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    num_actions: int
    epsilons: tuple[Epsilon, ...]  # actor i explores with epsilons[i]
    scores: bool  # actors score their transitions' initial priorities (Ape-X)
    replay_cfg: ReplayConfig
    learner_net: QNetwork

    def new_net(self) -> QNetwork:
        return make_q_network(self.cfg.net, self.obs_shape, self.num_actions)

    def make_actor(self, index: int, incarnation: int) -> Actor:
        cfg = self.cfg
        return Actor(cfg.env, self.new_net(), n_step=cfg.algo.n_step, gamma=cfg.algo.gamma,
                     epsilon=self.epsilons[index], seed=cfg.seed, index=index,
                     incarnation=incarnation, scores=self.scores)

    def make_learner(self) -> DQNLearner:
        return DQNLearner(self.learner_net, self.cfg.learner, self.cfg.algo,
                          schedule=LrSchedule.of(self.cfg))

    def make_replay(self) -> Replay:
        return make_replay(self.replay_cfg, self.obs_shape, self.obs_dtype,
                           np.random.default_rng([self.cfg.seed, 7919]),
                           anneal_steps=self.cfg.train.total_env_steps)

    def make_shard(self, index: int, count: int) -> Replay:
        one = dataclasses.replace(self.replay_cfg, shards=1,
                                  capacity=max(1, self.replay_cfg.capacity // count))
        return make_replay(one, self.obs_shape, self.obs_dtype,
                           np.random.default_rng([self.cfg.seed, 7919, index]),
                           anneal_steps=self.cfg.train.total_env_steps)


def background_sample(cfg: Config) -> bool:
    """learner.background_sample resolved: auto is on where the learner trains on CUDA
    and the replay is in its process (a replay on Ray actors prefetches by itself)."""
    if cfg.learner.background_sample != "auto":
        return cfg.learner.background_sample == "on"
    return cfg.runtime.replay_on == "learner" and pick_device(cfg.learner.device).type == "cuda"


def wire(cfg: Config, epsilons: tuple[Epsilon, ...], scores: bool,
         replay_cfg: ReplayConfig, shard_per_actor: bool = False) -> ActorLearnerProgram:
    obs_shape, obs_dtype, num_actions = probe_spaces(cfg.env)
    torch.manual_seed(cfg.seed)
    # The learner's net is built first, so a seed gives the same initial weights.
    parts = Parts(cfg, obs_shape, obs_dtype, num_actions, epsilons, scores, replay_cfg,
                  make_q_network(cfg.net, obs_shape, num_actions))
    return ActorLearnerProgram(
        num_actors=cfg.actors.count,
        make_actor=parts.make_actor,
        make_learner=parts.make_learner,
        make_replay=parts.make_replay,
        make_shard=parts.make_shard,
        shard_per_actor=shard_per_actor,
        make_eval_net=parts.new_net,
        schedule=Schedule(batch_size=cfg.learner.batch_size,
                          learning_starts=cfg.learner.learning_starts,
                          train_every=cfg.learner.train_every,
                          updates_per_round=cfg.learner.updates_per_round,
                          chunk_steps=cfg.actors.chunk_size,
                          max_replay_ratio=cfg.learner.max_replay_ratio,
                          prefetch=cfg.learner.prefetch,
                          background_sample=background_sample(cfg)),
        sync_every=cfg.actors.sync_every,
        record=transition_spec(obs_shape, obs_dtype),
        # every env emits at most one transition per step, plus its n-1 pending at an end
        max_chunk_rows=(cfg.actors.chunk_size + cfg.algo.n_step - 1) * cfg.env.num_envs)
