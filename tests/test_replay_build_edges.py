"""Edges of building replays and of n-step accumulation that mutation testing found
unguarded: which storage ``uses_frames`` picks, what ``make_replay`` passes to storages
and shards (extra fields, obs dtype, beta schedule, per-shard capacity), ``describe``'s
exact line at its unit and rounding boundaries, and the accumulator's float32 arithmetic
and output dtypes on both of its paths (full windows and episode-end flushes)."""

from __future__ import annotations

import numpy as np
import pytest

from qfleet.config import ReplayConfig
from qfleet.replay import (
    Field,
    FrameStorage,
    PrioritizedReplay,
    RingStorage,
    ShardedReplay,
    Transitions,
    UniformReplay,
    describe,
    make_replay,
    uses_frames,
)
from qfleet.replay.nstep import NStepAccumulator
from qfleet.replay.records import RecordSpec

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)


def build(cfg: ReplayConfig, obs_shape: tuple[int, ...] = (4,), dtype: np.dtype = F32,
          anneal_steps: int | None = None, extra: RecordSpec | None = None) -> object:
    return make_replay(cfg, obs_shape, dtype, np.random.default_rng(0), anneal_steps, extra)


def chunk(n: int, obs_shape: tuple[int, ...], dtype: np.dtype,
          extra: dict[str, np.ndarray] | None = None) -> Transitions:
    """n distinct transitions: obs row i is filled with i, next obs with i + 1."""
    fill_N = np.arange(n).reshape(n, *([1] * len(obs_shape)))
    obs_NO = np.broadcast_to(fill_N, (n, *obs_shape)).astype(dtype)
    return Transitions(obs_NO, np.arange(n, dtype=np.int64), np.ones(n, np.float32),
                       np.full(n, 0.5, np.float32), obs_NO + 1, extra or {})


# ---------------------------------------------------------------- uses_frames


def test_auto_storage_picks_frames_only_for_uint8_stacks_of_images() -> None:
    auto = ReplayConfig(storage="auto")
    assert uses_frames(auto, (4, 84, 84), U8)
    # both conditions are needed: a float stack, or a flat uint8 vector, is not frames
    assert not uses_frames(auto, (4, 84, 84), F32)
    assert not uses_frames(auto, (4,), U8)
    assert not uses_frames(auto, (84, 84), U8)


def test_explicit_storage_overrides_auto() -> None:
    # frames where auto would say ring (float stack), ring where auto would say frames
    assert uses_frames(ReplayConfig(storage="frames"), (2, 3, 3), F32)
    assert not uses_frames(ReplayConfig(storage="ring"), (4, 84, 84), U8)
    replay = build(ReplayConfig(kind="uniform", capacity=8, storage="frames"), (2, 3, 3))
    assert isinstance(replay, UniformReplay) and isinstance(replay.storage, FrameStorage)


# ---------------------------------------------------------------- make_replay


def test_frame_storage_gets_the_programs_extra_fields() -> None:
    extra: RecordSpec = {"logp": Field(F32)}
    replay = build(ReplayConfig(kind="uniform", capacity=8), (2, 3, 3), U8, extra=extra)
    assert isinstance(replay, UniformReplay) and isinstance(replay.storage, FrameStorage)
    logp_N = np.array([0.25, -1.5, 3.0], np.float32)
    replay.add(chunk(3, (2, 3, 3), U8, {"logp": logp_N}))
    got = replay.storage.get(np.arange(3))
    np.testing.assert_array_equal(got.extra["logp"], logp_N)


def test_ring_storage_keeps_the_obs_dtype() -> None:
    replay = build(ReplayConfig(kind="uniform", capacity=10, storage="ring"), (4,), U8)
    assert isinstance(replay, UniformReplay) and isinstance(replay.storage, RingStorage)
    assert replay.storage.arrays["obs_NO"].dtype == U8
    assert replay.storage.arrays["next_obs_NO"].dtype == U8
    # per row: obs + next obs 2 * 4 B, action 8, reward 4, discount 4
    assert replay.nbytes == 10 * 24


