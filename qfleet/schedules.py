"""Rates over a run's env steps: the learning rate (``learner.lr_schedule``) and the shape
every schedule shares (``ramp``: constant, linear or half-cosine from a start to an end),
which the exploration rate uses too (``actors.eps_schedule``).

Whoever steps an optimizer sets its rate from the env steps it knows of just before the
step (``follow``), so a schedule needs no state of its own and a resumed run continues it
exactly: the rate is a function of the checkpointed env steps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from qfleet.config import Config


def ramp(kind: str, start: float, end: float, done: float) -> float:
    """The rate ``done`` (0 .. 1, clipped) of the way from ``start`` to ``end``."""
    done = min(max(done, 0.0), 1.0)
    if kind == "linear":
        return start + (end - start) * done
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * done))
    return start


@dataclass(frozen=True)
class LrSchedule:
    kind: str  # constant, linear, cosine
    start: float
    end: float
    horizon: int  # env steps at which the rate reaches ``end``

    @classmethod
    def of(cls, cfg: Config) -> LrSchedule:
        return cls(cfg.learner.lr_schedule, cfg.learner.lr, cfg.learner.lr_final,
                   cfg.train.total_env_steps)

    def at(self, env_steps: int) -> float:
        return ramp(self.kind, self.start, self.end, env_steps / self.horizon)


class _Stepper(Protocol):
    opt: torch.optim.Optimizer
    schedule: LrSchedule | None


def follow(owner: _Stepper, env_steps: int) -> None:
    """Set ``owner``'s optimizer to its schedule's rate at ``env_steps``."""
    if owner.schedule is not None and owner.schedule.kind != "constant":
        lr = owner.schedule.at(env_steps)
        for group in owner.opt.param_groups:
            group["lr"] = lr
