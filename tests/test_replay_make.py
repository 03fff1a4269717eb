"""make_replay picks the replay the config asks for; PER runs end to end and checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qfleet import checkpoint
from qfleet.config import Config, ConfigError, ReplayConfig, load_config
from qfleet.experiment import Experiment
from qfleet.replay import (
    FrameStorage,
    PrioritizedReplay,
    RingStorage,
    ShardedReplay,
    UniformReplay,
    describe,
    make_replay,
)
from qfleet.replay.sumtree import SumMinTree

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)


def build(obs_shape: tuple[int, ...] = (4,), dtype: np.dtype = F32,
          anneal_steps: int | None = None, **kw: object) -> object:
    return make_replay(ReplayConfig(**kw), obs_shape, dtype,  # type: ignore[arg-type]
                       np.random.default_rng(0), anneal_steps)


def test_dispatch_on_kind_shards_and_storage() -> None:
    uniform = build(capacity=10)
    assert isinstance(uniform, UniformReplay) and isinstance(uniform.storage, RingStorage)
    per = build(kind="prioritized", capacity=10, alpha=0.5, beta0=0.3, eps=0.1)
    assert isinstance(per, PrioritizedReplay)
    assert (per.alpha, per.eps, per.beta, per.capacity) == (0.5, 0.1, 0.3, 10)
    sharded = build(kind="prioritized", capacity=12, shards=3)
    assert isinstance(sharded, ShardedReplay) and len(sharded.shards) == 3
    assert sharded.capacity == 12 and sharded.rng is sharded.shards[0].rng
    atari = build((4, 84, 84), U8, kind="prioritized", capacity=100)
    assert isinstance(atari, PrioritizedReplay) and isinstance(atari.storage, FrameStorage)
    ring = build((4, 84, 84), U8, capacity=100, storage="ring")
    assert isinstance(ring, UniformReplay) and isinstance(ring.storage, RingStorage)


def test_beta_anneals_over_the_run_unless_beta_steps_is_set() -> None:
    from_run = build(kind="prioritized", capacity=10, beta0=0.5, anneal_steps=100)
    assert isinstance(from_run, PrioritizedReplay)
    assert from_run.schedule.beta_steps == 100
    own = build(kind="prioritized", capacity=10, beta_steps=7, anneal_steps=100)
    assert isinstance(own, PrioritizedReplay) and own.schedule.beta_steps == 7


def test_uniform_sharding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"replay\.shards = 2.*prioritized"):
        load_config("cartpole-dqn", ["replay.shards=2"])
    with pytest.raises(ConfigError, match=r"replay\.kind"):
        load_config("cartpole-dqn", ["replay.kind=ranked"])


def test_describe_reports_the_preallocated_size() -> None:
    line = describe(build(kind="prioritized", capacity=1000))  # type: ignore[arg-type]
    assert "PrioritizedReplay" in line and "capacity 1,000" in line and "MB" in line
    atari = build((4, 84, 84), U8, kind="prioritized", capacity=1_000_000)  # lazily zeroed
    # the NumPy tree takes 32 MB of it, the compiled one (the `fast` extra) 13 MB
    size = "7.41" if isinstance(atari.tree, SumMinTree) else "7.39"  # type: ignore[union-attr]
    assert f"capacity 1,000,000, {size} GB preallocated" in describe(atari)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["cartpole-per", "lunarlander-per"])
def test_per_presets_load(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.replay.kind == "prioritized"
    assert cfg.replay.beta_steps == cfg.train.total_env_steps


def test_prioritized_run_checkpoints_and_restores_its_priorities(
        make_cfg: Callable[..., Config], tmp_path: Path) -> None:
    cfg = make_cfg("checkpoint.replay=true", "train.total_env_steps=1200", "train.eval_every=0",
                   preset="cartpole-per")
    exp = Experiment(cfg, tmp_path / "run")
    exp.run()
    saved = exp.runner.replay
    assert isinstance(saved, PrioritizedReplay) and exp.runner.updates > 0
    prio_N = saved.tree.priorities_N[:len(saved)]
    assert len(np.unique(prio_N)) > 100  # the learner wrote TD-based priorities back
    again = Experiment(cfg, tmp_path / "run")
    again.restore(checkpoint.find(tmp_path / "run"))
    restored = again.runner.replay
    assert isinstance(restored, PrioritizedReplay)
    np.testing.assert_array_equal(restored.tree.priorities_N, saved.tree.priorities_N)
    np.testing.assert_array_equal(restored.id_N, saved.id_N)
    assert (restored.added, restored.max_priority, restored.beta) == \
        (saved.added, saved.max_priority, saved.beta)
    again.runner.close()


def test_every_shard_fills_when_one_actor_writes_a_sharded_replay() -> None:
    """cartpole-per with replay.shards = 4 and one actor: writes spread over the shards
    (they used to all go to the actor's own shard number, 0, leaving a quarter usable)."""
    from qfleet.algos import build_program
    from qfleet.replay import ShardedReplay
    from qfleet.runtime import InlineRunner

    cfg = load_config("cartpole-per", ["replay.shards=4", "replay.capacity=400",
                                       "train.total_env_steps=2000", "log.progress=false"])
    runner = InlineRunner(build_program(cfg))  # type: ignore[arg-type]
    try:
        while runner.env_steps < 1000:
            runner.step()
        assert isinstance(runner.replay, ShardedReplay)
        sizes = [len(s) for s in runner.replay.shards.values()]
        assert sizes == [100, 100, 100, 100] and len(runner.replay) == 400
    finally:
        runner.close()


def test_apex_refuses_a_uniform_replay_and_auto_resolves() -> None:
    from qfleet.config import replay_kind_of

    with pytest.raises(ConfigError, match=r"replay\.kind = 'uniform'.*apex"):
        load_config("cartpole-apex", ["replay.kind='uniform'"])
    with pytest.raises(ConfigError, match=r"replay\.kind = 'uniform'.*sharded"):
        load_config("cartpole-dper", ["replay.kind='uniform'"])
    assert replay_kind_of(load_config("cartpole-apex")) == "prioritized"
    assert replay_kind_of(load_config("cartpole-dqn")) == "uniform"
