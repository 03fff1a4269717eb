"""Ape-X / distributed prioritized experience replay (Horgan et al. 2018).

Row of DESIGN.md: loss DQN, data path sharded prioritized replay with actor-computed
initial priorities, aggregation single learner. Differences from DQN, all wiring:
- actor i explores with a fixed eps_i = eps ** (1 + alpha * i / (N - 1));
- each actor scores its chunk with its local network (|n-step TD error|) so new data
  enters replay with a meaningful priority instead of the running maximum;
- the replay has one prioritized shard per actor, sampled by total priority.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import torch
from torch import nn

from qfleet.algos.dqn import wire
from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import Config
from qfleet.losses import TorchBatch, td_abs
from qfleet.policies import Constant, apex_epsilons
from qfleet.replay import Transitions


def build(cfg: Config) -> ActorLearnerProgram:
    epsilons = apex_epsilons(cfg.actors.count, cfg.actors.apex_eps, cfg.actors.apex_alpha)
    replay_cfg = dataclasses.replace(cfg.replay, kind="prioritized", shards=cfg.actors.count)
    return wire(cfg, tuple(Constant(e) for e in epsilons),
                priority_fn=partial(priorities, double=cfg.algo.double),
                replay_cfg=replay_cfg, shard_per_actor=True)


def priorities(net: nn.Module, data: Transitions, *, double: bool) -> np.ndarray:
    """An actor's |n-step TD error| of its own transitions, with its local network."""
    t = torch.from_numpy
    batch = TorchBatch(t(data.obs_NO), t(data.action_N), t(data.reward_N),
                       t(data.discount_N), t(data.next_obs_NO), weights_B=None)
    return td_abs(net, batch, double=double).numpy()
