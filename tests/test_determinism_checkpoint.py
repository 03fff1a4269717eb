"""Inline runs are deterministic under a seed; checkpoints restore every piece of state."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qfleet import checkpoint
from qfleet.config import Config, ConfigError, load_config
from qfleet.experiment import Experiment, resume, train
from qfleet.metrics import is_timing, read_metrics
from qfleet.policy_io import load_policy
from qfleet.replay.transitions import FIELDS

# Small but not trivial: 2 envs, 3-step returns, dueling, several evals and train rounds.
DET_SETS = ("train.total_env_steps=1600", "learner.learning_starts=256", "env.num_envs=2",
            "algo.n_step=3", "net.dueling=true", "net.hidden=[64, 64]",
            "learner.train_every=128", "learner.updates_per_round=32", "train.eval_every=512",
            "train.eval_episodes=2", "log.every=256", "checkpoint.every=0")


def without_timing(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop what the clock measured (seconds, rates, the time split)."""
    return [{k: v for k, v in r.items() if not is_timing(k)} for r in records]


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _, _ = checkpoint.load(checkpoint.find(run_dir))
    return tensors


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_same_run_different_seed_different_run(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        result = train(make_cfg(*DET_SETS, f"seed={seed}"), tmp_path / name)
        runs[name] = (result, read_metrics(tmp_path / name), final_tensors(tmp_path / name))
    (res_a, met_a, ten_a), (res_b, met_b, ten_b) = runs["a"], runs["b"]
    _, met_c, ten_c = runs["c"]

    assert len(met_a) >= 8 and {r["event"] for r in met_a} == {"train", "eval"}
    assert without_timing(met_a) == without_timing(met_b)
    assert_same_tensors(ten_a, ten_b)
    assert (res_a.eval_return_mean, res_a.updates) == (res_b.eval_return_mean, res_b.updates)

    assert without_timing(met_a) != without_timing(met_c)
    assert not torch.equal(ten_a["online.advantage.weight"], ten_c["online.advantage.weight"])
    losses_a = [r["loss"] for r in met_a if r.get("loss") is not None]
    losses_c = [r["loss"] for r in met_c if r.get("loss") is not None]
    assert losses_a != losses_c


# ---------------------------------------------------------------- checkpoint round trip


def opt_state(opt: torch.optim.Optimizer) -> tuple[dict[int, dict[str, Any]], str]:
    state = opt.state_dict()
    groups = json.dumps(state["param_groups"], sort_keys=True)  # tuples and lists alike
    return state["state"], groups


@pytest.fixture
def finished(make_cfg: Callable[..., Config], tmp_path: Path) -> tuple[Experiment, Config, Path]:
    cfg = make_cfg("train.total_env_steps=1200", "checkpoint.replay=true", "train.eval_every=0",
                   "log.every=256", "algo.n_step=2", "learner.train_every=128",
                   "learner.updates_per_round=32", "checkpoint.every=0")
    exp = Experiment(cfg, tmp_path / "a")
    exp.run()
    return exp, cfg, tmp_path / "a"


def test_checkpoint_restores_weights_optimizer_counters_rng_and_replay(
        finished: tuple[Experiment, Config, Path], tmp_path: Path) -> None:
    exp, cfg, run_dir = finished
    src = exp.runner
    ckpt = checkpoint.find(run_dir)
    tensors, meta, replay = checkpoint.load(ckpt)
    assert replay, "checkpoint.replay = true must save the replay"

    torch.manual_seed(12345)  # the restore must put the global torch RNG back
    exp2 = Experiment(cfg, tmp_path / "b")
    exp2.restore(ckpt)
    dst = exp2.runner
    try:
        for a, b in ((src.learner.online, dst.learner.online),
                     (src.learner.target, dst.learner.target)):
            assert_same_tensors(a.state_dict(), b.state_dict())
        state_a, groups_a = opt_state(src.learner.opt)
        state_b, groups_b = opt_state(dst.learner.opt)
        assert groups_a == groups_b and state_a.keys() == state_b.keys() and state_a
        for pid in state_a:
            assert state_a[pid].keys() == state_b[pid].keys()
            for key, value in state_a[pid].items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(state_b[pid][key]))

        assert dst.env_steps == src.env_steps == meta["env_steps"]
        assert dst.learner.version == src.learner.version == meta["updates"] > 0
        assert torch.equal(torch.get_rng_state(), tensors["torch_rng"])
        assert dst.replay.rng.bit_generator.state == src.replay.rng.bit_generator.state
        for a_actor, b_actor in zip(src.actors, dst.actors, strict=True):
            assert a_actor.rng.bit_generator.state == b_actor.rng.bit_generator.state
            assert a_actor.env_steps == b_actor.env_steps
        assert (dst.replay.storage.size, dst.replay.storage.cursor) == \
            (src.replay.storage.size, src.replay.storage.cursor)
        size = src.replay.storage.size
        for name in FIELDS:
            np.testing.assert_array_equal(dst.replay.storage.arrays[name][:size],
                                          src.replay.storage.arrays[name][:size])
        assert (exp2.best_eval, exp2.solved, list(exp2.episodes)) == \
            (exp.best_eval, exp.solved, list(exp.episodes))

        # Both continue identically: same sampled batch, same Adam step.
        batch_a, batch_b = src.replay.sample(32), dst.replay.sample(32)
        np.testing.assert_array_equal(batch_a.indices_B, batch_b.indices_B)
        src.learner.update(batch_a)
        dst.learner.update(batch_b)
        assert_same_tensors(src.learner.online.state_dict(), dst.learner.online.state_dict())
    finally:
        dst.close()


