"""The aggregator and the global side against references written out by hand: the
gradient a step applies is sum_i w_i g_i / W (W = 1, 2, 3; clipped as torch clips it),
the step is one optimizer step on exactly that gradient, and restoring a gradient
scheme's checkpoint gives tensor-equal optimizer state and the very same next step."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _runners import closing, gradient_program, workers_gone
from torch import nn

import qfleet
from qfleet import checkpoint
from qfleet.config import LearnerConfig
from qfleet.roles.gradients import Aggregator, Gradient, GradientGate, flat_grads, set_grads
from qfleet.roles.learner import make_optimizer
from qfleet.runtime import InlineGradientRunner, ProcessesGradientRunner
from qfleet.runtime.global_side import GlobalSide

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Dyadic gradients and weights: every product and partial sum is exact in float32, so the
# reference sum equals the aggregator's in any order and the division by W is the only
# rounding on either side.
GRADS = [torch.tensor([1.0, -2.0, 0.5, 4.0, -0.25, 3.0, 0.0, -1.5, 2.0, 0.75, -3.0, 1.25]),
         torch.tensor([-0.5, 1.0, 2.0, -4.0, 0.5, 1.5, -2.5, 0.25, -1.0, 3.5, 0.125, 2.0]),
         torch.tensor([2.0, 0.5, -1.0, 1.0, -3.0, 0.25, 1.75, -2.0, 0.5, -0.5, 1.0, -0.125])]
WEIGHTS = [1.0, 0.5, 0.25]


def _aggregator(max_grad_norm: float, optimizer: str = "adam") -> Aggregator:
    torch.manual_seed(0)
    cfg = LearnerConfig(device="cpu", lr=1e-2, max_grad_norm=max_grad_norm,
                        optimizer=optimizer)
    return Aggregator(nn.ModuleDict({"online": nn.Linear(3, 3)}), cfg)  # 9 + 3 = 12 params


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1).clone() for v in module.state_dict().values()])


@pytest.mark.parametrize("num", [1, 2, 3])
@pytest.mark.parametrize("max_grad_norm", [0.0, 100.0, 1.0])
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_applied_gradient_is_the_weighted_sum_over_w(num: int, max_grad_norm: float,
                                                     optimizer: str) -> None:
    """max_grad_norm 0: no clipping; 100: clipping on, not biting; 1: clipping bites (the
    applied gradient is the mean scaled to norm 1, as clip_grad_norm_ scales it)."""
    agg = _aggregator(max_grad_norm, optimizer)
    ref = copy.deepcopy(agg.online)
    ref_opt = make_optimizer(list(ref.parameters()), agg.cfg)
    grads, weights = [g.clone() for g in GRADS[:num]], WEIGHTS[:num]

    expected_P = torch.zeros(12)
    for g, w in zip(GRADS[:num], weights, strict=True):  # the slow way, term by term
        expected_P = expected_P + w * g
    expected_P = expected_P / num
    norm = float(torch.linalg.vector_norm(expected_P))
    if 0 < max_grad_norm < norm:
        expected_P = expected_P * (max_grad_norm / (norm + 1e-6))
    assert (max_grad_norm == 1.0) == (0 < max_grad_norm < norm), "the clip case must bite"

    assert agg.apply(grads, list(weights)) == 1
    applied_P = flat_grads(agg.params)  # the step leaves the gradient it used in .grad
    if max_grad_norm == 1.0:
        torch.testing.assert_close(applied_P, expected_P, rtol=1e-6, atol=0)
        assert float(applied_P.norm()) == pytest.approx(1.0, rel=1e-5)
    else:
        assert torch.equal(applied_P, expected_P)
    # The step itself: one optimizer step from the same state on that gradient.
    set_grads(list(ref.parameters()), expected_P)
    ref_opt.step()
    torch.testing.assert_close(_flat(agg.online), _flat(ref), rtol=1e-6, atol=1e-7)


def test_aggregator_steps_add_up_like_a_reference_optimizer_over_many_steps() -> None:
    """Ten steps of varying W and weights: the aggregator's parameters follow a
    reference optimizer fed the hand-computed means (Adam's state carries over)."""
    agg = _aggregator(0.0)
    ref = copy.deepcopy(agg.online)
    ref_opt = make_optimizer(list(ref.parameters()), agg.cfg)
    gen = torch.Generator().manual_seed(3)
    for step in range(10):
        num = 1 + step % 3
        grads = [torch.randn(12, generator=gen) for _ in range(num)]
        weights = [0.5 + 0.25 * i for i in range(num)]
        mean_P = sum((w * g for g, w in zip(grads, weights, strict=True)),
                     torch.zeros(12)) / num
        agg.apply([g.clone() for g in grads], weights)
        set_grads(list(ref.parameters()), mean_P)
        ref_opt.step()
        torch.testing.assert_close(_flat(agg.online), _flat(ref), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- checkpoint restore

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[16]",
         "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=2000",
         "log.progress=false", "log.tensorboard=false"]
SMALL_AC = ["env.num_envs=2", "net.hidden=[16]", "log.progress=false", "log.tensorboard=false"]


def _cfg(preset: str, backend: str) -> qfleet.Config:
    small = SMALL_AC if preset == "cartpole-a2c" else SMALL
    return qfleet.load_config(preset, [*small, f"runtime.backend='{backend}'",
                                       "learner.target_update_every=5"])


def _optimizer_tensors(agg: Aggregator) -> dict[str, torch.Tensor]:
    state = agg.opt.state_dict()
    return {f"{pid}.{key}": value.clone() for pid, values in state["state"].items()
            for key, value in values.items() if isinstance(value, torch.Tensor)}


def _assert_same_global_side(a: GlobalSide, b: GlobalSide) -> None:
    assert a.aggregator.version == b.aggregator.version
    for key, value in a.aggregator.model.state_dict().items():
        assert torch.equal(value, b.aggregator.model.state_dict()[key]), key
    opt_a, opt_b = _optimizer_tensors(a.aggregator), _optimizer_tensors(b.aggregator)
    assert opt_a.keys() == opt_b.keys() and opt_a, "the optimizer has state to compare"
    for key in opt_a:
        assert torch.equal(opt_a[key], opt_b[key]), key
    # the hyperparameters too (through JSON, as the checkpoint keeps them: tuples are lists)
    groups_a, groups_b = (json.loads(json.dumps(side.aggregator.opt.state_dict()["param_groups"]))
                          for side in (a, b))
    assert groups_a == groups_b


def _same_next_steps(a: GlobalSide, b: GlobalSide, steps: int = 6) -> None:
    """Apply the same gradients to both: the same parameters after each step (Adam's or
    RMSprop's moments and step counts decide the step, so a fresh optimizer differs)."""
    size = sum(p.numel() for p in a.aggregator.params)
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        grads = [torch.randn(size, generator=gen) for _ in range(2)]
        va = a.aggregator.apply([g.clone() for g in grads], [1.0, 0.5])
        vb = b.aggregator.apply([g.clone() for g in grads], [1.0, 0.5])
        assert va == vb
        assert torch.equal(_flat(a.aggregator.model), _flat(b.aggregator.model))


@pytest.mark.parametrize("preset", ["cartpole-gorila-sync", "cartpole-a2c"])
def test_restored_inline_global_side_has_the_saved_optimizer_state(preset: str,
                                                                   tmp_path: Path) -> None:
    """Train a few global steps, checkpoint to disk, restore into a fresh runner of the
    same config: model, target, version and every optimizer tensor are equal, and the
    next steps on the same gradients give the same parameters."""
    cfg = _cfg(preset, "inline")
    with closing(InlineGradientRunner(gradient_program(cfg))) as first:
        while first.updates < 7:  # past a target refresh (every 5)
            first.step()
        tensors, meta, replay = first.state(with_replay=True)
        ckpt = checkpoint.save(tmp_path / "ckpt", first.env_steps, tensors, meta, replay)
        with closing(InlineGradientRunner(gradient_program(cfg))) as second:
            fresh = _optimizer_tensors(second.aggregator)
            second.restore(*checkpoint.load(ckpt))
            assert second.env_steps == first.env_steps
            _assert_same_global_side(first, second)
            assert not fresh or any(not torch.equal(fresh[k], v)
                                    for k, v in _optimizer_tensors(first.aggregator).items())
            _same_next_steps(first, second)


def test_restored_processes_global_side_has_the_saved_optimizer_state(tmp_path: Path) -> None:
    """The same on the processes backend, whose runner restores and then restarts its
    workers: the main process's aggregator holds the saved state (sync: it steps only
    inside ``step()``, so nothing moves it between the restore and the comparison)."""
    cfg = _cfg("cartpole-gorila-sync", "inline")
    with closing(InlineGradientRunner(gradient_program(cfg))) as first:
        while first.updates < 7:
            first.step()
        ckpt = checkpoint.save(tmp_path / "ckpt", first.env_steps, *first.state(True))
        program = gradient_program(_cfg("cartpole-gorila-sync", "processes"))
        with closing(ProcessesGradientRunner(program), workers_gone) as second:
            second.restore(*checkpoint.load(ckpt))
            _assert_same_global_side(first, second)
            _same_next_steps(first, second)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_share_memory_shares_everything_and_the_next_step_is_a_fresh_optimizers(
        optimizer: str) -> None:
    """Hogwild: the model, the optimizer state (created by a zero-gradient step that moves
    nothing, its step counter reset) and the version go to shared memory; the first real
    step is then exactly a fresh optimizer's first step. An optimizer that already stepped
    keeps its state and step count."""
    agg = _aggregator(0.0, optimizer)
    start = _flat(agg.online)
    ref = copy.deepcopy(agg.online)
    ref_opt = make_optimizer(list(ref.parameters()), agg.cfg)
    agg.share_memory()
    assert torch.equal(_flat(agg.online), start), "the zero-gradient step moved parameters"
    assert all(p.is_shared() for p in agg.online.parameters()) and agg.version_1.is_shared()
    assert agg.version_1.dtype == torch.int64  # a float counter would stall at 2**24
    state = _optimizer_tensors(agg)
    assert state and all(agg.opt.state[p][k].is_shared() for p in agg.params
                         for k, v in agg.opt.state[p].items() if isinstance(v, torch.Tensor))
    assert all(float(v) == 0.0 for k, v in state.items() if k.endswith(".step"))
    assert agg.version == 0
    grad_P = GRADS[0].clone()
    agg.apply([grad_P.clone()], [1.0])
    set_grads(list(ref.parameters()), grad_P)
    ref_opt.step()
    torch.testing.assert_close(_flat(agg.online), _flat(ref), rtol=1e-6, atol=1e-7)
    # Sharing again (a restored run) keeps the state it has: no reset, nothing moves.
    moved = _flat(agg.online)
    steps = {k: v.clone() for k, v in _optimizer_tensors(agg).items()}
    agg.share_memory()
    assert torch.equal(_flat(agg.online), moved)
    for key, value in _optimizer_tensors(agg).items():
        assert torch.equal(value, steps[key]), key


# ---------------------------------------------------------------- the gate's weights


def _rows_grad(worker: int, base: int, uid: int, rows: int) -> Gradient:
    return Gradient(worker, base, env_steps=1, grads_P=torch.tensor([float(uid)]), rows=rows)


def test_gate_weights_each_gradient_by_its_rows_over_the_groups_mean_rows() -> None:
    """Rows 10, 30, 20 in one sync group of 3: weights 10/20, 30/20, 20/20 (the step is then
    the mean over all 60 rows); a group of one always weighs 1; stale scaling multiplies."""
    gate = GradientGate(num_workers=3, group_size=3, max_staleness=0)
    for worker, rows in ((0, 10), (1, 30)):
        assert gate.offer(_rows_grad(worker, 0, worker, rows), 0, range(3)) is None
    ready = gate.offer(_rows_grad(2, 0, 2, 20), 0, range(3))
    assert ready is not None
    assert [int(g.item()) for g in ready[0]] == [0, 1, 2]
    assert ready[1] == pytest.approx([0.5, 1.5, 1.0], rel=1e-12)
    alone = GradientGate(num_workers=2, group_size=1, max_staleness=1, stale="scale")
    ready = alone.offer(_rows_grad(1, 0, 7, 13), 0, range(2))
    assert ready is not None and ready[1] == [1.0]
    ready = alone.offer(_rows_grad(0, 0, 8, 13), 3, range(2))  # staleness 3: (1+1)/(3+1)
    assert ready is not None and ready[1] == pytest.approx([0.5])


def test_gate_steps_with_the_gradient_a_lost_worker_left_behind() -> None:
    """Worker 1 sent, then died (no longer live): its gradient still goes into the group's
    step once worker 0 sends."""
    gate = GradientGate(num_workers=2, group_size=2, max_staleness=8)
    assert gate.offer(_rows_grad(1, 0, 1, 16), 0, range(2)) is None
    ready = gate.offer(_rows_grad(0, 0, 0, 16), 0, {0})
    assert ready is not None and [int(g.item()) for g in ready[0]] == [0, 1]
    assert gate.pending == {}
