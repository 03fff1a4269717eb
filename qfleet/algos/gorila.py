"""Parallel DQN / Gorila (Nair et al. 2015), and its batch-synchronous variant.

Row of DESIGN.md: loss DQN, data path local replay per worker (or one shared replay, or
sharded prioritized replay: reference article §3.2), aggregation sync / async / grouped.
Wiring only: each worker is an epsilon-greedy actor with its own local model and target
network; its DQN gradients go to the aggregator, which owns the global model and
refreshes the global target every ``learner.target_update_every`` global updates.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from qfleet.algos.program import GradientProgram, gradient_program
from qfleet.config import Config, ReplayConfig, replay_kind_of
from qfleet.envs import probe_spaces
from qfleet.losses import LossOut, TorchBatch, dqn_loss
from qfleet.nets import make_q_network
from qfleet.policies import EpsilonSchedule
from qfleet.replay import Replay, make_replay
from qfleet.replay.arrays import Alloc, zeros
from qfleet.roles import Actor
from qfleet.roles.gradients import Aggregator, GradientWorker, LossFn
from qfleet.schedules import LrSchedule


def build(cfg: Config) -> GradientProgram:
    obs_shape, obs_dtype, num_actions = probe_spaces(cfg.env)
    scope, workers = cfg.replay.scope, cfg.actors.count
    replay_cfg = dataclasses.replace(cfg.replay, kind=replay_kind_of(cfg))
    if scope == "sharded":  # one prioritized shard per worker, sampled by every worker
        replay_cfg = dataclasses.replace(cfg.replay, kind="prioritized", shards=workers)
    epsilon = EpsilonSchedule(cfg.actors.eps_start, cfg.actors.eps_end,
                              int(cfg.actors.eps_fraction * cfg.train.total_env_steps // workers),
                              cfg.actors.eps_schedule)
    new_net = partial(make_q_network, cfg.net, obs_shape, num_actions)
    torch.manual_seed(cfg.seed)
    online = new_net()  # built first so a seed gives the same initial weights
    model = nn.ModuleDict({"online": online, "target": copy.deepcopy(online)})
    loss_fn = partial(_loss, double=cfg.algo.double, huber=cfg.learner.huber)

    parts = Parts(cfg, obs_shape, obs_dtype, replay_cfg, epsilon, new_net, loss_fn)
    return gradient_program(
        cfg, make_worker=parts.make_worker, make_aggregator=partial(Aggregator, model, cfg.learner,
                                                              schedule=LrSchedule.of(cfg)),
        make_shared_replay=None if scope == "local" else partial(parts.new_replay, (0,)),
        make_eval_net=new_net, hogwild=False,
        local_replay=scope == "local")


@dataclass(frozen=True)
class Parts:
    """What workers and replays are built from: plain data and bound methods, so the
    program pickles to spawned worker processes."""

    cfg: Config
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    replay_cfg: ReplayConfig
    epsilon: EpsilonSchedule
    new_net: Callable[[], nn.Module]
    loss_fn: LossFn

    def new_replay(self, stream: tuple[int, ...], alloc: Alloc = zeros) -> Replay:
        return make_replay(self.replay_cfg, self.obs_shape, self.obs_dtype,
                           np.random.default_rng([self.cfg.seed, 7919, *stream]),
                           anneal_steps=self.cfg.train.total_env_steps, alloc=alloc)

    def make_worker(self, index: int, incarnation: int, shared: Replay | None) -> GradientWorker:
        cfg, local = self.cfg, self.cfg.replay.scope == "local"
        actor = Actor(cfg.env, self.new_net(), n_step=cfg.algo.n_step, gamma=cfg.algo.gamma,
                      epsilon=self.epsilon, seed=cfg.seed, index=index, incarnation=incarnation)
        replay = self.new_replay((1 + index, incarnation)) if local else shared
        return GradientWorker(index, actor, self.new_net().requires_grad_(False), replay,
                              self.loss_fn, chunk_steps=cfg.actors.chunk_size,
                              batch_size=cfg.learner.batch_size,
                              learning_starts=cfg.learner.learning_starts, owns_replay=local)


def _loss(online: nn.Module, target: nn.Module | None, batch: TorchBatch, *, double: bool,
          huber: bool) -> LossOut:
    assert target is not None, "a DQN worker always holds a target network"
    return dqn_loss(online, target, batch, double=double, huber=huber)
