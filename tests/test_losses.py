"""dqn_loss on tiny batches whose targets, TD errors and losses are computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qfleet.losses import TorchBatch, dqn_loss


class Table(nn.Module):
    """Q(s, .) = table[s]: observations are state indices, shape (B, 1)."""

    def __init__(self, rows: list[list[float]], trainable: bool) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(rows), requires_grad=trainable)

    def forward(self, obs_B1: torch.Tensor) -> torch.Tensor:
        return self.table[obs_B1[:, 0].long()]


# Online and target tables over 3 states, 2 actions.
ONLINE = [[1.0, 2.0], [3.0, 0.5], [0.0, 4.0]]
TARGET = [[10.0, 20.0], [5.0, 7.0], [8.0, 1.0]]


def batch(obs: list[int], action: list[int], reward: list[float], discount: list[float],
          next_obs: list[int], weights: list[float] | None = None) -> TorchBatch:
    return TorchBatch(
        obs_BO=torch.tensor(obs, dtype=torch.float32)[:, None],
        action_B=torch.tensor(action),
        reward_B=torch.tensor(reward),
        discount_B=torch.tensor(discount),
        next_obs_BO=torch.tensor(next_obs, dtype=torch.float32)[:, None],
        weights_B=torch.tensor(weights or [1.0] * len(obs)))


def nets() -> tuple[Table, Table]:
    return Table(ONLINE, trainable=True), Table(TARGET, trainable=False)


# Sample 0: s=0, a=1, r=1, discount .9, s'=1.  q = ONLINE[0][1] = 2.
#   double:     a* = argmax ONLINE[1] = 0  -> TARGET[1][0] = 5 -> y = 1 + .9*5 = 5.5, td = 3.5
#   non-double: max TARGET[1] = 7                             -> y = 1 + .9*7 = 7.3, td = 5.3
# Sample 1: s=1, a=0, r=-1, discount 0 (terminal), s'=2.  q = 3, y = -1, td = -4 (both).
# Sample 2: s=2, a=1, r=0.2, discount .5, s'=0.  q = 4.
#   double:     a* = argmax ONLINE[0] = 1  -> TARGET[0][1] = 20 -> y = 10.2, td = 6.2
#   non-double: max TARGET[0] = 20 (same)                      -> y = 10.2, td = 6.2
B3 = dict(obs=[0, 1, 2], action=[1, 0, 1], reward=[1.0, -1.0, 0.2], discount=[0.9, 0.0, 0.5],
          next_obs=[1, 2, 0])


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


@pytest.mark.parametrize("double, td", [(True, [3.5, -4.0, 6.2]), (False, [5.3, -4.0, 6.2])])
@pytest.mark.parametrize("use_huber", [True, False])
def test_td_and_loss_by_hand(double: bool, td: list[float], use_huber: bool) -> None:
    online, target = nets()
    out = dqn_loss(online, target, batch(**B3), double=double, huber=use_huber)
    torch.testing.assert_close(out.td_B, torch.tensor(td))
    per = [huber(x) if use_huber else 0.5 * x * x for x in td]
    torch.testing.assert_close(out.loss, torch.tensor(sum(per) / 3))
    torch.testing.assert_close(out.q_mean, torch.tensor((2.0 + 3.0 + 4.0) / 3))
    assert not out.td_B.requires_grad and out.loss.requires_grad


def test_huber_quadratic_inside_unit_and_linear_outside() -> None:
    # q = ONLINE[0][0] = 1; terminal, so y = r.  td = 0.5 (quadratic) and td = 3 (linear).
    online, target = nets()
    small = dqn_loss(online, target, batch([0], [0], [1.5], [0.0], [0]), double=True,
                     huber=True)
    big = dqn_loss(online, target, batch([0], [0], [4.0], [0.0], [0]), double=True, huber=True)
    torch.testing.assert_close(small.loss, torch.tensor(0.125))
    torch.testing.assert_close(big.loss, torch.tensor(2.5))
    l2_big = dqn_loss(online, target, batch([0], [0], [4.0], [0.0], [0]), double=True,
                      huber=False)
    torch.testing.assert_close(l2_big.loss, torch.tensor(4.5))


def test_discount_zero_ignores_next_state() -> None:
    """A terminal transition's target is its reward, whatever the networks say about s'."""
    b = batch([1], [0], [-1.0], [0.0], [2])
    online, target = nets()
    first = dqn_loss(online, target, b, double=True, huber=False)
    with torch.no_grad():
        target.table[2] = torch.tensor([1e6, -1e6])
        online.table[2] = torch.tensor([-1e6, 1e6])
    second = dqn_loss(online, target, b, double=True, huber=False)
    torch.testing.assert_close(first.td_B, torch.tensor([-4.0]))
    torch.testing.assert_close(second.td_B, torch.tensor([-4.0]))


def test_is_weights_scale_each_sample() -> None:
    online, target = nets()
    w = [2.0, 0.5, 0.0]
    out = dqn_loss(online, target, batch(**B3, weights=w), double=True, huber=True)
    per = [huber(3.5), huber(-4.0), huber(6.2)]
    expected = sum(wi * p for wi, p in zip(w, per, strict=True)) / 3
    torch.testing.assert_close(out.loss, torch.tensor(expected))
    # TD errors are not weighted: prioritized replay needs the raw ones.
    torch.testing.assert_close(out.td_B, torch.tensor([3.5, -4.0, 6.2]))


def test_gradient_flows_to_online_only_and_has_hand_value() -> None:
    """L2: d loss / d q_i = -w_i * td_i / B, only on the taken action's entry."""
    online, target = nets()
    w = [1.0, 2.0, 0.5]
    out = dqn_loss(online, target, batch(**B3, weights=w), double=True, huber=False)
    out.loss.backward()
    expected = torch.zeros(3, 2)
    for s, a, wi, td in zip([0, 1, 2], [1, 0, 1], w, [3.5, -4.0, 6.2], strict=True):
        expected[s, a] = -wi * td / 3
    torch.testing.assert_close(online.table.grad, expected)
    assert target.table.grad is None


