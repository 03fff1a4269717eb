"""FrameStorage's edges, checked against hand-counted frames and a naive ring: how far back
deduplication looks (exactly ``window`` frames, the newest and frame 0 included), the exact
eviction boundary and what pop_dropped reports, chunks longer than the ring, empty chunks,
checkpoints (dtypes, pinned fingerprints, dedup across a restore), uniform slots, dtypes
beyond float64's precision, and fingerprint collisions (a hint only, the bytes decide)."""

from __future__ import annotations

import numpy as np
import pytest

from qfleet.replay import FrameStorage, RingStorage, Transitions

U8 = np.dtype(np.uint8)
FRAME = (3,)  # tiny 1-D frames: the counts below are done by hand


def frame(k: int) -> np.ndarray:
    """Frame number k of a test stream: distinct for k < 65536, never all zeros."""
    return np.array([k % 256, k // 256, 7], dtype=U8)


def chunk(obs_NO: np.ndarray, next_NO: np.ndarray) -> Transitions:
    n = len(obs_NO)
    return Transitions(obs_NO=obs_NO, action_N=np.arange(n, dtype=np.int64) % 5,
                       reward_N=np.linspace(-1, 1, n, dtype=np.float32),
                       discount_N=np.full(n, 0.9, np.float32), next_obs_NO=next_NO)


def one(obs: list[int], nxt: list[int]) -> Transitions:
    """One transition whose stacks are the frames numbered obs and nxt."""
    return chunk(np.stack([frame(k) for k in obs])[None], np.stack([frame(k) for k in nxt])[None])


def assert_stacks(frames: FrameStorage, naive: RingStorage) -> None:
    """Every valid transition reads back exactly as the naive ring stored it."""
    slots_B = np.arange(frames.head, frames.tail) % frames.capacity
    got, want = frames.get(slots_B), naive.get(slots_B)
    for name in ("obs_NO", "action_N", "reward_N", "discount_N", "next_obs_NO"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def random_stream(rng: np.random.Generator, steps: int, f: int,
                  alphabet: int) -> list[Transitions]:
    """Single-env frame stacks over a small alphabet (many equal frames), ends every ~5."""
    parts, stack = [], [int(rng.integers(alphabet))] * f
    for _ in range(steps):
        nxt = [*stack[1:], int(rng.integers(alphabet))]
        parts.append(one(stack, nxt))
        stack = [nxt[-1]] * f if rng.random() < 0.2 else nxt
    return parts


# ------------------------------------------------------------ dedup window


def test_an_episode_writes_one_frame_per_step_reusing_the_newest_and_frame_zero() -> None:
    frames = FrameStorage(16, (2, *FRAME), U8, window=64)
    # reset stack (0, 0) -> (0, 1): frame 0 once, then frame 1
    frames.add(one([0, 0], [0, 1]))
    assert frames.frames_written == 2
    # (0, 1) -> (1, 2): frame 0 is ring frame number 0, frame 1 the newest ring frame
    frames.add(one([0, 1], [1, 2]))
    assert frames.frames_written == 3
    frames.add(one([1, 2], [2, 3]))
    assert frames.frames_written == 4
    got = frames.get(np.arange(3))
    np.testing.assert_array_equal(got.obs_NO[:, :, 0], [[0, 0], [0, 1], [1, 2]])
    np.testing.assert_array_equal(got.next_obs_NO[:, :, 0], [[0, 1], [1, 2], [2, 3]])


@pytest.mark.parametrize("window", [1, 4, 7])
def test_dedup_looks_back_exactly_window_frames(window: int) -> None:
    # F = 1 and obs == next_obs: each add of a new frame writes exactly one frame, so
    # ring frame number k holds frame(k)
    frames = FrameStorage(64, (1, *FRAME), U8, window=window)
    for k in range(20):
        frames.add(one([k], [k]))
    assert frames.frames_written == 20
    frames.add(one([20 - window], [20 - window]))  # exactly `window` frames back: reused
    assert frames.frames_written == 20
    frames.add(one([19 - window], [19 - window]))  # window + 1 back: written again
    assert frames.frames_written == 21
    np.testing.assert_array_equal(frames.get(np.array([20, 21])).obs_NO[:, 0, 0],
                                  [20 - window, 19 - window])


def test_a_fresh_storage_writes_its_first_frames_even_all_zero_ones() -> None:
    # an all-zero frame fingerprints to 0, like the unwritten fp_M entries: only frames
    # actually written may be reused
    frames = FrameStorage(8, (2, *FRAME), U8, window=4)
    zero_O = np.zeros((1, 2, *FRAME), U8)
    frames.add(chunk(zero_O, zero_O))
    assert frames.frames_written == 1
    assert frames.state_dict()["frames.floor_N"].tolist() == [0]


# ------------------------------------------------------------ eviction


def test_eviction_drops_exactly_the_transitions_whose_oldest_frame_was_recycled() -> None:
    # F = 2, all frames distinct: transition k owns frames 4k..4k+3 (floor 4k). The frame
    # ring holds 10 + 2 + max(0, 2F) = 16 frames, so after adding k the oldest live frame
    # is 4k - 12: transitions k-3..k are valid, k-3's oldest frame is the oldest one alive.
    frames = FrameStorage(10, (2, *FRAME), U8, window=2, spare=0)
    naive = RingStorage(10, (2, *FRAME), U8)
    assert frames.frame_capacity == 16
    for k in range(25):
        t = one([4 * k, 4 * k + 1], [4 * k + 2, 4 * k + 3])
        frames.add(t)
        naive.add(t)
        assert (frames.head, frames.tail, frames.size) == (max(0, k - 3), k + 1, min(k + 1, 4))
        want_dropped = [(k - 4) % 10] if k >= 4 else []  # one transition dropped per add
        assert frames.pop_dropped().tolist() == want_dropped
        assert_stacks(frames, naive)


def test_pop_dropped_called_late_reports_only_drops_not_yet_overwritten() -> None:
    # the stream of the test above, popped once at the end: after 25 adds head = 21 and
    # numbers below 25 - 10 were overwritten, so numbers 15..20 were dropped early
    frames = FrameStorage(10, (2, *FRAME), U8, window=2, spare=0)
    for k in range(25):
        frames.add(one([4 * k, 4 * k + 1], [4 * k + 2, 4 * k + 3]))
    assert frames.pop_dropped().tolist() == [5, 6, 7, 8, 9, 0]
    assert frames.pop_dropped().tolist() == []


# ------------------------------------------------------------ add: chunk sizes


def test_a_chunk_longer_than_the_ring_keeps_its_newest_rows_in_the_naive_slots() -> None:
    rng = np.random.default_rng(1)
    frames = FrameStorage(10, (2, *FRAME), U8, window=16)
    naive = RingStorage(10, (2, *FRAME), U8)
    first, big = (Transitions.concat(random_stream(rng, n, 2, alphabet=50)) for n in (7, 23))
    for c in (first, big):
        np.testing.assert_array_equal(frames.add(c), naive.add(c))
    assert (frames.tail, frames.size) == (30, 10)
    assert_stacks(frames, naive)


def test_an_empty_chunk_writes_nothing_and_returns_usable_int_slots() -> None:
    frames = FrameStorage(10, (2, *FRAME), U8, window=8)
    frames.add(one([0, 0], [0, 1]))
    empty = chunk(np.zeros((0, 2, *FRAME), U8), np.zeros((0, 2, *FRAME), U8))
    slots = frames.add(empty)
    assert slots.shape == (0,) and slots.dtype == np.int64
    assert len(frames.get(slots)) == 0  # float slots could not index
    assert (frames.size, frames.tail, frames.frames_written) == (1, 1, 2)


# ------------------------------------------------------------ reading


def test_uniform_slots_draw_every_valid_slot_and_nothing_else() -> None:
    frames = FrameStorage(10, (2, *FRAME), U8, window=2, spare=0)
    for k in range(13):  # wrapped, head = 9 after early drops (see the eviction test)
        frames.add(one([4 * k, 4 * k + 1], [4 * k + 2, 4 * k + 3]))
    assert (frames.head, frames.size) == (9, 4)
    slots = frames.uniform_slots(np.random.default_rng(0), 300)
    assert slots.shape == (300,)
    assert sorted(set(slots.tolist())) == [0, 1, 2, 9]
    single = FrameStorage(10, (2, *FRAME), U8, window=8)
    single.add(one([0, 0], [0, 1]))
    assert single.uniform_slots(np.random.default_rng(0), 4).tolist() == [0, 0, 0, 0]


def test_int64_frames_beyond_float64_precision_round_trip_exactly() -> None:
    big = 2**53  # big + 1 is not a float64
    i64 = np.dtype(np.int64)
    frames = FrameStorage(8, (2, 2), i64, window=8)
    obs_NO = np.array([[[big, big + 1], [big + 1, big + 3]]], dtype=np.int64)
    next_NO = np.array([[[big + 1, big + 3], [big + 5, -big - 1]]], dtype=np.int64)
    frames.add(chunk(obs_NO, next_NO))
    got = frames.get(np.array([0]))
    np.testing.assert_array_equal(got.obs_NO, obs_NO)
    np.testing.assert_array_equal(got.next_obs_NO, next_NO)
    assert frames.frames_written == 3


# ------------------------------------------------------------ fingerprints


def test_fingerprints_are_pinned_as_checkpoints_store_them() -> None:
    # fp_M is saved in checkpoints: a buffer restored from an older run must fingerprint new
    # frames the same way, or it stops deduplicating against what it restored. Pinned for
    # small frames and for Atari frames (882 words: every multiplier drawn counts).
    small = FrameStorage(8, (2, 6, 5), U8, window=8)
    small_O = np.stack([np.arange(30), 255 - np.arange(30)]).astype(U8).reshape(1, 2, 6, 5)
    small.add(chunk(small_O, small_O))
    atari = FrameStorage(8, (2, 84, 84), U8, window=8)
    atari_O = np.stack([np.arange(84 * 84) % 251, 255 - np.arange(84 * 84) % 256]).astype(U8)
    atari.add(chunk(atari_O.reshape(1, 2, 84, 84), atari_O.reshape(1, 2, 84, 84)))
    fp_small, fp_atari = (s.state_dict()["frames.fp_M"] for s in (small, atari))
    assert fp_small.dtype == fp_atari.dtype == np.uint64
    assert fp_small.tolist() == [0x0F4B6971323E1720, 0xD7B2057A41B66664]
    assert fp_atari.tolist() == [0x5F79FC0A8F167025, 0xD4DA5B695AE50CC6]


def test_any_single_bit_change_changes_the_fingerprint() -> None:
    # odd multipliers: a word changed by +-2**b changes the hash by +-2**b * m != 0 mod 2**64
    # (two different changes may still collide, e.g. top bits of two words: the bytes decide)
    frames = FrameStorage(8, (2, 6, 5), U8, window=8)
    base_D = np.random.default_rng(5).integers(0, 256, 30, dtype=np.uint8)
    flips_XD = np.repeat(base_D[None], 30 * 8, axis=0)
    bit_X = np.arange(30 * 8)
    flips_XD[bit_X, bit_X // 8] ^= (1 << (bit_X % 8)).astype(U8)
    base_fp = frames._fingerprint(base_D[None])[0]
    assert (frames._fingerprint(flips_XD) != base_fp).all()


def test_low_entropy_frames_get_distinct_fingerprints() -> None:
    # all 2**16 frames whose two 8-byte words each hold one small byte: a weak (small
    # multiplier) hash must collide here by pigeonhole, a 64-bit one essentially never
    frames = FrameStorage(8, (2, 16), U8, window=8)
    rows_XD = np.zeros((2**16, 16), U8)
    rows_XD[:, 0], rows_XD[:, 8] = np.arange(2**16) % 256, np.arange(2**16) // 256
    assert len(np.unique(frames._fingerprint(rows_XD))) == 2**16


@pytest.mark.parametrize("weak", ["zero", "first_byte"])
def test_fingerprint_collisions_never_return_a_wrong_frame(
        weak: str, monkeypatch: pytest.MonkeyPatch) -> None:
    frames = FrameStorage(40, (3, *FRAME), U8, window=16)
    naive = RingStorage(40, (3, *FRAME), U8)

    def fingerprint(rows_XD: np.ndarray) -> np.ndarray:
        if weak == "zero":
            return np.zeros(len(rows_XD), np.uint64)
        return rows_XD[:, 0].astype(np.uint64)  # frame(k) and frame(k + 256) collide

    monkeypatch.setattr(frames, "_fingerprint", fingerprint)
    parts = random_stream(np.random.default_rng(2), 120, 3, alphabet=600)
    for lo in range(0, 120, 9):  # several transitions per add: in-piece links too
        c = Transitions.concat(parts[lo:lo + 9])
        frames.add(c)
        naive.add(c)
        assert_stacks(frames, naive)
    # a stack of the newest ring frame is still shared: the newest is checked first
    written = frames.frames_written
    newest_O = np.repeat(frames.frames_M[(written - 1) % frames.frame_capacity][None, None],
                         3, axis=1)
    frames.add(chunk(newest_O, newest_O))
    assert frames.frames_written == written


# ------------------------------------------------------------ checkpoints


def test_checkpoint_keeps_dtypes_size_and_deduplicates_after_restore() -> None:
    frames = FrameStorage(10, (2, *FRAME), U8, window=8)
    for k in range(14):  # one episode: frame k+1 new each step; the ring wrapped
        frames.add(one([k, k + 1], [k + 1, k + 2]))
    state = frames.state_dict()
    want = {"frames.fp_M": np.uint64, "frames.floor_N": np.int64, "frames.obs_ref_NF": np.int32,
            "frames.next_ref_NF": np.int32, "frames.meta": np.int64, "frames.frames_M": np.uint8}
    assert {k: state[k].dtype for k in want} == {k: np.dtype(v) for k, v in want.items()}
    restored = FrameStorage(10, (2, *FRAME), U8, window=8)
    restored.load_state_dict(state)
    assert (restored.head, restored.tail, restored.size) == (4, 14, 10)
    np.testing.assert_array_equal(restored.uniform_slots(np.random.default_rng(0), 200),
                                  frames.uniform_slots(np.random.default_rng(0), 200))
    # the episode goes on: frames 14 and 15 are restored ring frames, only 16 is new
    restored.add(one([14, 15], [15, 16]))
    assert restored.frames_written == frames.frames_written + 1
    np.testing.assert_array_equal(restored.get(np.array([4])).obs_NO[0, :, 0], [14, 15])
