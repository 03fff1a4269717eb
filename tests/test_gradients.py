"""Gradient-aggregation schemes (issue 6), fast and in one process: the gate against a naive
reference, sync averaging against one step on the concatenated batch, the actor-critic
loss by hand, the rollout queue, policy sampling, config errors, the presets' rows of the
design table, and determinism / resume of inline runs."""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _runners import closing, gradient_program
from torch import nn

import qfleet
from qfleet import checkpoint
from qfleet.algos import GradientProgram, build_program, scheme_row
from qfleet.config import Config, ConfigError
from qfleet.experiment import resume, train
from qfleet.losses import TorchBatch, ac_loss, dqn_loss
from qfleet.metrics import is_timing, read_metrics
from qfleet.nets import ActorCritic
from qfleet.policies import sample_logits
from qfleet.policy_io import load_policy
from qfleet.replay import RolloutQueue, Transitions
from qfleet.roles import gradient_step
from qfleet.roles.gradients import Aggregator, Gradient, GradientGate, flat_grads, set_grads
from qfleet.roles.learner import make_optimizer, to_torch
from qfleet.runtime import InlineGradientRunner, RoundReport

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- the gate

Emitted = tuple[tuple[int, ...], tuple[float, ...]]  # (ids of the gradients, their weights)


def _grad(worker: int, base_version: int, uid: int) -> Gradient:
    """A gradient whose single entry is its id, so a step shows which ones it averaged."""
    return Gradient(worker, base_version, env_steps=1, grads_P=torch.tensor([float(uid)]))


def _naive_gate(num_workers: int, group_size: int, offers: list[tuple[int, int]],
                max_staleness: int, stale: str) -> tuple[list[Emitted], dict[str, int]]:
    """What the gate must do, written out the slow way: a group steps once all of its
    members have sent; each gradient's staleness is the number of global steps since the
    version the worker last pulled; outside sync (G < W) stale ones are dropped, or weighted by
    (max_staleness + 1) / (staleness + 1). ``offers``: (worker, lag), where the worker
    computed on ``version - lag`` (but never before version 0)."""
    version = 0
    held: dict[int, dict[int, tuple[int, int]]] = {}  # group -> worker -> (uid, base)
    out: list[Emitted] = []
    counts = {"applied": 0, "dropped": 0, "staleness_sum": 0}
    for uid, (worker, lag) in enumerate(offers):
        group = worker // group_size
        held.setdefault(group, {})[worker] = (uid, max(0, version - lag))
        if len(held[group]) < group_size:
            continue
        ids, weights = [], []
        for w in sorted(held[group]):
            gid, base = held[group][w]
            staleness = version - base
            if staleness > max_staleness and group_size < num_workers:  # sync: no rule
                if stale == "drop":
                    counts["dropped"] += 1
                    continue
                weights.append((max_staleness + 1) / (staleness + 1))
            else:
                weights.append(1.0)
            ids.append(gid)
            counts["applied"] += 1
            counts["staleness_sum"] += staleness
        held[group] = {}
        if ids:
            out.append((tuple(ids), tuple(weights)))
            version += 1
    return out, counts


def _real_gate(num_workers: int, group_size: int, offers: list[tuple[int, int]],
               max_staleness: int, stale: str) -> tuple[list[Emitted], dict[str, int]]:
    gate = GradientGate(num_workers, group_size, max_staleness, stale)
    version, out, live = 0, [], range(num_workers)
    for uid, (worker, lag) in enumerate(offers):
        ready = gate.offer(_grad(worker, max(0, version - lag), uid), version, live)
        if ready is not None:
            grads, weights = ready
            assert len(grads) == len(weights)
            out.append((tuple(int(g.item()) for g in grads), tuple(weights)))
            version += 1
    return out, {"applied": gate.applied, "dropped": gate.dropped,
                 "staleness_sum": gate.staleness_sum}


