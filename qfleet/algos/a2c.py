"""A2C: synchronous advantage actor-critic.

Row of DESIGN.md: loss advantage actor-critic, data path on-policy rollout, aggregation
sync. Each worker steps its envs ``actors.chunk_size`` vector steps, sampling actions
from the policy, and turns the rollout into ``algo.n_step`` returns bootstrapped with
V(s'); the aggregator averages the W workers' gradients into one step, which equals one
batched update over all rollouts. ``wire`` is shared with A3C, which differs only in
aggregation (async, Hogwild on the processes backend).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from qfleet.algos.program import GradientProgram, gradient_program
from qfleet.config import Config
from qfleet.envs import probe_spaces
from qfleet.losses import LossOut, TorchBatch, ac_loss
from qfleet.nets import ActorCritic, make_actor_critic
from qfleet.policies import Constant
from qfleet.replay import Replay
from qfleet.roles import Actor
from qfleet.roles.gradients import Aggregator, GradientWorker, LossFn
from qfleet.schedules import LrSchedule


def build(cfg: Config) -> GradientProgram:
    return wire(cfg, hogwild=False)


def wire(cfg: Config, hogwild: bool) -> GradientProgram:
    obs_shape, _, num_actions = probe_spaces(cfg.env)
    new_net = partial(make_actor_critic, cfg.net, obs_shape, num_actions)
    torch.manual_seed(cfg.seed)
    model = nn.ModuleDict({"online": new_net()})
    loss_fn = partial(_loss, value_coef=cfg.algo.value_coef, entropy_coef=cfg.algo.entropy_coef)
    return gradient_program(
        cfg, make_worker=partial(_make_worker, cfg, new_net, loss_fn),
        make_aggregator=partial(Aggregator, model, cfg.learner, schedule=LrSchedule.of(cfg)),
        make_shared_replay=None, make_eval_net=new_net, hogwild=hogwild,
        batch_size=cfg.actors.chunk_size * cfg.env.num_envs)  # the rollout is the batch


def _make_worker(cfg: Config, new_net: Callable[[], nn.Module], loss_fn: LossFn, index: int,
                 incarnation: int, shared: Replay | None) -> GradientWorker:
    """An actor-critic worker: its rollout is its batch (no replay)."""
    return GradientWorker(index, make_ac_actor(cfg, new_net(), index, incarnation), None,
                          None, loss_fn, chunk_steps=cfg.actors.chunk_size,
                          batch_size=cfg.learner.batch_size, learning_starts=0)


def make_ac_actor(cfg: Config, net: nn.Module, index: int, incarnation: int) -> Actor:
    """An actor that samples its actions from the policy logits (no epsilon)."""
    return Actor(cfg.env, net, n_step=cfg.algo.n_step, gamma=cfg.algo.gamma,
                 epsilon=Constant(0.0), seed=cfg.seed, index=index,
                 incarnation=incarnation, sample=True)


def _loss(online: nn.Module, target: nn.Module | None, batch: TorchBatch, *,
          value_coef: float, entropy_coef: float) -> LossOut:
    assert isinstance(online, ActorCritic)
    return ac_loss(online, batch, value_coef=value_coef, entropy_coef=entropy_coef)