def test_beta_stays_at_beta0_when_neither_beta_steps_nor_the_run_length_is_known() -> None:
    replay = build(ReplayConfig(kind="prioritized", capacity=16, beta0=0.3))
    assert isinstance(replay, PrioritizedReplay)
    assert replay.schedule.beta_steps == 0
    replay.add(chunk(5, (4,), F32))
    assert replay.beta == pytest.approx(0.3)


@pytest.mark.parametrize(("beta_steps", "anneal_steps"), [(8, None), (0, 8), (8, 1000)])
def test_sharded_replay_anneals_from_its_beta0_over_the_beta_steps(
        beta_steps: int, anneal_steps: int | None) -> None:
    cfg = ReplayConfig(kind="prioritized", capacity=16, shards=2, beta0=0.25,
                       beta_steps=beta_steps)
    replay = build(cfg, anneal_steps=anneal_steps)
    assert isinstance(replay, ShardedReplay)
    assert replay.beta == pytest.approx(0.25)
    replay.add(chunk(4, (4,), F32))
    assert replay.beta == pytest.approx(0.25 + 0.75 * 4 / 8)  # half way over 8 steps
    replay.add(chunk(4, (4,), F32))
    assert replay.beta == pytest.approx(1.0)


@pytest.mark.parametrize(("capacity", "shards", "per_shard"), [(4, 4, 1), (3, 4, 1), (9, 4, 2)])
def test_sharded_capacity_is_split_evenly_with_at_least_one_per_shard(
        capacity: int, shards: int, per_shard: int) -> None:
    cfg = ReplayConfig(kind="prioritized", capacity=capacity, shards=shards)
    replay = build(cfg)
    assert isinstance(replay, ShardedReplay)
    assert [s.capacity for s in replay.shards.values()] == [per_shard] * shards
    assert replay.capacity == per_shard * shards


# ---------------------------------------------------------------- describe

# A ring of capacity 1 with (1,) uint8 obs holds 2 + 8 + 4 + 4 = 18 bytes; an extra uint8
# field of k bytes per row brings nbytes to any total (np.zeros maps it lazily: no RAM).
ROW_BYTES = 18


def ring_of(nbytes: int) -> object:
    extra: RecordSpec = {"pad": Field(U8, (nbytes - ROW_BYTES,))}
    replay = build(ReplayConfig(kind="uniform", capacity=1, storage="ring"), (1,), U8,
                   extra=extra)
    assert isinstance(replay, UniformReplay) and replay.nbytes == nbytes
    return replay


@pytest.mark.parametrize(("nbytes", "size"), [
    (999_999_999, "1000.0 MB"),  # just below the switch: still megabytes
    (1_000_000_000, "1.00 GB"),  # exactly 1 GB is reported in GB
    (1_015_000_001, "1.02 GB"),  # 1.015000001 rounds up (decimal GB, 1e9 bytes)
])
def test_describe_switches_to_decimal_gigabytes_at_1e9_bytes(nbytes: int, size: str) -> None:
    line = describe(ring_of(nbytes))  # type: ignore[arg-type]
    assert line == f"replay: UniformReplay, capacity 1, {size} preallocated"


def test_describe_reports_decimal_megabytes_exactly() -> None:
    # 21,875 rows of (4,) float32: 2 * 16 + 8 + 4 + 4 = 48 B each, 1,050,000 B = 1.05 MB,
    # which rounds up only when divided by exactly 1e6
    replay = build(ReplayConfig(kind="uniform", capacity=21_875))
    line = describe(replay)  # type: ignore[arg-type]
    assert line == "replay: UniformReplay, capacity 21,875, 1.1 MB preallocated"


# ---------------------------------------------------------------- NStepAccumulator