def test_double_uses_online_argmax_with_linear_nets() -> None:
    """Linear nets with set weights: online prefers action 1 on s', target prefers action 0."""
    online, target = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # Q = (x0, x1)
        target.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))  # Q = (3 x0, 2 x1)
    b = TorchBatch(obs_BO=torch.tensor([[1.0, 1.0]]), action_B=torch.tensor([0]),
                   reward_B=torch.tensor([0.5]), discount_B=torch.tensor([0.9]),
                   next_obs_BO=torch.tensor([[1.0, 2.0]]), weights_B=torch.ones(1))
    # q = 1.  On s' = (1, 2): online Q = (1, 2) -> a* = 1; target Q = (3, 4).
    dbl = dqn_loss(online, target, b, double=True, huber=False)
    torch.testing.assert_close(dbl.td_B, torch.tensor([0.5 + 0.9 * 4.0 - 1.0]))
    # Make the online net prefer action 0 on s': double now evaluates target's Q(s', 0) = 3.
    with torch.no_grad():
        online.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 1.0]]))
    dbl = dqn_loss(online, target, b, double=True, huber=False)
    torch.testing.assert_close(dbl.td_B, torch.tensor([0.5 + 0.9 * 3.0 - 5.0]))
    plain = dqn_loss(online, target, b, double=False, huber=False)
    torch.testing.assert_close(plain.td_B, torch.tensor([0.5 + 0.9 * 4.0 - 5.0]))


def test_no_weights_means_uniform() -> None:
    """weights_B = None (uniform replay) gives the same loss as all-ones weights."""
    online, target = nets()
    ones = dqn_loss(online, target, batch(**B3), double=True, huber=True)
    plain = batch(**B3)
    plain.weights_B = None
    none = dqn_loss(online, target, plain, double=True, huber=True)
    torch.testing.assert_close(none.loss, ones.loss)
    torch.testing.assert_close(none.td_B, ones.td_B)


@pytest.mark.parametrize("double", [True, False])
def test_precomputed_target_values_are_used(double: bool) -> None:
    """next_target_BA, computed ahead, replaces target(next_obs) and nothing else."""
    online, target = nets()
    b = batch(**B3)
    ahead = target(b.next_obs_BO)
    same = dqn_loss(online, target, b, double=double, huber=False, next_target_BA=ahead)
    ref = dqn_loss(online, target, b, double=double, huber=False)
    torch.testing.assert_close(same.td_B, ref.td_B)
    # different precomputed values change y: s' rows are TARGET[1], TARGET[2], TARGET[0]
    other = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    out = dqn_loss(online, target, b, double=double, huber=False, next_target_BA=other)
    # double picks online argmax on s' = (0, 1, 1); plain takes the row max
    nxt = [1.0, 4.0, 6.0] if double else [2.0, 4.0, 6.0]
    y = [1.0 + 0.9 * nxt[0], -1.0, 0.2 + 0.5 * nxt[2]]
    torch.testing.assert_close(out.td_B, torch.tensor(y) - torch.tensor([2.0, 3.0, 4.0]))
