"""DQNLearner against references written out the slow way: ``update_many(batch, k)`` equals
k single updates bit for bit (also across a hard target refresh; on a lookup-table
Q-network, whose rows do not depend on the batch they are computed in, unlike a matmul's
last bits), the hard refresh lands
exactly every ``target_update_every`` updates, the Polyak target is (1 - tau) old + tau
online, and the IS weights reach the gradient as the hand formula says."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qfleet.config import AlgoConfig, LearnerConfig
from qfleet.replay import Batch, Transitions
from qfleet.roles import DQNLearner
from qfleet.roles.learner import make_optimizer, to_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS = 4
STATES = 16
ACTIONS = 3


class Table(nn.Module):
    """Q(s, .) = table[s]; observations are state indices in column 0."""

    def __init__(self, rows: list[list[float]] | torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.as_tensor(rows, dtype=torch.float32).clone())

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return self.table[obs_BO[:, 0].long()]


def _learner(seed: int = 0, net: str = "table", **fields: Any) -> DQNLearner:
    torch.manual_seed(seed)
    module: nn.Module = (Table(torch.randn(STATES, ACTIONS)) if net == "table" else
                         nn.Sequential(nn.Linear(OBS, 16), nn.ReLU(), nn.Linear(16, ACTIONS)))
    cfg = LearnerConfig(**{"device": "cpu", "lr": 1e-2, "max_grad_norm": 1.0, **fields})
    return DQNLearner(module, cfg, AlgoConfig(double=True))


def _batch(rows: int, seed: int = 1, weights: bool = True) -> Batch:
    """Random transitions; column 0 of the observations is also a valid state index."""
    rng = np.random.default_rng(seed)
    obs_NO = rng.normal(size=(rows, OBS)).astype(np.float32)
    next_obs_NO = rng.normal(size=(rows, OBS)).astype(np.float32)
    obs_NO[:, 0] = rng.integers(0, STATES, rows)
    next_obs_NO[:, 0] = rng.integers(0, STATES, rows)
    data = Transitions(obs_NO=obs_NO, action_N=rng.integers(0, ACTIONS, rows),
                       reward_N=rng.normal(size=rows).astype(np.float32),
                       discount_N=np.where(rng.random(rows) < 0.2, 0.0, 0.99).astype(np.float32),
                       next_obs_NO=next_obs_NO)
    w_B = rng.uniform(0.2, 1.0, rows).astype(np.float32) if weights else None
    return Batch(data, np.arange(rows), w_B)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


@pytest.mark.parametrize("every, warmup, count", [(3, 0, 7), (3, 2, 7), (4, 1, 8), (1, 0, 5),
                                                  (100, 0, 6)])
def test_update_many_equals_sequential_updates_bit_for_bit(every: int, warmup: int,
                                                           count: int) -> None:
    """k updates on consecutive slices of one batch, with the target forward pass shared
    between refreshes, against k calls of ``update`` on the slices; ``warmup`` updates
    first, so the refreshes fall inside the k."""
    size = 8
    fast, slow = _learner(target_update_every=every), _learner(target_update_every=every)
    for i in range(warmup):
        for learner in (fast, slow):
            learner.update(_batch(size, seed=100 + i))
    batch = _batch(count * size)
    stats = fast.update_many(batch, count)
    ref = [slow.update(batch.take(np.arange(k * size, (k + 1) * size))) for k in range(count)]
    assert fast.version == slow.version == warmup + count
    assert len(stats) == count
    for k, (a, b) in enumerate(zip(stats, ref, strict=True)):
        assert torch.equal(a.loss, b.loss), k
        assert torch.equal(a.td_abs_B, b.td_abs_B), k
    assert torch.equal(_flat(fast.online), _flat(slow.online))
    assert torch.equal(_flat(fast.target), _flat(slow.target))


def test_update_many_on_an_mlp_matches_sequential_updates_to_rounding() -> None:
    """The same on an MLP: the shared target forward pass over a bigger batch may round
    the last bits differently, nothing more (a stale target would differ by far more)."""
    fast = _learner(net="mlp", target_update_every=3)
    slow = _learner(net="mlp", target_update_every=3)
    batch = _batch(7 * 8)
    fast.update_many(batch, 7)
    for k in range(7):
        slow.update(batch.take(np.arange(k * 8, (k + 1) * 8)))
    torch.testing.assert_close(_flat(fast.online), _flat(slow.online), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_flat(fast.target), _flat(slow.target), rtol=1e-5, atol=1e-6)


def test_hard_target_refreshes_every_target_update_every_updates() -> None:
    """After update v the target holds the online parameters of the last multiple of 3 at
    or below v (the initial copy for v < 3)."""
    learner = _learner(target_update_every=3)
    online_at = {0: _flat(learner.online)}
    assert torch.equal(_flat(learner.target), online_at[0])
    for v in range(1, 11):
        learner.update(_batch(8, seed=v))
        online_at[v] = _flat(learner.online)
        assert not torch.equal(online_at[v], online_at[v - 1])
        assert torch.equal(_flat(learner.target), online_at[v // 3 * 3]), v
    # and update_many refreshes at the same versions
    many = _learner(target_update_every=3)
    many.update_many(_batch(10 * 8, seed=50), 10)
    assert many.version == 10
    twin = _learner(target_update_every=3)
    snapshots = {}
    for k in range(10):
        twin.update(_batch(10 * 8, seed=50).take(np.arange(k * 8, (k + 1) * 8)))
        snapshots[twin.version] = _flat(twin.online)
    assert torch.equal(_flat(many.target), snapshots[9])


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.995])
def test_polyak_target_after_one_update_is_the_convex_combination(tau: float) -> None:
    learner = _learner(tau=tau)
    # Make the target differ from the online net first (two updates), so the weights of
    # the combination matter.
    learner.update(_batch(8, seed=7))
    learner.update(_batch(8, seed=8))
    old_target = {k: v.clone() for k, v in learner.target.state_dict().items()}
    assert any(not torch.equal(old_target[k], v) for k, v in learner.online.state_dict().items())
    learner.update(_batch(8, seed=9))
    online = learner.online.state_dict()
    for key, value in learner.target.state_dict().items():
        expected = (1 - tau) * old_target[key] + tau * online[key]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
    # Polyak moves the target every update: update_many matches one-by-one updates too.
    fast, slow = _learner(tau=tau), _learner(tau=tau)
    batch = _batch(5 * 8, seed=11)
    fast.update_many(batch, 5)
    for k in range(5):
        slow.update(batch.take(np.arange(k * 8, (k + 1) * 8)))
    assert torch.equal(_flat(fast.target), _flat(slow.target))
    assert torch.equal(_flat(fast.online), _flat(slow.online))


@pytest.mark.parametrize("huber", [False, True])
def test_is_weighted_gradient_equals_the_hand_formula(huber: bool) -> None:
    """Loss = mean_i w_i l(td_i), td_i = y_i - Q(s_i, a_i), y_i = r_i + d_i max_a Q'(s'_i, a)
    with the target Q' a frozen copy of the table: dL/dQ(s_i, a_i) = -w_i l'(td_i) / B,
    with l' = td (L2) or clip(td, -1, 1) (Huber). Rows 0 and 3 share (s, a): their terms add."""
    table = [[1.0, 2.0], [3.0, 0.5], [0.0, 4.0]]
    cfg = LearnerConfig(device="cpu", lr=1e-3, max_grad_norm=0.0, huber=huber)
    learner = DQNLearner(Table(table), cfg, AlgoConfig(double=False))
    obs, act, rew = [0, 1, 2, 0], [1, 0, 1, 1], [1.0, -1.0, 0.2, 0.3]
    disc, nxt, w = [0.9, 0.0, 0.5, 0.9], [1, 2, 0, 2], [1.0, 0.25, 0.5, 0.75]
    data = Transitions(obs_NO=np.array(obs, np.float32)[:, None], action_N=np.array(act),
                       reward_N=np.array(rew, np.float32), discount_N=np.array(disc, np.float32),
                       next_obs_NO=np.array(nxt, np.float32)[:, None])
    stats = learner.update(Batch(data, np.arange(4), np.array(w, np.float32)))
    expected = torch.zeros(3, 2)
    tds, losses = [], []
    for s, a, r, d, s2, wi in zip(obs, act, rew, disc, nxt, w, strict=True):
        td = r + d * max(table[s2]) - table[s][a]
        tds.append(abs(td))
        slope = max(-1.0, min(1.0, td)) if huber else td
        losses.append(wi * ((0.5 * td * td if abs(td) <= 1 else abs(td) - 0.5) if huber
                            else 0.5 * td * td))
        expected[s, a] += -wi * slope / 4
    grad = learner.online.table.grad
    assert grad is not None
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    assert stats.loss.item() == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert stats.td_abs_B.tolist() == pytest.approx(tds, rel=1e-6)
    # Without weights (uniform replay) the same batch gives the unweighted gradient.
    plain = DQNLearner(Table(table), cfg, AlgoConfig(double=False))
    plain.update(Batch(data, np.arange(4), None))
    unweighted = torch.zeros(3, 2)
    for s, a, r, d, s2 in zip(obs, act, rew, disc, nxt, strict=True):
        td = r + d * max(table[s2]) - table[s][a]
        unweighted[s, a] += -(max(-1.0, min(1.0, td)) if huber else td) / 4
    assert plain.online.table.grad is not None
    torch.testing.assert_close(plain.online.table.grad, unweighted, rtol=1e-6, atol=1e-7)