def _random_offers(rng: random.Random, num_workers: int, group_size: int,
                   count: int) -> list[tuple[int, int]]:
    """Offers as the runners make them: a worker whose gradient waits in an incomplete
    group does not send again before that group steps (its one slot is held)."""
    waiting: set[int] = set()
    offers = []
    for _ in range(count):
        worker = rng.choice([w for w in range(num_workers) if w not in waiting])
        offers.append((worker, rng.choice([0, 0, 0, 1, 2, 3, 5, 9, 14])))
        if group_size > 1:
            waiting.add(worker)
            group = range(worker // group_size * group_size,
                          (worker // group_size + 1) * group_size)
            if all(w in waiting for w in group):
                waiting -= set(group)
    return offers


@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("stale", ["drop", "scale"])
def test_gate_matches_a_naive_reference_on_random_offers(num_workers: int, stale: str) -> None:
    rng = random.Random(1000 * num_workers + (stale == "scale"))
    for group_size in [g for g in range(1, num_workers + 1) if num_workers % g == 0]:
        for max_staleness in (0, 2, 6):
            offers = _random_offers(rng, num_workers, group_size, 120)
            real, real_counts = _real_gate(num_workers, group_size, offers, max_staleness,
                                           stale)
            expected, counts = _naive_gate(num_workers, group_size, offers, max_staleness,
                                           stale)
            assert real == expected, (num_workers, group_size, max_staleness)
            assert real_counts == counts
            assert real, "the random offers never made a step"


def test_gate_with_group_of_all_workers_is_sync() -> None:
    gate = GradientGate(num_workers=3, group_size=3, max_staleness=0)
    uid = 0
    for version in range(4):  # four rounds: every worker sends once, on the current version
        for worker in (2, 0, 1):
            ready = gate.offer(_grad(worker, version, uid), version, range(3))
            uid += 1
            if worker != 1:
                assert ready is None, "a sync step must wait for all W gradients"
        assert ready is not None
        grads, weights = ready
        assert [int(g.item()) for g in grads] == [uid - 2, uid - 1, uid - 3]  # worker order
        assert weights == [1.0, 1.0, 1.0]
    assert (gate.applied, gate.dropped, gate.staleness_sum, gate.pending) == (12, 0, 0, {})


def test_gate_with_groups_of_one_is_async() -> None:
    gate = GradientGate(num_workers=3, group_size=1, max_staleness=100)
    for uid, worker in enumerate([0, 1, 1, 2, 0, 2, 2]):
        version = uid  # one step per gradient so far
        base = max(0, version - worker)  # some are stale; none dropped under 100
        ready = gate.offer(_grad(worker, base, uid), version, range(3))
        assert ready is not None, "async steps on every gradient"
        assert [int(g.item()) for g in ready[0]] == [uid] and ready[1] == [1.0]
    assert gate.applied == 7 and gate.pending == {}


def test_gate_drops_stale_gradients() -> None:
    gate = GradientGate(num_workers=2, group_size=1, max_staleness=3)
    assert gate.offer(_grad(0, 10, 0), 13, range(2)) is not None  # staleness 3: kept
    assert gate.offer(_grad(1, 10, 1), 14, range(2)) is None  # staleness 4: dropped
    assert (gate.applied, gate.dropped, gate.staleness_sum) == (1, 1, 3)


def test_gate_scales_stale_gradients_by_hand_computed_weights() -> None:
    gate = GradientGate(num_workers=4, group_size=2, max_staleness=2, stale="scale")
    live = range(4)
    assert gate.offer(_grad(0, 10, 0), 12, live) is None  # staleness 2: weight 1
    ready = gate.offer(_grad(1, 7, 1), 12, live)  # staleness 5: weight 3 / 6
    assert ready is not None
    assert [int(g.item()) for g in ready[0]] == [0, 1]
    assert ready[1] == pytest.approx([1.0, 0.5])
    assert gate.offer(_grad(3, 0, 2), 12, live) is None  # staleness 12: weight 3 / 13
    ready = gate.offer(_grad(2, 12, 3), 12, live)
    assert ready is not None and ready[1] == pytest.approx([1.0, 3 / 13])
    assert (gate.applied, gate.dropped, gate.staleness_sum) == (4, 0, 2 + 5 + 12 + 0)


def test_gate_steps_without_a_lost_worker_and_when_it_leaves() -> None:
    gate = GradientGate(num_workers=4, group_size=2, max_staleness=8)
    # Worker 1 is not live: worker 0's gradient steps alone.
    ready = gate.offer(_grad(0, 0, 0), 0, {0, 2, 3})
    assert ready is not None and len(ready[0]) == 1
    # Worker 3 waits on worker 2; when worker 2 leaves, worker 3's group goes on.
    assert gate.offer(_grad(3, 1, 1), 1, range(4)) is None
    assert gate.ready(2, 1, {0, 1, 3}) is not None
    assert gate.pending == {}


def inline_runner(cfg: Config) -> AbstractContextManager[InlineGradientRunner]:
    return closing(InlineGradientRunner(gradient_program(cfg)))


def _inline_run(cfg: Config, rounds: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    with inline_runner(cfg) as runner:
        reports = [runner.step() for _ in range(rounds)]
        flat = torch.cat([v.reshape(-1) for v in runner.aggregator.model.state_dict().values()])
    return flat, [(r.updates, r.grads_applied, r.staleness_sum) for r in reports]


@pytest.mark.parametrize("limit, same_as", [("algo.group_size=4", "algo.aggregation=sync"),
                                            ("algo.group_size=1", "algo.aggregation=async")])
def test_grouped_limits_are_sync_and_async_end_to_end(limit: str, same_as: str) -> None:
    """Inline Gorila with 4 workers: grouped with G = W runs exactly like sync, and with
    G = 1 exactly like async (same global model, same steps, same staleness)."""
    common = ["actors.count=4", "algo.max_staleness=100", "actors.chunk_size=4",
              "net.hidden=[32]", "learner.batch_size=16", "learner.learning_starts=32",
              "runtime.backend='inline'"]
    grouped, grouped_rounds = _inline_run(qfleet.load_config(
        "cartpole-batchsync", [*common, "algo.aggregation=grouped", limit]), 30)
    other, other_rounds = _inline_run(qfleet.load_config(
        "cartpole-batchsync", [*common, same_as]), 30)
    assert grouped_rounds == other_rounds
    assert torch.equal(grouped, other)
    steps = [u for u, _, _ in grouped_rounds if u]
    assert steps == ([1] * len(steps) if limit.endswith("4") else [4] * len(steps))
    assert len(steps) >= 20


# ---------------------------------------------------------------- sync = concatenated batch

SMALL_GORILA = ("actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
                "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=2000",
                "runtime.backend='inline'", "log.progress=false", "log.tensorboard=false")


def _gorila_cfg(*extra: str) -> Config:
    return qfleet.load_config("cartpole-gorila-sync", [*SMALL_GORILA, *extra])


def _cat(a: TorchBatch, b: TorchBatch) -> TorchBatch:
    return TorchBatch(*(torch.cat([getattr(a, f), getattr(b, f)]) for f in
                        ("obs_BO", "action_B", "reward_B", "discount_B", "next_obs_BO")),
                      weights_B=None)


def _assert_params_close(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


def test_sync_gorila_step_equals_one_step_on_the_concatenated_batch() -> None:
    """Two workers' real ``work()`` gradients, averaged by the gate and applied by the
    aggregator, equal one Adam step (with clipping that bites) of a reference model on the
    concatenation of the two workers' batches; the target refreshes every 2 updates."""
    cfg = _gorila_cfg("learner.adam_eps=1e-2", "learner.max_grad_norm=0.5",
                      "learner.target_update_every=2")
    with inline_runner(cfg) as runner:
        agg = runner.aggregator
        ref = copy.deepcopy(agg.model)  # the same start
        ref_opt = make_optimizer(list(ref["online"].parameters()), cfg.learner)
        initial_target = copy.deepcopy(agg.target)
        steps = 0
        while steps < 5:
            version = agg.version
            states = [copy.deepcopy(w.replay.rng.bit_generator.state)  # type: ignore[union-attr]
                      for w in runner.workers]
            grads = [gradient_step(w, runner._fetch, 1) for w in runner.workers]
            if grads[0].grads_P is None:  # still filling the local replays
                assert all(g.grads_P is None for g in grads)
                for g in grads:
                    runner.receive(g, runner.live, RoundReport())
                assert agg.version == 0
                continue
            batches = []
            for worker, state in zip(runner.workers, states, strict=True):
                replay = worker.replay
                assert replay is not None
                after = replay.rng.bit_generator.state
                replay.rng.bit_generator.state = state  # the same draw work() made
                batches.append(to_torch(replay.sample(cfg.learner.batch_size),
                                        torch.device("cpu")))
                replay.rng.bit_generator.state = after
            assert [g.base_version for g in grads] == [version, version]
            report = RoundReport()
            runner.receive(grads[0], runner.live, report)
            assert agg.version == version, "sync must wait for the second worker"
            runner.receive(grads[1], runner.live, report)
            assert agg.version == version + 1 and report.updates == 1
            runner._snapshot()
            steps += 1

            out = dqn_loss(ref["online"], ref["target"], _cat(*batches),
                           double=cfg.algo.double, huber=cfg.learner.huber)
            ref_opt.zero_grad()
            out.loss.backward()
            cat_grad = flat_grads(list(ref["online"].parameters()))
            mean_grad = (grads[0].grads_P + grads[1].grads_P) / 2  # type: ignore[operator]
            torch.testing.assert_close(mean_grad, cat_grad, rtol=1e-4, atol=1e-6)
            assert cat_grad.norm() > 0.5, "clipping should take part in the comparison"
            nn.utils.clip_grad_norm_(ref["online"].parameters(), cfg.learner.max_grad_norm)
            ref_opt.step()
            _assert_params_close(agg.online, ref["online"])
            if agg.version % 2 == 0:
                ref["target"].load_state_dict(ref["online"].state_dict())
                _assert_params_close(agg.target, agg.online)
            else:
                assert not torch.equal(flat_params(agg.target), flat_params(agg.online))
            _assert_params_close(agg.target, ref["target"])
        assert not torch.equal(flat_params(agg.target), flat_params(initial_target))
        # Workers pull the new global model (online and target) before their next gradient.
        for worker in runner.workers:
            gradient_step(worker, runner._fetch, 1)
            assert worker.version == agg.version
            assert torch.equal(flat_params(worker.model), flat_params(agg.model))


def test_sync_never_drops_or_scales_gradients_for_staleness() -> None:
    """max_staleness is an async/grouped rule (its help text and issue 6 say so). Sync
    Gorila with algo.sync_every = 12 (workers pull the global model every 12 gradients,
    as in Nair et al.) must still average both workers' gradients into every step; a
    gate applying the staleness rule to sync groups would drop gradients more than 8
    versions old and skip whole steps."""
    cfg = _gorila_cfg("algo.sync_every=12")
    assert cfg.algo.max_staleness == 8
    with inline_runner(cfg) as runner:
        reports = [runner.step() for _ in range(60)]
    sending = [r for r in reports if r.loss_count]  # rounds after the replays filled
    assert len(sending) >= 40
    assert sum(r.grads_dropped for r in reports) == 0
    assert all(r.updates == 1 and r.grads_applied == 2 for r in sending)


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.state_dict().values()])


def test_aggregator_refreshes_the_target_every_target_update_every_updates() -> None:
    cfg = _gorila_cfg("learner.target_update_every=3")
    program = build_program(cfg)
    assert isinstance(program, GradientProgram)
    agg = program.make_aggregator()
    size = sum(p.numel() for p in agg.params)
    gen = torch.Generator().manual_seed(0)
    snapshots = {0: flat_params(agg.online)}
    for version in range(1, 10):
        assert agg.apply([torch.randn(size, generator=gen)], [1.0]) == version
        snapshots[version] = flat_params(agg.online)
        assert not torch.equal(snapshots[version], snapshots[version - 1])
        refreshed_at = version // 3 * 3
        assert torch.equal(flat_params(agg.target), snapshots[refreshed_at]), version


def test_aggregator_step_is_on_the_weighted_mean_of_the_gradients() -> None:
    """apply([g1, g2], [1, 0.25]) takes the same step as apply([(g1 + 0.25 g2) / 2], [1])
    from the same start: the weighted sum divided by the number of gradients."""
    torch.manual_seed(0)
    cfg = _gorila_cfg("learner.max_grad_norm=0").learner
    twins = [Aggregator(nn.ModuleDict({"online": nn.Linear(3, 2)}), cfg) for _ in range(2)]
    twins[1].model.load_state_dict(twins[0].model.state_dict())
    size = sum(p.numel() for p in twins[0].params)
    g1, g2 = torch.arange(size, dtype=torch.float32), torch.linspace(-3, 1, size)
    for _ in range(3):
        assert twins[0].apply([g1.clone(), g2.clone()], [1.0, 0.25]) == \
            twins[1].apply([(g1 + 0.25 * g2) / 2], [1.0])
        torch.testing.assert_close(flat_params(twins[0].online), flat_params(twins[1].online))
    assert not torch.equal(flat_params(twins[0].online), flat_params(
        Aggregator(nn.ModuleDict({"online": nn.Linear(3, 2)}), cfg).online))
    # and it differs from the plain sum or the unweighted mean
    third = Aggregator(nn.ModuleDict({"online": nn.Linear(3, 2)}), cfg)
    fourth = copy.deepcopy(third)
    third.apply([g1.clone(), g2.clone()], [1.0, 0.25])
    fourth.apply([g1.clone(), g2.clone()], [1.0, 1.0])
    assert not torch.equal(flat_params(third.online), flat_params(fourth.online))


def _a2c_real_steps(steps: int, *extra: str) -> list[tuple[list[int], bool]]:
    """Run an inline A2C for ``steps`` global updates; before each, a twin of every worker
    (same index, seeds and parameters) collects the same rollout its worker will train
    on. After each, check the new global parameters against one RMSprop step, from the
    same parameters and optimizer state, of a reference model on the concatenated twin
    rollouts. Returns, per step, the rollout lengths and whether the two agreed."""
    cfg = qfleet.load_config("cartpole-a2c", ["runtime.backend='inline'", "net.hidden=[16]",
                                              "learner.adam_eps=1e-2", *extra])
    results = []
    with inline_runner(cfg) as runner:
        agg = runner.aggregator
        assert isinstance(agg.opt, torch.optim.RMSprop) and agg.target is None
        twins = [runner.program.make_worker(i, 0, None) for i in range(2)]
        try:
            for _ in range(steps):
                version = agg.version
                ref = copy.deepcopy(agg.online)
                ref_opt = make_optimizer(list(ref.parameters()), cfg.learner)
                ref_opt.load_state_dict(copy.deepcopy(agg.opt.state_dict()))
                chunks = []
                for twin in twins:
                    twin.set_params(agg.snapshot())
                    d = twin.actor.collect(cfg.actors.chunk_size).transitions
                    chunks.append(TorchBatch(*(torch.from_numpy(a) for a in (
                        d.obs_NO, d.action_N, d.reward_N, d.discount_N, d.next_obs_NO)), None))
                report = runner.step()
                assert report.updates == 1 and agg.version == version + 1
                assert report.grads_applied == 2 and report.staleness_sum == 0
                out = ac_loss(ref, _cat(*chunks), value_coef=cfg.algo.value_coef,
                              entropy_coef=cfg.algo.entropy_coef)
                ref_opt.zero_grad()
                out.loss.backward()
                nn.utils.clip_grad_norm_(ref.parameters(), cfg.learner.max_grad_norm)
                ref_opt.step()
                agree = all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(
                    agg.online.state_dict().values(), ref.state_dict().values(), strict=True))
                results.append(([len(c.action_B) for c in chunks], agree))
        finally:
            for twin in twins:
                twin.close()
    return results


@pytest.fixture(scope="module")
def a2c_steps() -> list[tuple[list[int], bool]]:
    return _a2c_real_steps(30)


def test_a2c_sync_step_equals_one_step_on_the_concatenated_rollouts() -> None:
    """Rollouts of equal length by construction: 1-step returns flush no n-step tails at
    episode ends, so every rollout holds chunk_size x num_envs rows (with n = 5 equal
    lengths are a matter of luck: a few of 30 steps)."""
    results = _a2c_real_steps(12, "algo.n_step=1")
    assert all(lengths == [5 * 4, 5 * 4] for lengths, _ in results), results
    assert all(agree for _, agree in results), results


def test_a2c_sync_step_weights_every_row_equally_when_rollouts_differ_in_length(
        a2c_steps: list[tuple[list[int], bool]]) -> None:
    """A2C is "one batched update over all workers' rollouts" (issue 6, a2c.py). A chunk
    that ends an episode holds extra rows (the flushed n-step tails), so two workers'
    rollouts often differ in length; averaging the per-worker mean gradients with equal
    weights would weight the rows of the shorter rollout more than one batched update
    does, so the gate weights each gradient by its rows."""
    results = a2c_steps
    unequal = [agree for lengths, agree in results if lengths[0] != lengths[1]]
    assert unequal, results
    assert all(unequal), results


def test_set_grads_and_flat_grads_round_trip() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = list(net.parameters())
    size = sum(p.numel() for p in params)
    flat = torch.randn(size)
    set_grads(params, flat)
    assert torch.equal(flat_grads(params), flat)
    flat.zero_()  # set_grads copied: the params' grads do not alias the input
    assert flat_grads(params).abs().sum() > 0
    net.zero_grad(set_to_none=True)
    assert torch.equal(flat_grads(params), torch.zeros(size))


# ---------------------------------------------------------------- the actor-critic loss


def _tiny_ac() -> ActorCritic:
    """Identity torso over 2 features, 2 actions, weights set by hand."""
    net = ActorCritic(nn.Identity(), 2, 2)
    with torch.no_grad():
        net.policy.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        net.policy.bias.copy_(torch.tensor([0.0, -1.0]))
        net.value.weight.copy_(torch.tensor([[0.5, -1.0]]))
        net.value.bias.copy_(torch.tensor([0.25]))
    return net


def _tiny_batch() -> TorchBatch:
    return TorchBatch(obs_BO=torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]),
                      action_B=torch.tensor([1, 0, 1]),
                      reward_B=torch.tensor([1.0, 0.5, -1.0]),
                      discount_B=torch.tensor([0.9, 0.0, 0.81]),
                      next_obs_BO=torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
                      weights_B=None)


