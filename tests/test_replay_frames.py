"""Frame-deduplicated storage returns exactly what a naive obs + next_obs store returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qfleet.replay import (
    FrameStorage,
    NStepAccumulator,
    PrioritizedReplay,
    RingStorage,
    Transitions,
    UniformReplay,
)
from qfleet.replay.frames import storage_nbytes

F, SHAPE = 4, (6, 5)
U8 = np.dtype(np.uint8)


class StackedEnvs:
    """E fake envs emitting stacks of F frames the way FrameStackObservation does: a reset
    fills the stack with the first frame. Some frames are blank (equal across episodes)."""

    def __init__(self, num_envs: int, rng: np.random.Generator, p_end: float,
                 p_blank: float = 0.1) -> None:
        self.e, self.rng, self.p_end, self.p_blank = num_envs, rng, p_end, p_blank
        self.obs_EO = np.stack([self._reset() for _ in range(num_envs)])
        self.episodes = 0

    def _frame(self) -> np.ndarray:
        if self.rng.random() < self.p_blank:
            return np.zeros(SHAPE, np.uint8)
        return self.rng.integers(0, 256, SHAPE, dtype=np.uint8)

    def _reset(self) -> np.ndarray:
        return np.repeat(self._frame()[None], F, axis=0)

    def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        obs_EO = self.obs_EO.copy()
        next_EO = np.concatenate([obs_EO[:, 1:], np.stack([self._frame() for _ in range(self.e)])
                                  [:, None]], axis=1)
        done_E = self.rng.random(self.e) < self.p_end
        term_E = done_E & (self.rng.random(self.e) < 0.5)
        for e in np.flatnonzero(done_E):
            self.obs_EO[e] = self._reset()
            self.episodes += 1
        self.obs_EO[~done_E] = next_EO[~done_E]
        return obs_EO, next_EO, term_E, done_E & ~term_E, done_E


def stream(steps: int, num_envs: int = 3, n_step: int = 3, p_end: float = 0.05, seed: int = 0,
           chunk_steps: int = 7) -> tuple[list[Transitions], StackedEnvs]:
    rng = np.random.default_rng(seed)
    envs = StackedEnvs(num_envs, rng, p_end)
    acc = NStepAccumulator(n_step, 0.9, num_envs, (F, *SHAPE), U8)
    chunks, parts = [], []
    for t in range(steps):
        obs_EO, next_EO, term_E, trunc_E, _ = envs.step()
        parts.append(acc.step(obs_EO, rng.integers(0, 4, num_envs), rng.random(num_envs)
                              .astype(np.float32), next_EO, term_E, trunc_E))
        if (t + 1) % chunk_steps == 0:
            chunks.append(Transitions.concat(parts))
            parts = []
    return chunks, envs


def assert_same(frames: FrameStorage, naive: RingStorage, slots_B: np.ndarray) -> None:
    got, want = frames.get(slots_B), naive.get(slots_B)
    for name in ("obs_NO", "action_N", "reward_N", "discount_N", "next_obs_NO"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert getattr(got, name).dtype == getattr(want, name).dtype, name


def valid_slots(frames: FrameStorage) -> np.ndarray:
    return np.arange(frames.head, frames.tail) % frames.capacity


@pytest.mark.parametrize("num_envs,n_step,p_end", [(1, 1, 0.05), (3, 3, 0.05), (4, 5, 0.3)])
def test_matches_naive_store_across_episode_ends_and_ring_wrap(num_envs: int, n_step: int,
                                                               p_end: float) -> None:
    # spare = capacity: room for 2 frames per transition, so nothing is dropped early
    frames = FrameStorage(50, (F, *SHAPE), U8, window=256, spare=50)
    naive = RingStorage(50, (F, *SHAPE), U8)
    chunks, envs = stream(300, num_envs, n_step, p_end)
    for chunk in chunks:
        np.testing.assert_array_equal(frames.add(chunk), naive.add(chunk))
        assert frames.size == naive.size
        assert_same(frames, naive, valid_slots(frames))
    assert frames.tail > 4 * frames.capacity  # the ring wrapped several times
    # each frame stored about once: one per env step, one per episode start, and the
    # stacks' first frames; a naive store would hold 2F frames per transition
    assert frames.frames_written <= 300 * num_envs + envs.episodes + num_envs * F


def test_frames_run_out_early_drop_exactly_the_oldest() -> None:
    # window and spare tiny, episodes of one or two steps: frames run out before slots do
    frames = FrameStorage(40, (F, *SHAPE), U8, window=8, spare=0)
    naive = RingStorage(40, (F, *SHAPE), U8)
    replay = PrioritizedReplay(frames, np.random.default_rng(0))
    chunks, _ = stream(200, num_envs=3, n_step=2, p_end=0.6)
    dropped_any = False
    for chunk in chunks:
        replay.add(chunk)
        naive.add(chunk)
        assert_same(frames, naive, valid_slots(frames))
        live = np.zeros(40, bool)
        live[valid_slots(frames)] = True
        assert (replay.tree.priorities_N[~live] == 0).all()  # dropped slots cannot be drawn
        assert (replay.tree.priorities_N[live] > 0).all()
        dropped_any |= frames.size < naive.size
        batch = replay.sample(32)
        assert live[batch.indices_B % 40].all()
    assert dropped_any


def test_fingerprint_collisions_cannot_corrupt_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    frames = FrameStorage(30, (F, *SHAPE), U8, window=64)
    naive = RingStorage(30, (F, *SHAPE), U8)
    monkeypatch.setattr(frames, "_fingerprint",
                        lambda rows: np.zeros(len(rows), dtype=np.uint64))  # all collide
    for chunk in stream(60, num_envs=2, n_step=2)[0]:
        frames.add(chunk)
        naive.add(chunk)
        assert_same(frames, naive, valid_slots(frames))


def test_uniform_replay_over_frames_samples_only_valid_transitions() -> None:
    frames = FrameStorage(20, (F, *SHAPE), U8, window=4, spare=0)
    naive = RingStorage(20, (F, *SHAPE), U8)
    replay = UniformReplay(frames, np.random.default_rng(1))
    for chunk in stream(80, num_envs=2, n_step=1, p_end=0.7)[0]:
        replay.add(chunk)
        naive.add(chunk)
    batch = replay.sample(200)
    live = np.zeros(20, bool)
    live[valid_slots(frames)] = True
    assert live[batch.indices_B].all()
    assert_same(frames, naive, batch.indices_B)


def test_checkpoint_round_trip_then_keeps_going(tmp_path: Path) -> None:
    chunks, _ = stream(150, num_envs=2, n_step=3)
    frames = FrameStorage(40, (F, *SHAPE), U8, window=64)
    naive = RingStorage(40, (F, *SHAPE), U8)
    for chunk in chunks[:10]:
        frames.add(chunk)
        naive.add(chunk)
    path = str(tmp_path / "f.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in frames.state_dict().items()}, path)
    restored = FrameStorage(40, (F, *SHAPE), U8, window=64)
    restored.load_state_dict(load_file(path))
    assert_same(restored, naive, valid_slots(frames))
    for chunk in chunks[10:]:
        restored.add(chunk)
        naive.add(chunk)
        assert_same(restored, naive, valid_slots(restored))


def test_memory_is_preallocated_and_atari_sized_fits() -> None:
    small = FrameStorage(1000, (4, 84, 84), U8)
    assert small.nbytes == storage_nbytes(1000, (4, 84, 84), U8)
    atari = storage_nbytes(1_000_000, (4, 84, 84), U8)
    naive = RingStorage(1, (4, 84, 84), U8).nbytes // 1 * 1_000_000
    assert atari <= 7.5e9, atari
    assert naive > 56e9 and atari < naive / 7


def test_real_atari_stacks_from_the_actor_round_trip_exactly() -> None:
    pytest.importorskip("ale_py")
    from qfleet.config import EnvConfig, NetConfig
    from qfleet.nets import make_q_network
    from qfleet.roles import Actor

    # short episodes (a time limit of 30 agent steps) so truncations, resets and n-step
    # flushes all happen; two envs interleave their streams in every chunk
    env = EnvConfig(id="ALE/Pong-v5", num_envs=2, max_episode_steps=30)
    actor = Actor(env, make_q_network(NetConfig(), (4, 84, 84), 6), n_step=3, gamma=0.99,
                  epsilon=lambda _: 1.0, seed=0, index=0)
    frames = FrameStorage(150, (4, 84, 84), U8, window=512)
    naive = RingStorage(150, (4, 84, 84), U8)
    transitions, episodes = 0, 0
    try:
        for _ in range(8):
            chunk = actor.collect(25)
            frames.add(chunk.transitions)
            naive.add(chunk.transitions)
            transitions += len(chunk.transitions)
            episodes += len(chunk.episode_lengths)
            assert frames.size == naive.size
            assert_same(frames, naive, valid_slots(frames))
    finally:
        actor.close()
    assert episodes >= 8 and transitions > frames.capacity  # boundaries crossed, ring wrapped
    assert frames.frames_written <= transitions + 2 * episodes + 2 * 4


def test_fresh_storage_is_empty_and_takes_any_stack_of_frames() -> None:
    frames = FrameStorage(50, (F, 3), U8, window=8)  # stacks of 1-D frames are stacks too
    assert frames.size == 0 and frames.frames_written == 0
    assert len(frames.pop_dropped()) == 0
    chunks, _ = stream(5, num_envs=1, n_step=1, chunk_steps=5)
    stored = FrameStorage(50, (F, *SHAPE), U8, window=8)
    assert stored.add(chunks[0]).tolist() == [0, 1, 2, 3, 4] and stored.size == 5
    assert len(stored.pop_dropped()) == 0
    with pytest.raises(ValueError, match=r"obs_shape \(4,\) is not a stack of frames"):
        FrameStorage(50, (F,), U8)


@pytest.mark.parametrize("capacity, spare", [(64, None), (6400, None), (64, 50)])
def test_preallocated_frames_and_bytes_follow_the_documented_sizes(capacity: int,
                                                                   spare: int | None) -> None:
    """capacity + window + spare frames, spare = max(capacity // 32 (or as given), 2F); and
    storage_nbytes says what the storage allocates, for any dtype."""
    f32 = np.dtype(np.float32)
    frames = FrameStorage(capacity, (F, *SHAPE), f32, window=16, spare=spare)
    expect_spare = max(capacity // 32 if spare is None else spare, 2 * F)
    assert frames.frame_capacity == capacity + 16 + expect_spare
    assert frames.nbytes == storage_nbytes(capacity, (F, *SHAPE), f32, window=16, spare=spare)
    assert frames.frames_M.dtype == f32 and frames.frames_M.shape[1:] == SHAPE
