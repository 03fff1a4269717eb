"""Ape-X / distributed prioritized experience replay (Horgan et al. 2018).

Row of DESIGN.md: loss DQN, data path sharded prioritized replay with actor-computed
initial priorities, aggregation single learner. Differences from DQN, all wiring:
- actor i explores with a fixed eps_i = eps ** (1 + alpha * i / (N - 1));
- each actor scores its transitions with its local network (|n-step TD error|, from the
  Q-values it acted with) so new data enters replay with a meaningful priority instead of
  the running maximum;
- the replay has one prioritized shard per actor, sampled by total priority.
"""

from __future__ import annotations

import dataclasses

from qfleet.algos.dqn import wire
from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import Config
from qfleet.policies import Constant, apex_epsilons


def build(cfg: Config) -> ActorLearnerProgram:
    epsilons = apex_epsilons(cfg.actors.count, cfg.actors.apex_eps, cfg.actors.apex_alpha)
    replay_cfg = dataclasses.replace(cfg.replay, kind="prioritized", shards=cfg.actors.count)
    return wire(cfg, tuple(Constant(e) for e in epsilons),
                scores=True, replay_cfg=replay_cfg, shard_per_actor=True)
