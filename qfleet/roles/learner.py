"""Learner: owns the online/target networks and optimizer; one update per sampled batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qfleet.config import AlgoConfig, LearnerConfig
from qfleet.losses import TorchBatch, dqn_loss
from qfleet.replay import Batch
from qfleet.roles.params import ParamSnapshot


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("learner.device = 'cuda' but torch sees no CUDA device; "
                           "use 'auto' or 'cpu'")
    return torch.device(name)


@dataclass
class UpdateStats:
    loss: torch.Tensor  # detached scalar; .item() only when logged (no per-update sync)
    td_abs_B: torch.Tensor
    q_mean: torch.Tensor


class DQNLearner:
    def __init__(self, net: nn.Module, cfg: LearnerConfig, algo: AlgoConfig) -> None:
        self.cfg, self.algo = cfg, algo
        self.device = pick_device(cfg.device)
        self.online = net.to(self.device)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.opt = torch.optim.Adam(self.online.parameters(), lr=cfg.lr, eps=cfg.adam_eps)
        self.version = 0  # number of updates applied

    def _to_torch(self, batch: Batch) -> TorchBatch:
        d, dev = batch.data, self.device
        return TorchBatch(
            obs_BO=torch.from_numpy(d.obs_NO).to(dev, non_blocking=True),
            action_B=torch.from_numpy(d.action_N).to(dev, non_blocking=True),
            reward_B=torch.from_numpy(d.reward_N).to(dev, non_blocking=True),
            discount_B=torch.from_numpy(d.discount_N).to(dev, non_blocking=True),
            next_obs_BO=torch.from_numpy(d.next_obs_NO).to(dev, non_blocking=True),
            weights_B=torch.from_numpy(np.ascontiguousarray(batch.weights_B)).to(dev))

    def update(self, batch: Batch) -> UpdateStats:
        out = dqn_loss(self.online, self.target, self._to_torch(batch),
                       double=self.algo.double, huber=self.cfg.huber)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(self.online.parameters(), self.cfg.max_grad_norm)
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
