"""The record spec: a program that declares two more per-row fields gets them, row-aligned,
in the learner's batches on every backend, with no runtime file changed (transports,
shared-memory slots, replay services and shard actors copy by the spec)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from _runners import closing, run_until

from qfleet.algos import ActorLearnerProgram, build_program
from qfleet.config import Config, load_config, replay_kind_of
from qfleet.envs import probe_spaces
from qfleet.replay import Batch, Field, make_replay, transition_spec
from qfleet.roles import Actor, Chunk
from qfleet.runtime import make_runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EXTRA = {"actor_N": Field(np.dtype(np.int64)), "obs_sum_N": Field(np.dtype(np.float32))}
SETS = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "net.hidden=[32]",
        "learner.batch_size=32", "learner.learning_starts=128", "replay.capacity=4000",
        "log.progress=false", "log.tensorboard=false"]


class Tagging:
    """An actor whose transitions carry its index and each row's observation sum."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        return getattr(self.actor, name)

    def collect(self, vector_steps: int) -> Chunk:
        chunk = self.actor.collect(vector_steps)
        t = chunk.transitions
        t.extra = {"actor_N": np.full(len(t), self.actor.index, dtype=np.int64),
                   "obs_sum_N": t.obs_NO.sum(axis=1, dtype=np.float32)}
        return chunk


def tagged(cfg: Config) -> ActorLearnerProgram:
    """cartpole-apex's program, declaring EXTRA: its actors tag rows, its replays keep them."""
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    obs_shape, obs_dtype, _ = probe_spaces(cfg.env)
    rc = dataclasses.replace(cfg.replay, kind=replay_kind_of(cfg), shards=cfg.actors.count)
    make_actor = program.make_actor

    def replay(shards: int, capacity: int, stream: int) -> Any:
        return make_replay(dataclasses.replace(rc, shards=shards, capacity=capacity),
                           obs_shape, obs_dtype, np.random.default_rng([cfg.seed, stream]),
                           anneal_steps=cfg.train.total_env_steps, extra=EXTRA)

    return dataclasses.replace(
        program, record=transition_spec(obs_shape, obs_dtype, EXTRA),
        make_actor=lambda i, inc: Tagging(make_actor(i, inc)),  # type: ignore[arg-type,return-value]
        make_replay=lambda: replay(rc.shards, rc.capacity, 7919),
        make_shard=lambda i, count: replay(1, rc.capacity // count, 100 + i))


@contextmanager
def recording(runner: Any) -> Iterator[list[Batch]]:
    """Every batch the learner trains on."""
    seen: list[Batch] = []
    real = runner.learner.update_many

    def update_many(batch: Batch, count: int, staged: Any = None) -> Any:
        seen.append(batch)
        return real(batch, count) if staged is None else real(batch, count, staged)

    runner.learner.update_many = update_many
    yield seen


def check(batches: list[Batch]) -> None:
    assert batches, "the learner never trained"
    for batch in batches:
        extra = batch.data.extra
        assert set(extra) == set(EXTRA)
        np.testing.assert_array_equal(extra["obs_sum_N"],
                                      batch.data.obs_NO.sum(axis=1, dtype=np.float32))
    assert _tags(batches) == {0, 1}  # both actors' rows, each with its own tag


def _tags(batches: list[Batch]) -> set[int]:
    return {int(t) for b in batches for t in np.unique(b.data.extra.get("actor_N", []))}


def _train(runner: Any, updates: int = 30) -> list[Batch]:
    """Until ``updates`` and the learner has seen rows of both actors (one of them may
    start later, on another node)."""
    with closing(runner), recording(runner) as seen:
        run_until(runner, lambda r, _: r.updates >= updates and len(_tags(seen)) == 2, 90.0)
    return seen


@pytest.mark.parametrize("backend", ["inline", "processes"])
def test_extra_fields_reach_the_learner(backend: str) -> None:
    cfg = load_config("cartpole-apex", [*SETS, f"runtime.backend='{backend}'"])
    check(_train(make_runner(backend, tagged(cfg))))


@pytest.mark.parametrize("replay_on", ["learner", "actors"])
def test_extra_fields_reach_the_learner_on_ray(replay_on: str, cluster: Any) -> None:
    from qfleet.runtime import RayOptions

    cfg = load_config("cartpole-apex", [*SETS, "runtime.backend='ray'",
                                        f"runtime.replay_on='{replay_on}'"])
    check(_train(make_runner("ray", tagged(cfg), RayOptions(replay_on=replay_on))))


def test_the_fields_are_in_the_spec_and_the_storage() -> None:
    cfg = load_config("cartpole-apex", SETS)
    program = tagged(cfg)
    assert list(program.record)[-2:] == ["actor_N", "obs_sum_N"]
    replay = program.make_replay()
    arrays = replay.state_dict()
    assert any(k.endswith("actor_N") for k in arrays)




@pytest.mark.parametrize("frames", [False, True])
def test_storages_keep_extra_fields_through_add_get_and_checkpoint(frames: bool) -> None:
    from qfleet.replay import FrameStorage, RingStorage, Transitions

    obs_shape, dtype = (4, 3, 3), np.dtype(np.uint8)
    extra = {"tag_N": Field(np.dtype(np.int32)), "vec_N2": Field(np.dtype(np.float32), (2,))}
    make = FrameStorage if frames else RingStorage
    storage = make(16, obs_shape, dtype, extra)
    rng = np.random.default_rng(0)
    n = 10
    chunk = Transitions(rng.integers(0, 255, (n, *obs_shape), dtype=np.uint8),
                        np.arange(n), np.ones(n, np.float32), np.ones(n, np.float32),
                        rng.integers(0, 255, (n, *obs_shape), dtype=np.uint8),
                        {"tag_N": np.arange(n, dtype=np.int32) * 7,
                         "vec_N2": rng.random((n, 2), dtype=np.float32)})
    slots = storage.add(chunk)
    got = storage.get(slots[::-1])
    for name, arr in chunk.extra.items():
        np.testing.assert_array_equal(got.extra[name], arr[::-1])
    copy = make(16, obs_shape, dtype, extra)
    copy.load_state_dict(storage.state_dict())
    np.testing.assert_array_equal(copy.get(slots).extra["vec_N2"], chunk.extra["vec_N2"])
