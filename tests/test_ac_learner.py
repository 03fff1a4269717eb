"""ACLearner (A3C's queue variant) against a reference written out the slow way: k updates
on one batch are k optimizer steps on consecutive slices, each on ac_loss at the current
parameters, clipped as torch clips; trainer threads compute on private copies and apply
to the global model under the lock."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qfleet.config import AlgoConfig, LearnerConfig
from qfleet.losses import ac_loss
from qfleet.nets import ActorCritic
from qfleet.replay import Batch, Transitions
from qfleet.roles.ac_learner import ACLearner
from qfleet.roles.learner import make_optimizer, to_torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(seed: int = 0) -> ActorCritic:
    torch.manual_seed(seed)
    return ActorCritic(nn.Sequential(nn.Linear(4, 16), nn.Tanh()), 16, 3)


def _batch(rows: int, seed: int = 1) -> Batch:
    rng = np.random.default_rng(seed)
    data = Transitions(obs_NO=rng.normal(size=(rows, 4)).astype(np.float32),
                       action_N=rng.integers(0, 3, rows),
                       reward_N=rng.normal(size=rows).astype(np.float32),
                       discount_N=np.where(rng.random(rows) < 0.2, 0.0, 0.9).astype(np.float32),
                       next_obs_NO=rng.normal(size=(rows, 4)).astype(np.float32))
    return Batch(data, np.arange(rows), None)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


@pytest.mark.parametrize("optimizer, max_grad_norm", [("rmsprop", 0.5), ("rmsprop", 0.0),
                                                      ("adam", 0.05)])
def test_update_many_is_sequential_steps_on_consecutive_slices(optimizer: str,
                                                               max_grad_norm: float) -> None:
    cfg = LearnerConfig(device="cpu", lr=1e-2, optimizer=optimizer, adam_eps=1e-5,
                        max_grad_norm=max_grad_norm)
    algo = AlgoConfig(name="a3c", value_coef=0.5, entropy_coef=0.01, trainers=1)
    learner = ACLearner(_net(), cfg, algo)
    assert learner.pool is None and learner.target is None
    ref = _net()
    ref_opt = make_optimizer(list(ref.parameters()), cfg)
    batch, size, count = _batch(24), 8, 3
    stats = learner.update_many(batch, count)
    assert learner.version == count and len(stats) == count
    data = to_torch(batch, torch.device("cpu"))
    clipped = False
    for k in range(count):
        out = ac_loss(ref, data.rows(k * size, (k + 1) * size), value_coef=0.5,
                      entropy_coef=0.01)
        assert stats[k].loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
        torch.testing.assert_close(stats[k].td_abs_B, out.td_B.abs())
        assert stats[k].q_mean.item() == pytest.approx(out.q_mean.item(), rel=1e-5, abs=1e-7)
        ref_opt.zero_grad()
        out.loss.backward()
        if max_grad_norm > 0:
            norm = nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
            clipped |= bool(norm > max_grad_norm)
        ref_opt.step()
    assert clipped == (max_grad_norm > 0), "clipping should bite where it is on"
    torch.testing.assert_close(_flat(learner.online), _flat(ref), rtol=1e-5, atol=1e-6)
    snap = learner.snapshot()
    assert snap.version == count
    assert torch.equal(torch.cat([v.reshape(-1) for v in snap.params.values()]),
                       _flat(learner.online))


def test_trainer_threads_apply_every_update_to_the_global_model() -> None:
    """Two trainers: one update alone is the reference step exactly; four more all
    land (version 5) and move the global parameters."""
    cfg = LearnerConfig(device="cpu", lr=1e-2, optimizer="rmsprop", max_grad_norm=0.5)
    algo = AlgoConfig(name="a3c", value_coef=0.5, entropy_coef=0.01, trainers=2)
    learner = ACLearner(_net(), cfg, algo)
    try:
        assert learner.pool is not None
        ref = _net()
        ref_opt = make_optimizer(list(ref.parameters()), cfg)
        batch = _batch(8, seed=5)
        learner.update_many(batch, 1)
        out = ac_loss(ref, to_torch(batch, torch.device("cpu")), value_coef=0.5,
                      entropy_coef=0.01)
        out.loss.backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        torch.testing.assert_close(_flat(learner.online), _flat(ref), rtol=1e-5, atol=1e-6)
        before = _flat(learner.online)
        stats = learner.update_many(_batch(32, seed=6), 4)
        assert learner.version == 5 and len(stats) == 4
        assert not torch.equal(before, _flat(learner.online))
    finally:
        assert learner.pool is not None
        learner.pool.shutdown(wait=True)
