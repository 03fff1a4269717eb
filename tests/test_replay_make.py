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
    assert "capacity 1,000,000, 7.41 GB preallocated" in describe(atari)  # type: ignore[arg-type]


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