def test_update_many_keeps_each_slice_with_its_own_weights() -> None:
    """IS weights slice with their rows: update_many on [A; B] equals update(A), update(B)
    (a learner that dropped or misaligned them would train B on A's weights)."""
    fast, slow = _learner(target_update_every=100), _learner(target_update_every=100)
    batch = _batch(16, seed=3)
    fast.update_many(batch, 2)
    slow.update(batch.take(np.arange(8)))
    slow.update(batch.take(np.arange(8, 16)))
    assert torch.equal(_flat(fast.online), _flat(slow.online))
    unweighted = _learner(target_update_every=100)
    unweighted.update_many(Batch(batch.data, batch.indices_B, None), 2)
    assert not torch.equal(_flat(fast.online), _flat(unweighted.online))


def test_snapshot_carries_the_online_parameters_and_version() -> None:
    learner = _learner()
    learner.update(_batch(8))
    snap = learner.snapshot()
    assert snap.version == 1
    for key, value in learner.online.state_dict().items():
        assert torch.equal(snap.params[key], value), key
    copy.deepcopy(snap)  # plain data: it travels to actors


def test_make_optimizer_uses_the_configured_hyperparameters() -> None:
    params = list(nn.Linear(2, 2).parameters())
    adam = make_optimizer(params, LearnerConfig(lr=3e-4, adam_eps=1e-5))
    assert isinstance(adam, torch.optim.Adam)
    group = adam.param_groups[0]
    assert (group["lr"], group["eps"], group["fused"]) == (3e-4, 1e-5, True)
    rms = make_optimizer(params, LearnerConfig(lr=7e-4, adam_eps=1e-3, optimizer="rmsprop"))
    assert isinstance(rms, torch.optim.RMSprop)
    group = rms.param_groups[0]
    assert (group["lr"], group["eps"], group["alpha"]) == (7e-4, 1e-3, 0.99)


