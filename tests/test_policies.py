"""Exploration rates against hand-computed values: the linear epsilon schedule at its ends
and midpoints, the Ape-X ladder eps ** (1 + alpha * i / (N - 1)), and the epsilon each
actor's chunk reports, end to end through the programs that wire them."""

from __future__ import annotations

import numpy as np
import pytest

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.policies import EpsilonSchedule, Exploration, apex_epsilons

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("step, expected", [
    (0, 1.0), (250, 0.775), (500, 0.55), (750, 0.325), (1000, 0.1), (1001, 0.1),
    (5000, 0.1), (10_000, 0.1)])
def test_linear_schedule_at_its_ends_and_midpoints(step: int, expected: float) -> None:
    # 1.0 -> 0.1 over 1000 steps: 0.9 / 1000 per step, flat at 0.1 afterwards.
    assert EpsilonSchedule(1.0, 0.1, 1000)(step) == pytest.approx(expected, abs=1e-12)


def test_linear_schedule_rises_too_and_a_zero_duration_jumps_after_step_zero() -> None:
    rising = EpsilonSchedule(0.2, 0.6, 40)
    assert [rising(s) for s in (0, 10, 20, 40, 80)] == pytest.approx([0.2, 0.3, 0.4, 0.6, 0.6])
    instant = EpsilonSchedule(1.0, 0.05, 0)  # duration 0 counts as 1 step
    assert [instant(s) for s in (0, 1, 7)] == pytest.approx([1.0, 0.05, 0.05])


@pytest.mark.parametrize("num, eps, alpha, expected", [
    (1, 0.4, 7.0, [0.4]),
    (2, 0.4, 7.0, [0.4, 0.4 ** 8]),
    # N = 5: exponents 1, 2.75, 4.5, 6.25, 8 (i / (N - 1) = 0, 1/4, 1/2, 3/4, 1)
    (5, 0.4, 7.0, [0.4, 0.4 ** 2.75, 0.4 ** 4.5, 0.4 ** 6.25, 0.4 ** 8]),
    (3, 0.5, 2.0, [0.5, 0.25, 0.125]),
    (4, 0.3, 0.0, [0.3] * 4),
])
def test_apex_ladder_by_hand(num: int, eps: float, alpha: float,
                             expected: list[float]) -> None:
    ladder = apex_epsilons(num, eps, alpha)
    assert ladder == pytest.approx(expected, rel=1e-12)
    # The paper's ends: the first actor explores with eps, the last with eps ** (1 + alpha).
    assert ladder[0] == pytest.approx(eps) and ladder[-1] == pytest.approx(
        eps if num == 1 else eps ** (1 + alpha))


def _program(preset: str, *overrides: str) -> ActorLearnerProgram:
    cfg = qfleet.load_config(preset, ["env.num_envs=1", "net.hidden=[8]", "log.progress=false",
                                      "log.tensorboard=false", *overrides])
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    return program


def test_each_apex_actor_reports_its_own_epsilon() -> None:
    """Actor i of N = 3 explores with 0.5 ** (1 + 3 i / 2): 0.5, 0.5 ** 2.5, 0.5 ** 4."""
    program = _program("cartpole-apex", "actors.count=3", "actors.apex_eps=0.5",
                       "actors.apex_alpha=3.0")
    expected = [0.5, 0.5 ** 2.5, 0.5 ** 4]
    for i in range(3):
        actor = program.make_actor(i, 0)
        try:
            chunks = [actor.collect(4) for _ in range(3)]  # fixed: it does not anneal
        finally:
            actor.close()
        assert [c.epsilon for c in chunks] == pytest.approx([expected[i]] * 3, rel=1e-12), i


def test_dqn_actor_epsilon_anneals_over_its_share_of_the_run() -> None:
    """cartpole-dqn, 2 actors, 4000 steps: each actor anneals 1.0 -> 0.1 over
    0.25 * 4000 / 2 = 500 of its own env steps."""
    program = _program("cartpole-dqn", "actors.count=2", "train.total_env_steps=4000",
                       "actors.eps_start=1.0", "actors.eps_end=0.1",
                       "actors.eps_fraction=0.25")
    actor = program.make_actor(1, 0)
    try:
        seen = [actor.collect(125).epsilon for _ in range(6)]  # after 125, 250, ... steps
    finally:
        actor.close()
    assert seen == pytest.approx([0.775, 0.55, 0.325, 0.1, 0.1, 0.1], abs=1e-12)


@pytest.mark.parametrize("kind, expected", [
    # 1.0 -> 0.1 over 500 steps at 0, 125, 250, 375, 500, 750 steps
    ("linear", [1.0, 0.775, 0.55, 0.325, 0.1, 0.1]),
    # 0.1 + 0.9 * (1 + cos(pi * done)) / 2: done 1/4 -> 0.1 + 0.45 * (1 + 1/sqrt(2))
    ("cosine", [1.0, 0.1 + 0.45 * (1 + 2 ** -0.5), 0.55, 0.1 + 0.45 * (1 - 2 ** -0.5), 0.1,
                0.1]),
    ("constant", [1.0] * 6),
])
def test_epsilon_schedules_by_hand(kind: str, expected: list[float]) -> None:
    schedule = EpsilonSchedule(1.0, 0.1, 500, kind)
    got = [schedule(step) for step in (0, 125, 250, 375, 500, 750)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_the_configured_epsilon_schedule_reaches_the_actors() -> None:
    """actors.eps_schedule = cosine, wired through cartpole-dqn: 1.0 -> 0.1 over 500 steps."""
    program = _program("cartpole-dqn", "train.total_env_steps=2000", "actors.eps_end=0.1",
                       "actors.eps_fraction=0.25", "actors.eps_schedule='cosine'")
    actor = program.make_actor(0, 0)
    try:
        seen = [actor.collect(125).epsilon for _ in range(2)]
    finally:
        actor.close()
    assert seen == pytest.approx([0.1 + 0.45 * (1 + 2 ** -0.5), 0.55], abs=1e-12)


def test_epsilon_greedy_explores_at_the_given_rate() -> None:
    """Each env explores with probability epsilon (then a uniform action, so it repeats
    the greedy one 1/A of the time): P(not greedy) = epsilon (A - 1) / A."""
    rng = np.random.default_rng(0)
    q_EA = np.tile(np.array([[0.0, 5.0, 1.0, 2.0]]), (20_000, 1))  # greedy action 1
    for epsilon in (0.0, 0.1, 0.5, 1.0):
        # a chunk of two steps, each at its own rate
        draws = Exploration.draw(np.array([epsilon, 1.0 - epsilon]), len(q_EA), 4, rng)
        assert draws.all_explore(0) == (epsilon == 1.0)
        for t, rate in enumerate((epsilon, 1.0 - epsilon)):
            off = float(np.mean(draws.actions(t, q_EA) != 1))
            expected = rate * 3 / 4
            assert abs(off - expected) < 4 * np.sqrt(max(expected * (1 - expected), 1e-9)
                                                     / len(q_EA)) + 1e-9, (rate, off)
