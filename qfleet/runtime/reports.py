"""What workers that step a model themselves tell whoever counts them (the main process,
the Ray driver): their reports, merged over rounds so each message carries many rounds'
counts, and whether they stopped at the run's budget."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from qfleet.roles.gradients import Gradient


class Outbox:
    """A member's reports, merged and sent at most every REPORT_S: each message wakes the
    main process, which on 2 cores cost the sender 0.2-0.5 ms of a 5 ms round."""

    def __init__(self, send: Callable[[Gradient], None], every_s: float) -> None:
        self.send, self.every_s, self.sent = send, every_s, time.monotonic()
        self.held: Gradient | None = None

    def add(self, grad: Gradient) -> None:
        self.held = grad if self.held is None else merge(self.held, grad)
        if time.monotonic() - self.sent >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.held is not None:
            self.send(self.held)
        self.held, self.sent = None, time.monotonic()


def merge(held: Gradient, grad: Gradient) -> Gradient:
    """``grad``'s counts added to ``held`` (a member's reports; losses summed over the
    steps that had a gradient, with ``reports`` saying how many)."""
    held.env_steps += grad.env_steps
    held.episode_returns += grad.episode_returns
    held.episode_lengths += grad.episode_lengths
    for activity, seconds in grad.times.items():
        held.times[activity] = held.times.get(activity, 0.0) + seconds
    held.epsilon = held.epsilon if grad.epsilon is None else grad.epsilon
    if grad.groups:
        if not held.groups:  # nothing of held's counted in the losses
            held.loss, held.q_mean, held.reports = 0.0, 0.0, 0
        held.loss, held.q_mean = held.loss + grad.loss, held.q_mean + grad.q_mean
        held.reports += grad.reports
        held.groups += grad.groups
        held.stale += grad.stale
        held.dropped += grad.dropped
        held.applied_at, held.base_version = grad.applied_at, grad.base_version
    return held


def budget_spent(budget: int, env_steps: int) -> bool:
    """The run's budget (train.total_env_steps; 0 = none) is reached at ``env_steps``."""
    return 0 < budget <= env_steps


def all_spent(spent_W: Sequence[int], alive: list[bool]) -> bool:
    """Every live worker marked itself stopped at the budget (its reports sent)."""
    return any(alive) and all(spent_W[i] == 1 for i, up in enumerate(alive) if up)