def feed(acc: NStepAccumulator, reward_TE: np.ndarray, done_TE: np.ndarray,
         terminated: bool) -> list[Transitions]:
    """Feed T vector steps with obs [e, t]; ``done_TE`` ends episodes, as terminations or
    truncations. Returns what each step emitted."""
    steps, num_envs = reward_TE.shape
    out = []
    for t in range(steps):
        obs_EO = np.stack([np.arange(num_envs), np.full(num_envs, t)], 1).astype(np.float32)
        no_E = np.zeros(num_envs, bool)
        term_E, trunc_E = (done_TE[t], no_E) if terminated else (no_E, done_TE[t])
        out.append(acc.step(obs_EO, np.zeros(num_envs, np.int64), reward_TE[t], obs_EO + 1,
                            term_E, trunc_E))
    return out


@pytest.mark.parametrize("truncate", [False, True])
def test_rewards_are_rounded_to_float32_on_arrival(truncate: bool) -> None:
    """The reward scratch is float32, so a caller passing float64 rewards gets the n-step
    return of their float32 casts (what the actor passes), on both paths. Here
    r = 1 + 2**-24 + 2**-40 casts up to 1 + 2**-23, and 0.75 * (1 + 2**-23) is a tie that
    rounds to 0.75 + 2**-23; the uncast 0.75 * r would round to 0.75 + 2**-24 instead."""
    r = 1.0 + 2.0**-24 + 2.0**-40
    reward_TE = np.array([[0.0], [r]])
    done_TE = np.array([[False], [truncate]])
    rows: list[Transitions] = []
    for rew_TE in (reward_TE, reward_TE.astype(np.float32)):
        acc = NStepAccumulator(2, 0.75, 1, (2,), F32)
        rows.append(feed(acc, rew_TE, done_TE, terminated=False)[1])
    wide, cast = rows
    # a single nonzero product: one rounding, whatever the BLAS's summation order
    assert cast.reward_N[0] == np.float32(0.75 + 2.0**-23)
    np.testing.assert_array_equal(wide.reward_N, cast.reward_N)


@pytest.mark.parametrize("truncate", [False, True])
def test_discount_powers_are_float32(truncate: bool) -> None:
    """gamma 0.9 is rounded to float32 before it multiplies: float32(0.9) * 3 is
    2.6999998f, not float32(2.7). Both paths: a full window, and a flush at truncation."""
    acc = NStepAccumulator(2, 0.9, 1, (2,), F32)
    reward_TE = np.array([[0.0], [3.0]], np.float32)
    out = feed(acc, reward_TE, np.array([[False], [truncate]]), terminated=False)
    expected = np.float32(np.float32(0.9) * np.float32(3.0))
    assert expected != np.float32(2.7)  # the case tells the two apart
    # the window starting at step 0 is emitted at step 1 on either path
    assert out[1].obs_NO[0].tolist() == [0.0, 0.0]
    assert out[1].reward_N[0] == expected
    assert out[1].discount_N[0] == np.float32(0.81)


@pytest.mark.parametrize("terminated", [True, False])
def test_flushed_transitions_are_float32_like_full_ones(terminated: bool) -> None:
    """An episode end flushes its pending steps; the rows keep the float32 dtypes of the
    transition spec (alone, and concatenated with full windows of other envs)."""
    acc = NStepAccumulator(3, 0.5, 2, (2,), F32)
    reward_TE = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]], np.float32)
    done_TE = np.array([[False, False], [True, False], [False, False]])
    out = feed(acc, reward_TE, done_TE, terminated)
    flushed, mixed = out[1], out[2]
    assert len(flushed) == 2 and len(mixed) == 1
    for tr in (flushed, mixed, Transitions.concat(out)):
        assert tr.reward_N.dtype == np.float32 and tr.discount_N.dtype == np.float32
    np.testing.assert_array_equal(flushed.reward_N, [1.0 + 0.5 * 2.0, 2.0])
    discount_N = [0.0, 0.0] if terminated else [0.25, 0.5]
    np.testing.assert_array_equal(flushed.discount_N, discount_N)
    np.testing.assert_array_equal(mixed.reward_N, [10.0 + 0.5 * 20.0 + 0.25 * 30.0])
