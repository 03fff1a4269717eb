"""Batch-synchronous groups on the processes backend (group_reduce), their rules in one
process: the group's step judges each gradient by the gate's staleness rule and makes the
step the gate makes; the round a replacement joins at; the main process answering joins
when a group has no member left; a turn on the shared model is one worker's at a time.
Real worker processes are in test_grad_processes, agreement with inline in
test_agreement."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

import qfleet
from qfleet.algos import build_program
from qfleet.roles.gradients import Aggregator, Gradient, GradientGate
from qfleet.runtime.allreduce import JOIN_ASK, JOIN_DONE, MEMBER_FROM, POSTED
from qfleet.runtime.group_reduce import Team, TeamKeeper, apply_round
from qfleet.runtime.shm import PauseGate

SMALL = ["actors.count=4", "algo.group_size=2", "env.num_envs=1", "net.hidden=[8]",
         "log.progress=false", "log.tensorboard=false"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _aggregator() -> Aggregator:
    program = build_program(qfleet.load_config("cartpole-batchsync", SMALL))
    torch.manual_seed(0)
    return program.make_aggregator()  # type: ignore[union-attr]


def _size(agg: Aggregator) -> int:
    return sum(p.numel() for p in agg.params)


def _team(agg: Aggregator) -> Team:
    return Team(2, _size(agg), mp.get_context("fork"))


def _grad(worker: int, base: int, size: int, seed: int, rows: int) -> Gradient:
    g = torch.Generator().manual_seed(seed)
    return Gradient(worker, base, env_steps=4, rows=rows, grads_P=torch.randn(size, generator=g))


@pytest.mark.parametrize("stale, ages", [("drop", (0, 0)), ("drop", (0, 3)),
                                         ("scale", (1, 3)), ("drop", (3, 5))])
def test_a_groups_step_is_the_step_the_gate_makes(stale: str, ages: tuple[int, int]) -> None:
    """Two members' gradients of different rows and ages against max_staleness 2: the
    group's step (in a turn, on the shared model) equals the inline gate's step on the
    same gradients, bit for bit, with the same counts."""
    version = 5
    ours, reference = _aggregator(), _aggregator()
    for agg in (ours, reference):
        agg.version_1.fill_(version)
    size = _size(ours)
    grads = [_grad(w, version - age, size, seed=w, rows=8 * (w + 1))
             for w, age in enumerate(ages)]
    rule = GradientGate(4, 2, max_staleness=2, stale=stale)
    team = _team(ours)
    for w, grad in enumerate(grads):
        team.post(w, 0, grad, 4)
    applied, staleness, dropped = apply_round(team, 0, [0, 1], ours, rule, env_steps=0)

    gate = GradientGate(4, 2, max_staleness=2, stale=stale)
    ready = None
    for grad in grads:
        ready = gate.offer(grad, version, {0, 1, 2, 3})
    if ready is not None:
        reference.apply(*ready)
    assert (applied, staleness, dropped) == ([gate.applied], [gate.staleness_sum], gate.dropped)
    assert ours.version == reference.version == version + (1 if gate.applied else 0)
    for key, value in ours.model.state_dict().items():
        assert torch.equal(value, reference.model.state_dict()[key]), key
    assert team.applied.value == 0  # the round is marked applied, also when all dropped


def test_a_replacement_is_told_the_round_it_joins_at() -> None:
    """Between rounds the leader makes a non-member a member from its next round; in a
    round a member waits for (wait mode), it tells the replacement that round."""
    agg = _aggregator()
    team = _team(agg)
    team.marks[MEMBER_FROM, 1] = -1  # proceed: taken out
    team.marks[JOIN_ASK, 1] = 2
    team.answer_asks(1, 7, between=True)  # not the leader (0)
    team.answer_asks(0, 7, between=False)  # mid-round, and 1 is no member
    assert int(team.marks[JOIN_DONE, 1]) == -1
    team.answer_asks(0, 7, between=True)
    assert int(team.marks[JOIN_DONE, 1]) == 2 and int(team.marks[MEMBER_FROM, 1]) == 7
    assert team.join_round(1, 2, lambda: True) == 7
    team.marks[JOIN_ASK, 1] = 3  # killed again; wait mode keeps it a member
    team.answer_asks(0, 9, between=False)
    assert int(team.marks[MEMBER_FROM, 1]) == 7 and team.join_round(1, 3, lambda: True) == 9


def test_a_groups_keeper_answers_when_no_member_is_left() -> None:
    """Both members dead: their replacements are told one round after any the dead
    posted, and those posts are void (the round waits for the replacements)."""
    agg = _aggregator()
    team = _team(agg)
    keeper = TeamKeeper(team, wait_for_restart=True)
    team.post(0, 4, _grad(0, 0, _size(agg), 0, 8), 4)  # worker 0 posted round 4, then died
    team.marks[JOIN_ASK, 0] = 1
    keeper.tend([True, False])  # 0's replacement runs, it is no member yet; 1 is dead
    assert team.leader.value == -1
    assert int(team.marks[JOIN_DONE, 0]) == 1 and int(team.start_round[0]) == 5
    assert (team.marks[POSTED:POSTED + 2] == -1).all()
    keeper.tend([True, True])  # now 0 is a member and answers the next one
    assert team.leader.value == 0
    keeper.lost(1)
    assert int(team.marks[MEMBER_FROM, 1]) == 0, "wait: a lost member stays one"
    TeamKeeper(team, wait_for_restart=False).lost(1)
    assert int(team.marks[MEMBER_FROM, 1]) == -1


def test_a_turn_is_one_workers_at_a_time_and_waits_for_a_pause() -> None:
    gate = PauseGate(3, mp.get_context("fork"))
    inside: list[int] = []
    overlaps: list[int] = []

    def take(worker: int) -> None:
        for _ in range(20):
            with gate.turn(worker):
                inside.append(worker)
                overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.remove(worker)

    threads = [threading.Thread(target=take, args=(w,)) for w in range(3)]
    with gate.paused(lambda _: True):  # no turn starts while the main process copies
        for t in threads:
            t.start()
        time.sleep(0.05)
        assert not overlaps
    for t in threads:
        t.join(timeout=10)
    assert len(overlaps) == 60 and max(overlaps) == 1