def test_one_update_is_a_clipped_double_dqn_step_by_hand() -> None:
    """update() against the step written out: double-DQN loss (online picks, target
    evaluates), gradient clipped to max_grad_norm 0.5 (it bites), one Adam step; the stats
    are that loss, |td| and mean Q."""
    from qfleet.losses import dqn_loss

    learner = _learner(net="mlp", max_grad_norm=0.5, target_update_every=100)
    learner.update(_batch(8, seed=20))  # Adam has moments: the gradient's scale matters
    with torch.no_grad():  # online and target disagree on the best next action
        gen = torch.Generator().manual_seed(5)
        for p in learner.online.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    ref = copy.deepcopy(learner.online)
    ref_opt = make_optimizer(list(ref.parameters()), learner.cfg)
    ref_opt.load_state_dict(copy.deepcopy(learner.opt.state_dict()))
    batch = _batch(8, seed=21)
    stats = learner.update(batch)
    data = to_torch(batch, torch.device("cpu"))
    out = dqn_loss(ref, learner.target, data, double=True, huber=True)
    plain = dqn_loss(ref, learner.target, data, double=False, huber=True)
    assert not torch.equal(out.td_B, plain.td_B), "double and max targets must differ here"
    ref_opt.zero_grad()
    out.loss.backward()
    assert float(nn.utils.clip_grad_norm_(ref.parameters(), 0.5)) > 0.5
    ref_opt.step()
    torch.testing.assert_close(_flat(learner.online), _flat(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.loss, out.loss.detach())
    torch.testing.assert_close(stats.td_abs_B, out.td_B.abs())
    torch.testing.assert_close(stats.q_mean, out.q_mean)
