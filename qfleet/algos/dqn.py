"""DQN (Mnih et al. 2015) with double, dueling, n-step and Huber options.

Row of DESIGN.md: loss DQN, data path local replay, aggregation single learner.
Wiring only: actors write n-step chunks into the replay, one learner samples it, and
actors pull the learner's snapshot when its version moved. ``wire`` is shared with
Ape-X, which differs only in exploration, initial priorities and replay shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from qfleet.algos.program import ActorLearnerProgram, Schedule
from qfleet.config import Config, ReplayConfig, replay_kind_of
from qfleet.envs import probe_spaces
from qfleet.nets import QNetwork, make_q_network
from qfleet.policies import LinearSchedule
from qfleet.replay import Replay, make_replay, transition_spec
from qfleet.roles import Actor, DQNLearner
from qfleet.roles.actor import PriorityFn

EpsilonFor = Callable[[int], Callable[[int], float]]  # actor index -> (env steps -> epsilon)


def build(cfg: Config) -> ActorLearnerProgram:
    steps_per_actor = cfg.train.total_env_steps // cfg.actors.count
    epsilon = LinearSchedule(cfg.actors.eps_start, cfg.actors.eps_end,
                             int(cfg.actors.eps_fraction * steps_per_actor))
    replay_cfg = dataclasses.replace(cfg.replay, kind=replay_kind_of(cfg))
    return wire(cfg, lambda index: epsilon, priority_fn=None, replay_cfg=replay_cfg)


def wire(cfg: Config, epsilon_for: EpsilonFor, priority_fn: PriorityFn | None,
         replay_cfg: ReplayConfig, shard_per_actor: bool = False) -> ActorLearnerProgram:
    obs_shape, obs_dtype, num_actions = probe_spaces(cfg.env)

    def new_net() -> QNetwork:
        return make_q_network(cfg.net, obs_shape, num_actions)

    torch.manual_seed(cfg.seed)
    learner_net = new_net()  # built first so a seed gives the same initial weights

    def make_actor(index: int, incarnation: int) -> Actor:
        return Actor(cfg.env, new_net(), n_step=cfg.algo.n_step, gamma=cfg.algo.gamma,
                     epsilon=epsilon_for(index), seed=cfg.seed, index=index,
                     incarnation=incarnation, priority_fn=priority_fn)

    def make_learner() -> DQNLearner:
        return DQNLearner(learner_net, cfg.learner, cfg.algo)

    def make_replay_() -> Replay:
        return make_replay(replay_cfg, obs_shape, obs_dtype,
                           np.random.default_rng([cfg.seed, 7919]),
                           anneal_steps=cfg.train.total_env_steps)

    def make_shard(index: int, count: int) -> Replay:
        one = dataclasses.replace(replay_cfg, shards=1,
                                  capacity=max(1, replay_cfg.capacity // count))
        return make_replay(one, obs_shape, obs_dtype,
                           np.random.default_rng([cfg.seed, 7919, index]),
                           anneal_steps=cfg.train.total_env_steps)

    return ActorLearnerProgram(
        num_actors=cfg.actors.count,
        make_actor=make_actor,
        make_learner=make_learner,
        make_replay=make_replay_,
        make_shard=make_shard,
        shard_per_actor=shard_per_actor,
        make_eval_net=new_net,
        schedule=Schedule(batch_size=cfg.learner.batch_size,
                          learning_starts=cfg.learner.learning_starts,
                          train_every=cfg.learner.train_every,
                          updates_per_round=cfg.learner.updates_per_round,
                          chunk_steps=cfg.actors.chunk_size,
                          max_replay_ratio=cfg.learner.max_replay_ratio,
                          prefetch=cfg.learner.prefetch),
        sync_every=cfg.actors.sync_every,
        record=transition_spec(obs_shape, obs_dtype),
        # every env emits at most one transition per step, plus its n-1 pending at an end
        max_chunk_rows=(cfg.actors.chunk_size + cfg.algo.n_step - 1) * cfg.env.num_envs)
