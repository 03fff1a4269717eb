"""NStepAccumulator against hand-computed tables and a naive per-episode reference.

Observations encode (env, step) so every emitted transition can be traced back to the
step it starts at: obs = [e, t]; the next obs of a step that does not end the episode is
[e, t + 1]; the true final obs of a step that ends it is [e, -(t + 1)] (so it differs from
the reset obs, as with SAME_STEP autoreset).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from qfleet.replay.nstep import NStepAccumulator
from qfleet.replay.transitions import Transitions


def obs_at(num_envs: int, t: int) -> np.ndarray:
    return np.stack([np.arange(num_envs), np.full(num_envs, t)], axis=1).astype(np.float32)


def next_obs_at(num_envs: int, t: int, done_E: np.ndarray) -> np.ndarray:
    nxt = obs_at(num_envs, t + 1)
    nxt[done_E, 1] = -(t + 1)
    return nxt


def drive(acc: NStepAccumulator, reward_TE: np.ndarray, term_TE: np.ndarray,
          trunc_TE: np.ndarray, action_TE: np.ndarray | None = None) -> list[Transitions]:
    """Feed T vector steps; returns what each step emitted."""
    steps, num_envs = reward_TE.shape
    if action_TE is None:
        action_TE = np.tile(np.arange(num_envs), (steps, 1)) + 10 * np.arange(steps)[:, None]
    out = []
    for t in range(steps):
        done_E = term_TE[t] | trunc_TE[t]
        out.append(acc.step(obs_at(num_envs, t), action_TE[t].astype(np.int64),
                            reward_TE[t].astype(np.float32), next_obs_at(num_envs, t, done_E),
                            term_TE[t], trunc_TE[t]))
    return out


def rows(tr: Transitions) -> dict[tuple[int, int], tuple[int, float, float, tuple[float, ...]]]:
    """(env, start step) -> (action, reward, discount, next_obs)."""
    out = {}
    for i in range(len(tr)):
        key = (int(tr.obs_NO[i, 0]), int(tr.obs_NO[i, 1]))
        assert key not in out, f"transition {key} emitted twice in one step"
        out[key] = (int(tr.action_N[i]), float(tr.reward_N[i]), float(tr.discount_N[i]),
                    tuple(float(x) for x in tr.next_obs_NO[i]))
    return out


def assert_rows_close(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, (action, reward, discount, nxt) in expected.items():
        g_action, g_reward, g_discount, g_next = got[key]
        assert g_action == action, key
        assert g_reward == pytest.approx(reward, rel=1e-5, abs=1e-5), key
        assert g_discount == pytest.approx(discount, rel=1e-6, abs=1e-7), key
        assert g_next == nxt, key


def act(e: int, t: int) -> int:  # the default actions drive() takes
    return e + 10 * t


def test_n1_two_envs_by_hand() -> None:
    g = 0.9
    acc = NStepAccumulator(1, g, 2, (2,), np.dtype(np.float32))
    reward = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    term = np.array([[False, False], [True, False], [False, False]])
    trunc = np.array([[False, False], [False, True], [False, False]])
    out = drive(acc, reward, term, trunc)
    assert_rows_close(rows(out[0]), {(0, 0): (act(0, 0), 1.0, g, (0.0, 1.0)),
                                     (1, 0): (act(1, 0), 2.0, g, (1.0, 1.0))})
    # step 1: env 0 terminates (no bootstrap), env 1 is truncated (bootstrap gamma**1
    # from the true final obs)
    assert_rows_close(rows(out[1]), {(0, 1): (act(0, 1), 3.0, 0.0, (0.0, -2.0)),
                                     (1, 1): (act(1, 1), 4.0, g, (1.0, -2.0))})
    assert_rows_close(rows(out[2]), {(0, 2): (act(0, 2), 5.0, g, (0.0, 3.0)),
                                     (1, 2): (act(1, 2), 6.0, g, (1.0, 3.0))})


def test_n3_three_envs_by_hand() -> None:
    """gamma = 0.5. env 0 never ends; env 1 terminates at step 1; env 2 is truncated at
    step 3 with a full window pending."""
    acc = NStepAccumulator(3, 0.5, 3, (2,), np.dtype(np.float32))
    reward = np.array([[1, 10, 100], [2, 20, 200], [3, 30, 300], [4, 40, 400], [5, 50, 500]],
                      dtype=np.float64)
    term = np.zeros((5, 3), dtype=bool)
    trunc = np.zeros((5, 3), dtype=bool)
    term[1, 1] = True
    trunc[3, 2] = True
    out = drive(acc, reward, term, trunc)

    assert len(out[0]) == 0
    # step 1: env 1 flushes steps 0-1 with discount 0, both towards its final obs
    assert_rows_close(rows(out[1]), {
        (1, 0): (act(1, 0), 10 + 0.5 * 20, 0.0, (1.0, -2.0)),
        (1, 1): (act(1, 1), 20.0, 0.0, (1.0, -2.0))})
    # step 2: env 0 and env 2 complete their first 3-step window
    assert_rows_close(rows(out[2]), {
        (0, 0): (act(0, 0), 1 + 0.5 * 2 + 0.25 * 3, 0.125, (0.0, 3.0)),
        (2, 0): (act(2, 0), 100 + 0.5 * 200 + 0.25 * 300, 0.125, (2.0, 3.0))})
    # step 3: env 0 one full window; env 2 truncated: partial sums, gamma**k bootstrap
    assert_rows_close(rows(out[3]), {
        (0, 1): (act(0, 1), 2 + 0.5 * 3 + 0.25 * 4, 0.125, (0.0, 4.0)),
        (2, 1): (act(2, 1), 200 + 0.5 * 300 + 0.25 * 400, 0.125, (2.0, -4.0)),
        (2, 2): (act(2, 2), 300 + 0.5 * 400, 0.25, (2.0, -4.0)),
        (2, 3): (act(2, 3), 400.0, 0.5, (2.0, -4.0))})
    # step 4: env 0 and env 1 (whose second episode began at step 2) complete windows
    assert_rows_close(rows(out[4]), {
        (0, 2): (act(0, 2), 3 + 0.5 * 4 + 0.25 * 5, 0.125, (0.0, 5.0)),
        (1, 2): (act(1, 2), 30 + 0.5 * 40 + 0.25 * 50, 0.125, (1.0, 5.0))})
    assert acc.pending_E.tolist() == [2, 2, 1]


def test_dtypes_and_lengths() -> None:
    acc = NStepAccumulator(2, 0.99, 2, (2,), np.dtype(np.float32))
    out = drive(acc, np.ones((3, 2)), np.zeros((3, 2), bool), np.zeros((3, 2), bool))
    tr = Transitions.concat(out)
    assert len(tr) == 4
    assert tr.obs_NO.dtype == np.float32 and tr.next_obs_NO.dtype == np.float32
    assert tr.action_N.dtype == np.int64
    assert tr.reward_N.dtype == np.float32 and tr.discount_N.dtype == np.float32


# ---------------------------------------------------------------- naive reference


@dataclass
class Step:
    t: int
    action: int
    reward: float
    next_obs: tuple[float, float]
    term: bool
    trunc: bool


def reference(n: int, gamma: float, reward_TE: np.ndarray, action_TE: np.ndarray,
              term_TE: np.ndarray, trunc_TE: np.ndarray) -> dict[int, dict]:
    """Step index -> the rows that must be emitted at that step, built episode by episode."""
    steps, num_envs = reward_TE.shape
    emitted: dict[int, dict] = {t: {} for t in range(steps)}
    for e in range(num_envs):
        episode: list[Step] = []
        episodes = []
        for t in range(steps):
            done = bool(term_TE[t, e] or trunc_TE[t, e])
            nxt = (float(e), float(-(t + 1) if done else t + 1))
            episode.append(Step(t, int(action_TE[t, e]), float(reward_TE[t, e]), nxt,
                                bool(term_TE[t, e]), bool(trunc_TE[t, e])))
            if done:
                episodes.append(episode)
                episode = []
        episodes.append(episode)  # unfinished: only full windows are due
        for ep in episodes:
            ended = bool(ep) and (ep[-1].term or ep[-1].trunc)
            for i, first in enumerate(ep):
                window = ep[i:i + n]
                reward = sum(gamma ** k * s.reward for k, s in enumerate(window))
                last = window[-1]
                if last is ep[-1] and ended:  # the episode ends inside the window
                    discount = 0.0 if last.term else gamma ** len(window)
                elif len(window) == n:
                    discount = gamma ** n
                else:
                    continue  # still pending at the end of the sequence
                emitted[last.t][(e, first.t)] = (first.action, reward, discount, last.next_obs)
    return emitted


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_matches_naive_reference_over_long_random_sequence(n: int) -> None:
    rng = np.random.default_rng(n)
    steps, num_envs, gamma = 1500, 4, 0.9
    reward = rng.normal(size=(steps, num_envs)).round(3)
    action = rng.integers(0, 6, size=(steps, num_envs))
    term = rng.random((steps, num_envs)) < 0.06
    trunc = ~term & (rng.random((steps, num_envs)) < 0.04)
    trunc[-1] = ~term[-1]  # every env ends on the last step: nothing may stay pending
    acc = NStepAccumulator(n, gamma, num_envs, (2,), np.dtype(np.float32))
    out = drive(acc, reward, term, trunc, action)  # compared only at the end: no aliasing

    expected = reference(n, gamma, reward, action, term, trunc)
    for t in range(steps):
        assert_rows_close(rows(out[t]), expected[t])
    everything = Transitions.concat(out)
    assert len(everything) == steps * num_envs
    starts = {(int(e), int(t)) for e, t in everything.obs_NO}
    assert len(starts) == steps * num_envs  # each step starts exactly one transition
    assert acc.pending_E.tolist() == [0] * num_envs


def test_count_plus_pending_equals_steps_mid_stream() -> None:
    rng = np.random.default_rng(7)
    steps, num_envs, n = 1000, 5, 4
    acc = NStepAccumulator(n, 0.99, num_envs, (2,), np.dtype(np.float32))
    term = rng.random((steps, num_envs)) < 0.03
    trunc = rng.random((steps, num_envs)) < 0.02
    reward = rng.normal(size=(steps, num_envs)).astype(np.float32)
    total = 0
    for t in range(steps):
        done_E = term[t] | trunc[t]
        tr = acc.step(obs_at(num_envs, t), np.zeros(num_envs, np.int64), reward[t],
                      next_obs_at(num_envs, t, done_E), term[t], trunc[t])
        total += len(tr)
        assert total + int(acc.pending_E.sum()) == (t + 1) * num_envs
        assert (acc.pending_E < n).all()


def test_reset_drops_pending_steps() -> None:
    acc = NStepAccumulator(3, 0.5, 1, (2,), np.dtype(np.float32))
    no = np.zeros((1, 1), dtype=bool)
    drive(acc, np.ones((2, 1)), no.repeat(2, 0), no.repeat(2, 0))
    acc.reset()
    # the next episode's first window completes two steps later and only has its own steps
    tr = acc.step(obs_at(1, 5), np.array([1]), np.array([1.0], np.float32),
                  next_obs_at(1, 5, no[0]), no[0], no[0])
    assert len(tr) == 0
    tr = acc.step(obs_at(1, 6), np.array([1]), np.array([2.0], np.float32),
                  next_obs_at(1, 6, np.array([True])), np.array([True]), no[0])
    assert_rows_close(rows(tr), {(0, 5): (1, 1 + 0.5 * 2, 0.0, (0.0, -7.0)),
                                 (0, 6): (1, 2.0, 0.0, (0.0, -7.0))})
