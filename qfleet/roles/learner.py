"""Learner: owns the online/target networks and optimizer; one update per sampled batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
from torch import nn

from qfleet.config import AlgoConfig, ConfigError, LearnerConfig
from qfleet.losses import TorchBatch, dqn_loss
from qfleet.replay import Batch
from qfleet.roles.params import ParamSnapshot
from qfleet.schedules import LrSchedule


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("learner.device = 'cuda': torch sees no CUDA device on this "
                          "machine; allowed here: 'auto', 'cpu'")
    return torch.device(name)


def make_optimizer(params: list[nn.Parameter], cfg: LearnerConfig) -> torch.optim.Optimizer:
    """Adam (fused: one kernel over all parameters instead of a Python loop per tensor), or
    RMSprop with alpha 0.99 as A2C/A3C use it."""
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.99, eps=cfg.adam_eps)
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, fused=True)


def to_torch(batch: Batch, device: torch.device, pin: bool = False) -> TorchBatch:
    """The batch as tensors on ``device`` (CPU: the same memory). ``pin``: through page-
    locked memory, so the copy to a GPU runs while the caller goes on."""
    d = batch.data

    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if device.type == "cpu":
            return t
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    return TorchBatch(put(d.obs_NO), put(d.action_N), put(d.reward_N), put(d.discount_N),
                      put(d.next_obs_NO), None if batch.weights_B is None else put(batch.weights_B))


Staged: TypeAlias = TorchBatch  # a batch already on the learner's device (``stage``)


@dataclass
class UpdateStats:
    loss: torch.Tensor  # detached scalar; .item() only when logged (no per-update sync)
    td_abs_B: torch.Tensor
    q_mean: torch.Tensor


class DQNLearner:
    def __init__(self, net: nn.Module, cfg: LearnerConfig, algo: AlgoConfig,
                 schedule: LrSchedule | None = None) -> None:
        self.cfg, self.algo, self.schedule = cfg, algo, schedule
        self.device = pick_device(cfg.device)
        self.online = net.to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.params = list(self.online.parameters())
        self.opt = make_optimizer(self.params, cfg)
        self.version = 0  # number of updates applied

    def update(self, batch: Batch) -> UpdateStats:
        return self.update_many(batch, 1)[0]

    def stage(self, batch: Batch) -> Staged:
        """The batch on the learner's device, copied through pinned memory (for a thread
        that prepares the next batches while this learner trains)."""
        return to_torch(batch, self.device, pin=True)

    def update_many(self, batch: Batch, count: int,
                    staged: Staged | None = None) -> list[UpdateStats]:
        """``count`` sequential updates on consecutive equal slices of one big batch
        (``staged``: the batch already on the device, from ``stage``).

        Between hard target copies the target net is frozen, so target(next_obs) for all
        those slices is one forward pass instead of ``count`` small ones.
        """
        data = to_torch(batch, self.device) if staged is None else staged
        size = len(batch.indices_B) // count
        stats: list[UpdateStats] = []
        while len(stats) < count:
            span = count - len(stats)
            if self.cfg.tau < 1.0:  # Polyak: the target moves every update
                span = 1
            else:
                span = min(span, self.cfg.target_update_every
                           - self.version % self.cfg.target_update_every)
            first = len(stats) * size
            with torch.no_grad():
                next_target_NA = self.target(data.next_obs_BO[first: first + span * size])
            for k in range(span):
                rows = data.rows(first + k * size, first + (k + 1) * size)
                stats.append(self._step(rows, next_target_NA[k * size: (k + 1) * size]))
        return stats

    def _step(self, batch: TorchBatch, next_target_BA: torch.Tensor) -> UpdateStats:
        out = dqn_loss(self.online, self.target, batch, double=self.algo.double,
                       huber=self.cfg.huber, next_target_BA=next_target_BA)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm, foreach=True)
        self.opt.step()
        self.version += 1
        self._update_target()
        return UpdateStats(out.loss.detach(), out.td_B.abs(), out.q_mean)

    @torch.no_grad()
    def _update_target(self) -> None:
        if self.cfg.tau < 1.0:
            for t, o in zip(self.target.parameters(), self.online.parameters(), strict=True):
                t.lerp_(o, self.cfg.tau)
        elif self.version % self.cfg.target_update_every == 0:
            self.target.load_state_dict(self.online.state_dict())

    def snapshot(self) -> ParamSnapshot:
        return ParamSnapshot.of(self.online, self.version)
