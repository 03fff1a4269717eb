"""Actor-critic learner for A3C's queue variant (GA3C, Babaeizadeh et al. 2017).

Actors push rollouts into one queue; ``trainers`` threads each pop a batch, compute the
gradient at the global parameters and apply it to the global model. Each trainer thread
computes on its own copy of the parameters taken when it starts (the optimizer writes
the global ones in place, which would break a backward pass running on them); only the
copy and the optimizer step hold the lock. PyTorch releases the GIL inside its kernels,
so trainers overlap.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from qfleet.config import AlgoConfig, LearnerConfig
from qfleet.losses import TorchBatch, ac_loss
from qfleet.nets import ActorCritic
from qfleet.replay import Batch
from qfleet.roles.learner import UpdateStats, make_optimizer, pick_device, to_torch
from qfleet.roles.params import ParamSnapshot
from qfleet.schedules import LrSchedule


class ACLearner:
    target: nn.Module | None = None  # no target network in actor-critic

    def __init__(self, net: ActorCritic, cfg: LearnerConfig, algo: AlgoConfig,
                 schedule: LrSchedule | None = None) -> None:
        self.cfg, self.algo, self.schedule = cfg, algo, schedule
        self.device = pick_device(cfg.device)
        self.online: ActorCritic = net.to(self.device)
        self.params = list(self.online.parameters())
        self.opt = make_optimizer(self.params, cfg)
        self.version = 0
        self.step_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(algo.trainers) if algo.trainers > 1 else None
        self.local = threading.local()

    def update_many(self, batch: Batch, count: int) -> list[UpdateStats]:
        data = to_torch(batch, self.device)
        size = len(batch) // count
        slices = [data.rows(k * size, (k + 1) * size) for k in range(count)]
        if self.pool is None:
            return [self._train_one(s) for s in slices]
        return list(self.pool.map(self._train_one, slices))

    def _train_one(self, batch: TorchBatch) -> UpdateStats:
        net = self.online
        if self.pool is not None:  # a private copy of the global parameters
            if not hasattr(self.local, "net"):
                self.local.net = copy.deepcopy(self.online)
            net = self.local.net
            with self.step_lock, torch.no_grad():
                torch._foreach_copy_(list(net.parameters()), list(self.online.parameters()))
        out = ac_loss(net, batch, value_coef=self.algo.value_coef,
                      entropy_coef=self.algo.entropy_coef)
        grads = torch.autograd.grad(out.loss, list(net.parameters()))
        with self.step_lock:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            if self.cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
            self.opt.step()
            self.version += 1
        return UpdateStats(out.loss.detach(), out.td_B.abs(), out.q_mean)

    def snapshot(self) -> ParamSnapshot:
        return ParamSnapshot.of(self.online, self.version)