def _by_hand(value_coef: float, entropy_coef: float) -> dict[str, Any]:
    obs = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]]
    nxt = [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    actions, rewards, discounts = [1, 0, 1], [1.0, 0.5, -1.0], [0.9, 0.0, 0.81]

    def value(o: list[float]) -> float:
        return 0.5 * o[0] - 1.0 * o[1] + 0.25

    def logits(o: list[float]) -> list[float]:
        return [o[0], 2.0 * o[1] - 1.0]

    pg, vl, ent, advs = 0.0, 0.0, 0.0, []
    for o, n, a, r, d in zip(obs, nxt, actions, rewards, discounts, strict=True):
        z = logits(o)
        norm = math.log(math.exp(z[0]) + math.exp(z[1]))
        logp = [z[0] - norm, z[1] - norm]
        y = r + d * value(n)
        adv = y - value(o)
        advs.append(adv)
        pg += -adv * logp[a]
        vl += (value(o) - y) ** 2
        ent += -sum(math.exp(lp) * lp for lp in logp)
    pg, vl, ent = pg / 3, vl / 3, ent / 3
    return {"loss": pg + value_coef * vl - entropy_coef * ent, "adv": advs,
            "v_mean": sum(value(o) for o in obs) / 3, "pg": pg, "vl": vl, "ent": ent}


@pytest.mark.parametrize("value_coef, entropy_coef", [(0.5, 0.01), (0.0, 0.0), (1.0, 0.0),
                                                      (0.0, 1.0), (0.25, 0.3)])
def test_ac_loss_matches_hand_computed_terms(value_coef: float, entropy_coef: float) -> None:
    out = ac_loss(_tiny_ac(), _tiny_batch(), value_coef=value_coef, entropy_coef=entropy_coef)
    hand = _by_hand(value_coef, entropy_coef)
    assert out.loss.item() == pytest.approx(hand["loss"], rel=1e-5, abs=1e-6)
    # td_B is the advantage y - V(s), detached; q_mean is the mean V(s)
    assert out.td_B.tolist() == pytest.approx(hand["adv"], rel=1e-5, abs=1e-6)
    assert not out.td_B.requires_grad and not out.q_mean.requires_grad
    assert out.q_mean.item() == pytest.approx(hand["v_mean"], rel=1e-6)


def test_ac_loss_gradients_flow_only_where_they_should() -> None:
    batch = _tiny_batch()
    hand = _by_hand(1.0, 0.0)
    # Policy term only: the advantage is a constant, the value head gets no gradient.
    net = _tiny_ac()
    ac_loss(net, batch, value_coef=0.0, entropy_coef=0.0).loss.backward()
    assert net.value.weight.grad is None or not net.value.weight.grad.any()
    assert net.policy.weight.grad is not None and net.policy.weight.grad.abs().sum() > 0
    # d/dlogits of mean(-adv * log pi(a)) = -adv * (onehot(a) - pi) / B; bias grad sums rows.
    z = net.policy(batch.obs_BO).detach()
    pi = torch.softmax(z, 1)
    onehot = nn.functional.one_hot(batch.action_B, 2).float()
    adv = torch.tensor(hand["adv"])
    expected_bias = (-(adv.unsqueeze(1)) * (onehot - pi) / 3).sum(0)
    assert net.policy.bias.grad is not None
    torch.testing.assert_close(net.policy.bias.grad, expected_bias)
    # Value term only: the bootstrap target is a constant (no gradient through V(s')).
    net = _tiny_ac()
    ac_loss(net, batch, value_coef=1.0, entropy_coef=0.0).loss.backward()
    v_minus_y = [-a for a in hand["adv"]]
    assert net.value.bias.grad is not None
    assert net.value.bias.grad.item() == pytest.approx(2 * sum(v_minus_y) / 3, rel=1e-5)
    # Entropy term only: pushes towards uniform, no gradient to the value head.
    net = _tiny_ac()
    ac_loss(net, batch, value_coef=0.0, entropy_coef=1.0).loss.backward()
    out_pg = ac_loss(_tiny_ac(), batch, value_coef=0.0, entropy_coef=0.0).loss.item()
    out_ent = ac_loss(_tiny_ac(), batch, value_coef=0.0, entropy_coef=1.0).loss.item()
    assert out_pg - out_ent == pytest.approx(hand["ent"], rel=1e-5)
    assert 0 < hand["ent"] <= math.log(2)


# ---------------------------------------------------------------- the rollout queue


def _rows(start: int, count: int) -> Transitions:
    ids = np.arange(start, start + count)
    return Transitions(obs_NO=np.stack([ids, -ids], 1).astype(np.float32),
                       action_N=(ids % 2).astype(np.int64),
                       reward_N=ids.astype(np.float32),
                       discount_N=np.full(count, 0.99, np.float32),
                       next_obs_NO=np.stack([ids + 1, -ids], 1).astype(np.float32))


def test_rollout_queue_is_fifo_splits_rollouts_and_numbers_rows_uniquely() -> None:
    q = RolloutQueue(100, np.random.default_rng(0))
    a, b = _rows(0, 5), _rows(5, 3)
    q.add(a)
    q.add(b)
    a.reward_N[:] = -1  # the queue copied the chunk: a reused transport slot is harmless
    assert len(q) == 8 and not q.prioritized
    first = q.sample(4)
    assert first.data.reward_N.tolist() == [0, 1, 2, 3] and first.weights_B is None
    assert len(q) == 4
    second = q.sample(3)  # the rest of the first rollout, then the head of the next
    assert second.data.reward_N.tolist() == [4, 5, 6]
    np.testing.assert_array_equal(second.data.next_obs_NO[:, 0], [5, 6, 7])
    np.testing.assert_array_equal(second.data.obs_NO[:, 1], [-4, -5, -6])
    q.add(_rows(8, 2))
    third = q.sample(3)
    assert third.data.reward_N.tolist() == [7, 8, 9] and len(q) == 0
    indices = np.concatenate([first.indices_B, second.indices_B, third.indices_B])
    assert len(np.unique(indices)) == len(indices) == 10
    assert indices.tolist() == sorted(indices.tolist())
    with pytest.raises(ValueError, match="holds 0 rows"):
        q.sample(1)
    with pytest.raises(TypeError):
        q.update_priorities(indices, np.ones(10))


def test_rollout_queue_numbers_rows_from_zero_and_takes_whole_rollouts_exactly() -> None:
    q = RolloutQueue(100, np.random.default_rng(0))
    q.add(_rows(0, 4))
    q.add(_rows(4, 2))
    first = q.sample(4)  # exactly the first rollout: nothing of it stays behind
    assert first.indices_B.tolist() == [0, 1, 2, 3] and len(q) == 2
    second = q.sample(2)
    assert second.indices_B.tolist() == [4, 5] and second.data.reward_N.tolist() == [4, 5]
    assert len(q) == 0
    q.add(_rows(6, 3))
    assert q.sample(3).data.reward_N.tolist() == [6, 7, 8]
    with pytest.raises(TypeError, match="a rollout queue has no priorities"):
        q.update_priorities(np.arange(2), np.ones(2))


def test_rollout_queue_over_capacity_drops_the_oldest_rollouts() -> None:
    q = RolloutQueue(8, np.random.default_rng(0))
    q.add(_rows(0, 4))
    q.add(_rows(4, 4))
    assert len(q) == 8
    q.add(_rows(8, 3))  # 11 > 8: the oldest rollout goes
    assert len(q) == 7
    assert q.sample(7).data.reward_N.tolist() == list(range(4, 11))
    assert q.nbytes == 0 and q.state_dict() == {}


# ---------------------------------------------------------------- policy sampling


def test_sample_logits_matches_softmax_and_is_seeded() -> None:
    logits = np.array([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    reps = 20_000
    logits_EA = np.repeat(logits, reps, axis=0)
    draws = sample_logits(logits_EA, np.random.default_rng(0))
    assert draws.shape == (3 * reps,) and draws.dtype.kind == "i"
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for row in range(3):
        counts = np.bincount(draws[row * reps:(row + 1) * reps], minlength=4)
        expected = probs[row] * reps
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.3, (row, counts, expected)  # chi-square, 3 dof, p = 0.001
    again = sample_logits(logits_EA, np.random.default_rng(0))
    other = sample_logits(logits_EA, np.random.default_rng(1))
    assert np.array_equal(draws, again) and not np.array_equal(draws, other)
    # A dominant logit is (nearly) always drawn; -inf never is.
    sure = sample_logits(np.array([[0.0, 50.0, -np.inf]] * 1000), np.random.default_rng(2))
    assert (sure == 1).all()


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("preset, overrides, pattern", [
    ("cartpole-batchsync", ["algo.group_size=3"],
     r"algo\.group_size = 3: must divide actors\.count = 4"),
    ("cartpole-gorila-sync", ["actors.count=1"],
     r"algo\.aggregation = 'sync' with actors\.count = 1"),
    ("cartpole-gorila-sync", ["algo.aggregation=bogus"],
     r"algo\.aggregation = 'bogus': not one of .*'grouped'"),
    ("cartpole-a3c", ["algo.aggregation=sync"], r"algo\.aggregation = 'sync': a3c is async"),
    ("cartpole-a3c", ["algo.aggregation=grouped", "algo.group_size=1"],
     r"algo\.aggregation = 'grouped': a3c"),
    ("cartpole-a2c", ["algo.aggregation=async"], r"algo\.aggregation = 'async': a2c is sync"),
    ("cartpole-dqn", ["replay.scope=shared"], r"replay\.scope = 'shared': only gorila"),
    ("cartpole-a2c", ["replay.scope=sharded"], r"replay\.scope = 'sharded'"),
    ("cartpole-dqn", ["algo.aggregation=sync"], r"algo\.aggregation = 'sync'.*single learner"),
    ("cartpole-gorila-sync", ["algo.stale=maybe"], r"algo\.stale = 'maybe'"),
    ("cartpole-gorila-sync", ["algo.on_worker_loss=panic"], r"algo\.on_worker_loss = 'panic'"),
    ("cartpole-a3c", ["algo.a3c_mode=magic"], r"algo\.a3c_mode = 'magic'"),
    ("cartpole-a2c", ["learner.optimizer=sgd"], r"learner\.optimizer = 'sgd'"),
])
def test_config_errors_name_the_field_and_value(preset: str, overrides: list[str],
                                                pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        qfleet.load_config(preset, overrides)


def test_a3c_queue_capacity_below_one_batch_is_a_config_error() -> None:
    """A rollout queue that can never hold learner.batch_size rows never trains: the run
    would collect to its step budget with zero updates: the config must be refused."""
    with pytest.raises(ConfigError, match=r"replay\.capacity = 30"):
        qfleet.load_config("cartpole-a3c-queue", ["replay.capacity=30"])


def test_grouped_with_a_divisor_and_a_single_async_worker_are_fine() -> None:
    cfg = qfleet.load_config("cartpole-batchsync", ["algo.group_size=4"])
    assert build_program(cfg).group_size == 4  # type: ignore[union-attr]
    cfg = qfleet.load_config("cartpole-gorila-async", ["actors.count=1"])
    assert build_program(cfg).group_size == 1  # type: ignore[union-attr]


def test_cli_config_error_is_clean(run_cli: Callable[..., Any],
                                   clean_error: Callable[..., None], tmp_path: Path) -> None:
    proc = run_cli("train", "cartpole-batchsync", "--run-dir", str(tmp_path / "run"),
                   sets=["algo.group_size=3"], timeout=120)
    clean_error(proc, "algo.group_size", "3")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- presets and the table

# preset -> (loss family, data path, aggregation); the n-step part of the loss is read
# from the preset (presets get tuned), the rest is what the preset is for.
ROWS = {
    "cartpole-gorila-sync": ("DQN double", "local uniform replay per worker",
                             "sync (2 workers)"),
    "cartpole-gorila-async": ("DQN double", "local uniform replay per worker",
                              "async (2 workers)"),
    "cartpole-batchsync": ("DQN double", "local uniform replay per worker",
                           "grouped (2 groups of 2)"),
    "cartpole-dper": ("DQN double", "sharded prioritized replay (2 shards, every worker "
                      "samples all)", "sync (2 workers)"),
    "cartpole-a2c": ("advantage actor-critic", "on-policy rollouts", "sync (2 workers)"),
    "cartpole-a3c": ("advantage actor-critic", "on-policy rollouts",
                     "async (Hogwild, shared memory)"),
    "cartpole-a3c-queue": ("advantage actor-critic",
                           "on-policy rollouts through one global queue",
                           "async (2 trainer threads pop the queue)"),
}


def _loss_name(family: str, n_step: int) -> str:
    if family.startswith("advantage"):
        return f"{family}, {n_step}-step"
    return family + (f" {n_step}-step" if n_step > 1 else "")


@pytest.mark.parametrize("preset", sorted(ROWS))
def test_scheme_row_of_each_new_preset(preset: str) -> None:
    cfg = qfleet.load_config(preset)
    family, data, aggregation = ROWS[preset]
    assert scheme_row(cfg) == {"loss": _loss_name(family, cfg.algo.n_step), "data path": data,
                               "aggregation": aggregation, "backend": "processes"}


def test_scheme_row_follows_overrides() -> None:
    cfg = qfleet.load_config("cartpole-gorila-sync", ["replay.scope=shared",
                                                      "replay.kind=prioritized"])
    assert scheme_row(cfg)["data path"] == "one shared prioritized replay"
    cfg = qfleet.load_config("cartpole-batchsync", ["actors.count=6", "algo.group_size=3"])
    assert scheme_row(cfg)["aggregation"] == "grouped (2 groups of 3)"


def test_presets_command_lists_the_new_presets(run_cli: Callable[..., Any]) -> None:
    proc = run_cli("presets", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for preset, (_, data, aggregation) in ROWS.items():
        assert preset in proc.stdout
        assert f"aggregation: {aggregation}" in proc.stdout, preset
        assert data in proc.stdout, preset


def test_every_new_preset_builds_a_program() -> None:
    from qfleet.algos import ActorLearnerProgram

    for preset in ROWS:
        cfg = qfleet.load_config(preset)
        program = build_program(cfg)
        queue = preset == "cartpole-a3c-queue"
        assert isinstance(program, ActorLearnerProgram if queue else GradientProgram), preset
        assert program.num_actors == cfg.actors.count
        if isinstance(program, GradientProgram):
            assert program.hogwild == (preset == "cartpole-a3c")
            assert program.group_size == {"cartpole-gorila-async": 1, "cartpole-a3c": 1,
                                          "cartpole-batchsync": 2}.get(preset, 2)


# ---------------------------------------------------------------- determinism and resume

RUN_SETS = ("train.eval_every=400", "train.eval_episodes=2", "log.every=200",
            "checkpoint.every=0", "log.progress=false", "log.tensorboard=false",
            "runtime.backend='inline'")


def _without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def _final(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta, _ = checkpoint.load(checkpoint.find(run_dir))
    return tensors, meta


def _small(preset: str, *extra: str) -> Config:
    common = [*RUN_SETS, *extra]
    if preset == "cartpole-a2c":
        return qfleet.load_config(preset, ["train.total_env_steps=1600", "net.hidden=[32]",
                                           "env.num_envs=2", *common])
    return qfleet.load_config(preset, ["train.total_env_steps=1200", *SMALL_GORILA[:-3],
                                       *common])


@pytest.mark.parametrize("preset", ["cartpole-gorila-sync", "cartpole-a2c"])
def test_inline_runs_are_deterministic_under_a_seed(preset: str, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = train(_small(preset, f"seed={seed}"), tmp_path / name)
        tensors, meta = _final(tmp_path / name)
        runs[name] = (result, _without_timing(read_metrics(tmp_path / name)), tensors, meta)
    (res_a, met_a, ten_a, meta_a), (res_b, met_b, ten_b, _) = runs["a"], runs["b"]
    res_c, met_c, ten_c, _ = runs["c"]
    assert res_a.updates > 20 and res_a.env_steps >= 1200
    assert {r["event"] for r in met_a} == {"train", "eval"}
    assert any(r.get("return_mean") is not None for r in met_a)
    assert met_a == met_b
    assert (res_a.eval_return_mean, res_a.updates, res_a.env_steps) == \
        (res_b.eval_return_mean, res_b.updates, res_b.env_steps)
    assert ten_a.keys() == ten_b.keys()
    for key in ten_a:
        if key != "torch_rng":
            assert torch.equal(ten_a[key], ten_b[key]), key
    assert meta_a["recent_returns"] and meta_a["recent_returns"] == \
        _final(tmp_path / "b")[1]["recent_returns"]
    net = load_policy(tmp_path / "a").net  # the scheme's own network (ActorCritic for a2c)
    assert isinstance(net, ActorCritic) == (preset == "cartpole-a2c")
    for name, value in net.state_dict().items():
        assert torch.equal(value, ten_a[f"online.{name}"]), name
    # a different seed is a different run
    assert met_a != met_c
    model_keys = [k for k in ten_a if k.startswith("online.")]
    assert model_keys and any(not torch.equal(ten_a[k], ten_c[k]) for k in model_keys)
    del res_c


def test_resume_of_an_inline_gorila_run_continues_its_counters(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = train(_small("cartpole-gorila-sync", "train.total_env_steps=800"), run_dir)
    ckpt = checkpoint.find(run_dir)
    files = {p.name for p in ckpt.iterdir()}
    assert files and all(p.suffix in (".safetensors", ".json") for p in ckpt.iterdir()), files
    tensors, meta = _final(run_dir)
    assert meta["updates"] == first.updates > 0 and meta["env_steps"] == first.env_steps
    assert any(k.startswith("online.") for k in tensors)
    assert any(k.startswith("target.") for k in tensors)
    policy = load_policy(run_dir)  # what `qfleet eval` loads: the global online net
    net, saved_cfg = policy.net, policy.config
    assert saved_cfg.algo.name == "gorila"
    for name, value in net.state_dict().items():
        assert torch.equal(value, tensors[f"online.{name}"]), name
    old_lines = read_metrics(run_dir)

    result = resume(run_dir, _small("cartpole-gorila-sync", "train.total_env_steps=1400"))
    assert 1400 <= result.env_steps < 1400 + 16
    assert result.updates > first.updates
    # each round (4 env steps per worker, 2 workers) after the refill makes one sync step
    assert result.updates - first.updates <= (result.env_steps - first.env_steps) // 8
    lines = read_metrics(run_dir)
    assert lines[:len(old_lines)] == old_lines
    new = lines[len(old_lines):]
    assert new and min(r["env_steps"] for r in new) > first.env_steps
    assert min(r["updates"] for r in new if r["event"] == "train") >= first.updates
    _, meta2 = _final(run_dir)
    assert meta2["updates"] == result.updates and meta2["env_steps"] == result.env_steps
    # the resumed workers are new incarnations (fresh seeds)
    assert [w["incarnation"] for w in meta2["workers"]] == [1, 1]
    json.dumps(meta2)  # the metadata is plain JSON
