"""Losses: pure functions from a batch and networks to (loss, per-sample TD errors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qfleet.nets import ActorCritic


@dataclass
class TorchBatch:
    obs_BO: torch.Tensor
    action_B: torch.Tensor
    reward_B: torch.Tensor
    discount_B: torch.Tensor
    next_obs_BO: torch.Tensor
    weights_B: torch.Tensor | None  # importance weights; None = uniform sampling

    def rows(self, start: int, stop: int) -> TorchBatch:
        w = self.weights_B
        return TorchBatch(self.obs_BO[start:stop], self.action_B[start:stop],
                          self.reward_B[start:stop], self.discount_B[start:stop],
                          self.next_obs_BO[start:stop], None if w is None else w[start:stop])


@dataclass
class LossOut:
    loss: torch.Tensor  # scalar, differentiable
    td_B: torch.Tensor  # target - q, detached: prioritized replay turns it into priorities
    q_mean: torch.Tensor  # detached, for logging


def bootstrap_target(online: nn.Module, target: nn.Module, batch: TorchBatch, *, double: bool,
                     next_target_BA: torch.Tensor | None = None) -> torch.Tensor:
    """y = r + discount * Q_target(s', a*), a* = argmax online (double) or target; no grad.

    ``discount`` already folds gamma**n and termination (0 = no bootstrap).
    """
    with torch.no_grad():
        if next_target_BA is None:
            next_target_BA = target(batch.next_obs_BO)
        if double:  # choose with the online net, evaluate with the target (van Hasselt 2016)
            next_action_B = online(batch.next_obs_BO).argmax(dim=1)
            next_q_B = next_target_BA.gather(1, next_action_B.unsqueeze(1)).squeeze(1)
        else:
            next_q_B = next_target_BA.max(dim=1).values
        return batch.reward_B + batch.discount_B * next_q_B


def dqn_loss(online: nn.Module, target: nn.Module, batch: TorchBatch, *, double: bool,
             huber: bool, next_target_BA: torch.Tensor | None = None) -> LossOut:
    """n-step (double) DQN, IS-weighted Huber/L2 on y - Q(s, a).

    ``next_target_BA`` may hold target(next_obs) computed ahead (the target net is frozen
    between hard copies, so a learner can evaluate it for many batches in one pass).
    """
    q_BA = online(batch.obs_BO)
    q_B = q_BA.gather(1, batch.action_B.unsqueeze(1)).squeeze(1)
    y_B = bootstrap_target(online, target, batch, double=double, next_target_BA=next_target_BA)
    td_B = y_B - q_B
    if huber:
        per_sample_B = F.smooth_l1_loss(q_B, y_B, reduction="none")
    else:
        per_sample_B = 0.5 * td_B.pow(2)
    if batch.weights_B is not None:
        per_sample_B = batch.weights_B * per_sample_B
    loss = per_sample_B.mean()
    return LossOut(loss, td_B.detach(), q_B.detach().mean())


@torch.no_grad()
def td_abs(net: nn.Module, batch: TorchBatch, *, double: bool) -> torch.Tensor:
    """|y - Q(s, a)| with one network as both online and target: how an Ape-X actor scores
    its own transitions with its local copy before the learner ever sees them."""
    q_B = net(batch.obs_BO).gather(1, batch.action_B.unsqueeze(1)).squeeze(1)
    return (bootstrap_target(net, net, batch, double=double) - q_B).abs()


def ac_loss(net: ActorCritic, batch: TorchBatch, *, value_coef: float,
            entropy_coef: float) -> LossOut:
    """Advantage actor-critic on n-step transitions (A2C/A3C, Mnih et al. 2016).

    Target y = r + discount * V(s') (no grad), advantage = y - V(s). Loss = policy gradient
    -log pi(a|s) * advantage + value_coef * (y - V(s))^2 - entropy_coef * H(pi(.|s)),
    all batch means (the value term as SB3's A2C writes it, MSE without a 1/2).
    ``td_B`` is the advantage; ``q_mean`` the mean V(s).
    """
    logits_BA, value_B = net.logits_value(batch.obs_BO)
    with torch.no_grad():
        next_value_B = net.logits_value(batch.next_obs_BO)[1]
        y_B = batch.reward_B + batch.discount_B * next_value_B
    adv_B = y_B - value_B.detach()
    logp_BA = F.log_softmax(logits_BA, dim=1)
    logp_B = logp_BA.gather(1, batch.action_B.unsqueeze(1)).squeeze(1)
    entropy_B = -(logp_BA.exp() * logp_BA).sum(dim=1)
    loss = (-(adv_B * logp_B).mean() + value_coef * F.mse_loss(value_B, y_B)
            - entropy_coef * entropy_B.mean())
    return LossOut(loss, adv_B, value_B.detach().mean())