def test_checkpoint_folder_has_no_pickle(finished: tuple[Experiment, Config, Path],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, run_dir = finished
    root = run_dir / "checkpoints"
    for path in root.rglob("*"):
        if path.is_file() and path.parent != root:
            assert path.suffix in (".safetensors", ".json"), path
    assert {p.name for p in root.iterdir() if p.is_file()} == {"latest"}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint must load without unpickling")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    tensors, meta, replay = checkpoint.load(checkpoint.find(run_dir))
    assert tensors and meta and replay
    policy = load_policy(run_dir)
    net, cfg = policy.net, policy.config
    assert cfg.env.id == "CartPole-v1"
    torch.testing.assert_close(net.state_dict()["advantage.weight"],
                               tensors["online.advantage.weight"])


def test_resume_continues_counters(finished: tuple[Experiment, Config, Path],
                                   make_cfg: Callable[..., Config]) -> None:
    exp, _, run_dir = finished
    old_steps, old_updates = exp.runner.env_steps, exp.runner.updates
    old_lines = read_metrics(run_dir)
    bigger = make_cfg("train.total_env_steps=1800", "checkpoint.replay=true",
                      "train.eval_every=0", "log.every=256", "algo.n_step=2",
                      "learner.train_every=128", "learner.updates_per_round=32",
                      "checkpoint.every=0")
    result = resume(run_dir, bigger)
    assert 1800 <= result.env_steps < 1800 + 64
    sched = exp.runner.program.schedule
    assert result.updates == sched.updates_owed(result.env_steps) > old_updates
    lines = read_metrics(run_dir)
    assert lines[: len(old_lines)] == old_lines
    new = lines[len(old_lines):]
    assert new and min(r["env_steps"] for r in new) > old_steps
    # the log cadence carries on from the last line (a fresh start would log at 256)
    last_train = [r for r in old_lines if r["event"] == "train"][-1]
    assert new[0]["event"] == "train"
    assert new[0]["env_steps"] == last_train["env_steps"] + 256
    assert new[0]["updates"] >= old_updates


def test_resume_of_a_finished_run_does_not_train_again(
        finished: tuple[Experiment, Config, Path]) -> None:
    exp, _, run_dir = finished
    result = resume(run_dir)
    assert (result.env_steps, result.updates) == (exp.runner.env_steps, exp.runner.updates)


def incompatible(make_cfg: Callable[..., Config]) -> Config:
    """The `finished` run's config with a different network width."""
    return make_cfg("train.total_env_steps=1800", "checkpoint.replay=true",
                    "train.eval_every=0", "log.every=256", "algo.n_step=2",
                    "learner.train_every=128", "learner.updates_per_round=32",
                    "checkpoint.every=0", "net.hidden=[32]")


def test_failed_resume_leaves_the_run_config_alone(
        finished: tuple[Experiment, Config, Path], make_cfg: Callable[..., Config]) -> None:
    _, cfg, run_dir = finished
    with pytest.raises(Exception):  # noqa: B017 (any failure; the config file is the point)
        resume(run_dir, incompatible(make_cfg))
    assert load_config(run_dir / "config.toml") == cfg


def test_resume_with_a_changed_network_is_a_config_error(
        finished: tuple[Experiment, Config, Path], make_cfg: Callable[..., Config]) -> None:
    _, _, run_dir = finished
    with pytest.raises(ConfigError, match=r"net\.hidden"):
        resume(run_dir, incompatible(make_cfg))


# ---------------------------------------------------------------- checkpoint module


def test_save_keeps_newest_three_and_latest_points_to_newest(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (5, 100, 20, 3000, 40_000):
        checkpoint.save(root, step, {"w": torch.full((2,), float(step))}, {"step": step}, {})
    names = sorted(p.name for p in root.iterdir())
    assert names == ["latest", "step-000000000100", "step-000000003000", "step-000000040000"]
    ckpt = checkpoint.find(tmp_path)
    assert ckpt.name == "step-000000040000"
    tensors, meta, replay = checkpoint.load(ckpt)
    assert meta["step"] == 40_000 and tensors["w"].tolist() == [40_000.0, 40_000.0]
    assert replay == {}
    assert checkpoint.find(root) == ckpt and checkpoint.find(ckpt) == ckpt


def test_load_rejects_other_formats_and_broken_folders(tmp_path: Path) -> None:
    ckpt = checkpoint.save(tmp_path, 1, {"w": torch.zeros(1)}, {}, {})
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "format": 999}))
    with pytest.raises(checkpoint.CheckpointError, match="format 999"):
        checkpoint.load(ckpt)
    (ckpt / "tensors.safetensors").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        checkpoint.load(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint found"):
        checkpoint.find(tmp_path / "nothing-here")
