"""The gradient loop's rules, written once in GlobalSide for every transport: who a group
waits for after a loss and when a replacement joins. Driven through a bare global side
with hand-made gradients."""

from __future__ import annotations

import pytest
import torch
from _runners import gradient_program

from qfleet.config import load_config
from qfleet.roles.gradients import Gradient
from qfleet.runtime import RoundReport
from qfleet.runtime.global_side import GlobalSide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _side(preset: str, *overrides: str) -> GlobalSide:
    cfg = load_config(preset, list(overrides))
    return GlobalSide(gradient_program(cfg))


def _grad(side: GlobalSide, worker: int, base_version: int) -> Gradient:
    size = sum(p.numel() for p in side.aggregator.params)
    return Gradient(worker, base_version, env_steps=1, grads_P=torch.full((size,), 0.01),
                    rows=1)


def test_sync_group_proceeds_without_a_lost_worker_and_a_stale_first_gradient_is_dropped(
        ) -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='proceed'")
    report = RoundReport()
    side.take(_grad(side, 0, 0), True, report)
    assert side.updates == 0, "sync waits for worker 1"
    side.lost(0, report)  # worker 0 died with its gradient in the gate
    assert side.live == {1}
    side.take(_grad(side, 1, 0), True, report)
    # the step averaged worker 0's last gradient and worker 1's
    assert side.updates == 1 and report.grads_applied == 2
    side.take(_grad(side, 1, 1), True, report)  # worker 1 goes on alone
    assert side.updates == 2 and report.grads_applied == 3
    # The replacement's first gradient was computed on version 1: the group stepped
    # without it since, so it is counted but not averaged in, and it does not join yet.
    side.take(_grad(side, 0, 1), True, report)
    assert side.updates == 2 and report.grads_applied == 3 and report.env_steps == 4
    assert 0 not in side.live and not side.gate.pending
    # A gradient of an older incarnation does not make the worker join either.
    side.take(_grad(side, 0, 2), False, report)
    assert 0 not in side.live
    # On the current version it joins, and the group waits for both again.
    side.take(_grad(side, 0, 2), True, report)
    assert side.live == {0, 1} and side.updates == 2
    side.take(_grad(side, 1, 2), True, report)
    assert side.updates == 3 and report.grads_applied == 5


def test_in_wait_mode_the_group_waits_for_the_replacement() -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='wait'")
    report = RoundReport()
    side.lost(0, report)
    assert side.live == {0, 1}
    side.take(_grad(side, 1, 0), True, report)
    assert side.updates == 0, "a step was taken without worker 0"
    side.take(_grad(side, 0, 0), True, report)
    assert side.updates == 1


def test_async_replacement_is_never_held_back() -> None:
    """Async has no group to rejoin: the replacement's first gradient is judged by the
    staleness rule like any other, not sent back for being one version old."""
    side = _side("cartpole-gorila-async", "algo.max_staleness=4")
    report = RoundReport()
    side.take(_grad(side, 1, 0), True, report)
    side.lost(0, report)
    assert side.live == {0, 1}
    side.take(_grad(side, 0, 0), True, report)  # one version old
    assert side.updates == 2 and report.grads_applied == 2 and report.staleness_sum == 1


def test_a_restore_forgets_what_the_old_workers_sent() -> None:
    side = _side("cartpole-gorila-sync", "algo.on_worker_loss='proceed'", "actors.count=3")
    report = RoundReport()
    side.take(_grad(side, 0, 0), True, report)
    side.lost(1, report)
    assert side.gate.pending and side.waiting
    side._forget_workers()
    assert not side.gate.pending and side.live == {0, 1, 2}
