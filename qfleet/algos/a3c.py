"""A3C (Mnih et al. 2016), in two modes.

Row of DESIGN.md: loss advantage actor-critic, data path on-policy rollout, aggregation
async. ``algo.a3c_mode``:
- "hogwild": A2C's workers, but every gradient is applied on arrival. On the processes
  backend the global model and the optimizer state live in shared memory and each worker
  applies its own gradients lock-free (Recht et al. 2011): no parameter server, no
  waiting, at the price of updates that may overwrite each other half-way.
- "queue" (GA3C, reference article §3.3): actors only act, with periodically refreshed
  local copies, and push rollouts into one global queue; ``algo.trainers`` trainer
  threads pop them and apply gradients to the global model. Actors and trainers are the
  actor-learner program of DQN with an actor-critic learner and a FIFO instead of replay.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from qfleet.algos.a2c import make_ac_actor, wire
from qfleet.algos.program import ActorLearnerProgram, GradientProgram, Schedule
from qfleet.config import Config
from qfleet.envs import probe_spaces
from qfleet.nets import make_actor_critic
from qfleet.replay import RolloutQueue, transition_spec
from qfleet.roles import Actor
from qfleet.roles.ac_learner import ACLearner
from qfleet.schedules import LrSchedule


def build(cfg: Config) -> GradientProgram | ActorLearnerProgram:
    if cfg.algo.a3c_mode == "queue":
        return build_queue(cfg)
    return wire(cfg, hogwild=True)


def _make_actor(cfg: Config, new_net: Callable[[], nn.Module], index: int,
                incarnation: int) -> Actor:
    return make_ac_actor(cfg, new_net(), index, incarnation)


def _make_queue(cfg: Config) -> RolloutQueue:
    return RolloutQueue(cfg.replay.capacity, np.random.default_rng([cfg.seed, 7919]))


def build_queue(cfg: Config) -> ActorLearnerProgram:
    obs_shape, obs_dtype, num_actions = probe_spaces(cfg.env)
    new_net = partial(make_actor_critic, cfg.net, obs_shape, num_actions)
    torch.manual_seed(cfg.seed)
    global_net = new_net()
    batch = cfg.learner.batch_size
    return ActorLearnerProgram(
        num_actors=cfg.actors.count,
        make_actor=partial(_make_actor, cfg, new_net),
        make_learner=partial(ACLearner, global_net, cfg.learner, cfg.algo,
                             schedule=LrSchedule.of(cfg)),
        make_replay=partial(_make_queue, cfg),
        make_eval_net=new_net,
        schedule=Schedule(batch_size=batch, learning_starts=0, train_every=batch,
                          updates_per_round=cfg.learner.updates_per_round,
                          chunk_steps=cfg.actors.chunk_size, on_policy=True),
        sync_every=cfg.actors.sync_every,
        record=transition_spec(obs_shape, obs_dtype),
        max_chunk_rows=(cfg.actors.chunk_size + cfg.algo.n_step - 1) * cfg.env.num_envs)
