"""train.eval_epsilon: evaluations that take a random action with that chance (Nature
DQN's Atari protocol), drawn from the eval's own seeded stream; 0 stays greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qfleet
from qfleet.config import ConfigError
from qfleet.evaluate import Explore, evaluate


class AlwaysLeft(nn.Module):
    """Q-values that always prefer action 0: CartPole falls within about 10 steps."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(len(obs_BO), 2)


def test_explore_is_greedy_at_zero_and_random_at_its_rate() -> None:
    greedy_N = np.zeros(200_000, dtype=np.int64)
    assert Explore(0.0, np.random.default_rng(0))(greedy_N, 4) is greedy_N
    out_N = Explore(0.05, np.random.default_rng(0))(greedy_N, 4)
    # random with chance 0.05, and a random action is another one 3 times in 4
    assert np.mean(out_N != 0) == pytest.approx(0.05 * 3 / 4, abs=0.002)
    assert set(np.unique(out_N)) == {0, 1, 2, 3}


def test_evals_with_epsilon_are_seeded_and_leave_greedy_evals_as_they_were() -> None:
    env = qfleet.load_config("cartpole-dqn").env
    net = AlwaysLeft()
    greedy = evaluate(net, env, 10, seed=3)
    assert max(greedy.lengths) <= 12  # always left: it falls at once
    assert evaluate(net, env, 10, seed=3, epsilon=0.0).lengths == greedy.lengths
    noisy = evaluate(net, env, 10, seed=3, epsilon=1.0)
    assert noisy.length_mean is not None and noisy.length_mean > 15  # a random policy's
    assert evaluate(net, env, 10, seed=3, epsilon=1.0).lengths == noisy.lengths
    assert evaluate(net, env, 10, seed=4, epsilon=1.0).lengths != noisy.lengths


def test_eval_epsilon_outside_0_to_1_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.eval_epsilon"):
        qfleet.load_config("cartpole-dqn", ["train.eval_epsilon=1.5"])
    for preset in ("pong-dqn", "pong-apex", "breakout-apex"):
        assert qfleet.load_config(preset).train.eval_epsilon == 0.05
