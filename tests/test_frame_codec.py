"""Frames sent once (replay.frame_codec): a chunk's frame stacks cross every transport as
one table of distinct frames plus references, and arrive exactly as the actor sent them."""

from __future__ import annotations

import pickle
from multiprocessing import get_context

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qfleet.config import load_config
from qfleet.replay import Transitions, frame_codec, transition_spec
from qfleet.runtime.shm import ChunkSlots

FRAME_BYTES = 84 * 84


def _equal(a: Transitions, b: Transitions) -> bool:
    fa, fb = a.fields(), b.fields()
    return fa.keys() == fb.keys() and all(
        fa[k].dtype == fb[k].dtype and np.array_equal(fa[k], fb[k]) for k in fa)


def _stacks(draw_frames: np.ndarray, rows: int, stack: int, rng: np.random.Generator) -> \
        Transitions:
    """Rows whose stacks pick frames from a small pool: many repeats, as in a real chunk."""
    pick = rng.integers(len(draw_frames), size=(2, rows, stack))
    return Transitions(draw_frames[pick[0]], rng.integers(6, size=rows),
                       rng.random(rows, dtype=np.float32), rng.random(rows, dtype=np.float32),
                       draw_frames[pick[1]], {"discount2_N": rng.random(rows).astype(np.float32)})


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 40), stack=st.integers(1, 5), pool=st.integers(1, 30),
       side=st.integers(1, 9), seed=st.integers(0, 2**32 - 1))
def test_decode_gives_back_exactly_what_was_encoded(rows: int, stack: int, pool: int,
                                                    side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 3, size=(pool, side, side + 1), dtype=np.uint8)  # repeats likely
    data = _stacks(frames, rows, stack, rng)
    coded, table = frame_codec.encode(data.fields())
    assert coded["obs_NO"].shape == (rows, stack) and coded["obs_NO"].dtype == np.int32
    assert len(table) == len({f.tobytes() for f in np.concatenate(
        [data.obs_NO.reshape(-1, side, side + 1), data.next_obs_NO.reshape(-1, side, side + 1)])})
    assert _equal(Transitions.from_fields(frame_codec.decode(coded, table)), data)


@pytest.fixture(params=["compiled", "numpy"])
def passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The codec's fingerprint and byte-check passes: compiled (frame_kernels), or the
    NumPy reference an install without numba runs."""
    if request.param == "numpy":
        monkeypatch.setattr(frame_codec, "frame_kernels", None)
    else:
        pytest.importorskip("numba")
    return str(request.param)


@pytest.mark.parametrize("shape", [(84, 84), (5, 7), (3, 8), (1,)])
def test_the_compiled_fingerprints_are_the_numpy_ones(shape: tuple[int, ...]) -> None:
    """Equal numbers, not just equally good ones: a restored FrameStorage's fingerprints
    must match those of frames written after it."""
    kernels = pytest.importorskip("qfleet.replay.frame_kernels")
    frames = np.random.default_rng(1).integers(0, 256, size=(33, *shape), dtype=np.uint8)
    words_XW = frame_codec._words(frames)
    want_X = words_XW @ frame_codec._multipliers(words_XW.shape[1])
    assert np.array_equal(frame_codec.fingerprints(frames), want_X)
    assert np.array_equal(kernels.fingerprints(words_XW, frame_codec._multipliers(
        words_XW.shape[1])), want_X)


def test_one_byte_apart_is_caught_by_the_byte_check(passes: str) -> None:
    frames = np.random.default_rng(2).integers(0, 256, size=(6, 84, 84), dtype=np.uint8)
    frames[4] = frames[1]
    first_K, ref_X = np.array([0, 1, 2, 3, 5]), np.array([0, 1, 2, 3, 1, 4])
    assert frame_codec._all_equal(frames, first_K, ref_X)
    frames[4, 83, 83] ^= 1  # the last byte: a check that stops early misses it
    assert not frame_codec._all_equal(frames, first_K, ref_X)


def test_a_fingerprint_collision_sends_the_frames_unshared(
        monkeypatch: pytest.MonkeyPatch, passes: str) -> None:
    rng = np.random.default_rng(0)
    data = _stacks(rng.integers(0, 255, size=(5, 4, 4), dtype=np.uint8), 6, 3, rng)
    monkeypatch.setattr(frame_codec, "fingerprints",
                        lambda frames: np.zeros(len(frames), dtype=np.uint64))
    coded, table = frame_codec.encode(data.fields())
    assert len(table) == 2 * 6 * 3
    assert _equal(Transitions.from_fields(frame_codec.decode(coded, table)), data)


@pytest.fixture(scope="module")
def pong_chunk() -> Transitions:
    """A chunk as pong-apex's actor sends it: 16 steps of 8 envs, 3-step windows."""
    pytest.importorskip("ale_py")
    from qfleet.algos import ActorLearnerProgram, build_program

    program = build_program(load_config("pong-apex", ["env.noop_max=0"]))
    assert isinstance(program, ActorLearnerProgram)
    actor = program.make_actor(0, 0)
    try:
        actor.collect(program.schedule.chunk_steps)  # past the first, shorter chunk
        return actor.collect(program.schedule.chunk_steps).transitions
    finally:
        actor.close()


def test_an_atari_transition_crosses_as_about_one_frame(pong_chunk: Transitions) -> None:
    coded, table = frame_codec.encode(pong_chunk.fields())
    sent = table.nbytes + sum(a.nbytes for a in coded.values())
    assert sent / len(pong_chunk) <= 1.25 * FRAME_BYTES
    assert _equal(Transitions.from_fields(frame_codec.decode(coded, table)), pong_chunk)


def test_pickling_sends_frames_once(pong_chunk: Transitions) -> None:
    """What Ray's object store and multiprocessing queues move."""
    raw = pickle.dumps(pong_chunk, protocol=5)
    assert len(raw) / len(pong_chunk) <= 1.25 * FRAME_BYTES
    assert _equal(pickle.loads(raw), pong_chunk)


def test_pickling_leaves_other_records_alone() -> None:
    rng = np.random.default_rng(1)
    flat = Transitions(rng.random((4, 3), dtype=np.float32), np.arange(4), np.ones(4, np.float32),
                       np.ones(4, np.float32), rng.random((4, 3), dtype=np.float32))
    assert pickle.loads(pickle.dumps(flat)).__dict__.keys() == flat.__dict__.keys()
    assert _equal(pickle.loads(pickle.dumps(flat)), flat)


def test_chunk_slots_carry_frames_once(pong_chunk: Transitions) -> None:
    record = transition_spec(pong_chunk.obs_NO.shape[1:], pong_chunk.obs_NO.dtype)
    slots = ChunkSlots(2, len(pong_chunk), record, get_context("fork"))
    try:
        assert slots.coded and slots.arrays["obs_NO"].dtype == np.int32
        prio = np.arange(len(pong_chunk), dtype=np.float32)
        rows = slots.write(1, pong_chunk, prio)
        assert int(slots.arrays["frame_count"][1]) <= 1.25 * len(pong_chunk)
        data, got_prio = slots.read(1, rows, with_priorities=True)
        assert _equal(data, pong_chunk) and np.array_equal(got_prio, prio)
    finally:
        slots.close()
