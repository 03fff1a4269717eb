"""The gradient loop's rules, written once in GlobalSide for every transport: who a group
waits for after a loss, when a replacement joins, when a worker's token (its shared slot,
on the processes backend) goes back, and that new parameters are published before it.
Driven through a global side with a recording transport, with hand-made gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _runners import gradient_program

from qfleet.algos import GradientProgram
from qfleet.config import load_config
from qfleet.roles.gradients import Gradient
from qfleet.runtime import RoundReport
from qfleet.runtime.global_side import GlobalSide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Recording(GlobalSide):
    """A transport that only writes down what the loop asked of it, in order."""

    def __init__(self, program: GradientProgram) -> None:
        super().__init__(program)
        self.calls: list[tuple[str, Any]] = []

    def _publish(self) -> None:
        self.calls.append(("publish", self.updates))

    def _release(self, token: Any) -> None:
        self.calls.append(("release", token))


def _side(preset: str, *overrides: str) -> Recording:
    cfg = load_config(preset, list(overrides))
    return Recording(gradient_program(cfg))


def _grad(side: GlobalSide, worker: int, base_version: int) -> Gradient:
    size = sum(p.numel() for p in side.aggregator.params)
    return Gradient(worker, base_version, env_steps=1, grads_P=torch.full((size,), 0.01),
                    rows=1)


def test_sync_group_proceeds_without_a_lost_worker_and_a_stale_first_gradient_is_sent_back(
        ) -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='proceed'")
    report = RoundReport()
    side.take(_grad(side, 0, 0), True, "slot-0", report)
    assert side.updates == 0 and side.calls == [], "sync waits for worker 1"
    side.lost(0, report)  # worker 0 died with its gradient in the gate
    assert side.live == {1}
    side.take(_grad(side, 1, 0), True, "slot-1", report)
    # the step averaged worker 0's last gradient and worker 1's; new parameters first,
    # then worker 1's slot goes back (a dead worker's slot is not given back)
    assert side.updates == 1 and report.grads_applied == 2
    assert side.calls == [("publish", 1), ("release", "slot-1")]
    side.calls.clear()
    side.take(_grad(side, 1, 1), True, "slot-1", report)  # worker 1 goes on alone
    assert side.updates == 2 and side.calls == [("publish", 2), ("release", "slot-1")]
    side.calls.clear()
    # The replacement's first gradient was computed on version 1: the group stepped
    # without it since, so it is not averaged in; its slot goes back at once.
    side.take(_grad(side, 0, 1), True, "slot-0b", report)
    assert side.updates == 2 and side.calls == [("release", "slot-0b")]
    assert 0 not in side.live and report.grads_applied == 3
    side.calls.clear()
    # A gradient of an older incarnation does not make the worker join either.
    side.take(_grad(side, 0, 2), False, "slot-0-old", report)
    assert 0 not in side.live
    side.calls.clear()
    # On the current version it joins, and the group waits for both again.
    side.take(_grad(side, 0, 2), True, "slot-0b", report)
    assert side.live == {0, 1} and side.calls == []
    side.take(_grad(side, 1, 2), True, "slot-1", report)
    assert side.updates == 3
    assert side.calls == [("publish", 3), ("release", "slot-0b"), ("release", "slot-1")]


def test_in_wait_mode_the_group_waits_for_the_replacement() -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='wait'")
    report = RoundReport()
    side.lost(0, report)
    assert side.live == {0, 1}
    side.take(_grad(side, 1, 0), True, "slot-1", report)
    assert side.updates == 0 and side.calls == [], "a step was taken without worker 0"
    side.take(_grad(side, 0, 0), True, "slot-0", report)
    assert side.updates == 1


def test_async_replacement_is_never_held_back() -> None:
    """Async has no group to rejoin: the replacement's first gradient is judged by the
    staleness rule like any other, not sent back for being one version old."""
    side = _side("cartpole-gorila-async", "algo.max_staleness=4")
    report = RoundReport()
    side.take(_grad(side, 1, 0), True, "slot-1", report)
    side.lost(0, report)
    assert side.live == {0, 1}
    side.take(_grad(side, 0, 0), True, "slot-0", report)  # one version old
    assert side.updates == 2 and report.grads_applied == 2 and report.staleness_sum == 1
    assert side.calls == [("publish", 1), ("release", "slot-1"),
                          ("publish", 2), ("release", "slot-0")]


def test_a_restore_forgets_what_the_old_workers_held() -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='proceed'", "actors.count=3")
    report = RoundReport()
    side.take(_grad(side, 0, 0), True, "slot-0", report)
    side.lost(1, report)
    assert side.gate.pending and side.held and side.waiting
    side._forget_workers()
    assert not side.gate.pending and not side.held and side.live == {0, 1, 2}
