"""Frames sent once: the frame stacks of a chunk (``obs_NO`` and ``next_obs_NO``, each row
(F, H, W) uint8) travel as one table of the chunk's distinct frames plus (F,) int32
references per row. Consecutive stacks of an episode share F - 1 frames and a row's
next_obs is a later row's obs, so T steps of one env hold about T + F - 1 distinct frames
instead of 2 T F: an Atari transition crosses a transport as about 1 + 3 / T frames, not 8.

Lossless: frames are matched by a 64-bit fingerprint and then compared byte for byte; on a
collision (never seen) the chunk's frames go unshared. Transports call ``encode`` before
they move a chunk and ``decode`` after (ChunkSlots; pickling, which Ray and queues use);
the replay's FrameStorage then keeps each frame once, whatever the chunk looked like.
"""

from __future__ import annotations

import functools

import numpy as np

from qfleet.replay.records import Field, RecordSpec

try:  # the compiled passes (the fast extra); the NumPy forms below are the reference
    from qfleet.replay import frame_kernels
except ImportError:
    frame_kernels = None  # type: ignore[assignment]

STACKS = ("obs_NO", "next_obs_NO")


def is_stacked(row_shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """A row of (F, H, W) uint8: a stack of frames (Atari; MinAtar's channels too)."""
    return len(row_shape) == 3 and np.dtype(dtype) == np.uint8


def coded(record: RecordSpec) -> bool:
    obs = record[STACKS[0]]
    return is_stacked(obs.shape, obs.dtype)


def wire_spec(record: RecordSpec) -> dict[str, Field]:
    """The per-row fields as they travel: each stack replaced by its (F,) references."""
    stack = record[STACKS[0]].shape[0]
    return {name: Field(np.dtype(np.int32), (stack,)) if name in STACKS else f
            for name, f in record.items()}


def max_frames(record: RecordSpec, rows: int) -> int:
    """Distinct frames ``rows`` rows can hold at most (no two frames equal)."""
    return len(STACKS) * rows * record[STACKS[0]].shape[0]


@functools.lru_cache(maxsize=8)
def _multipliers(words: int) -> np.ndarray:
    # Fixed seed: the fingerprints a restored FrameStorage holds must match new ones.
    return np.random.default_rng(0x5EED).integers(1, 2**63, size=words,
                                                   dtype=np.uint64) | np.uint64(1)


def _words(frames_X: np.ndarray) -> np.ndarray:
    """Each frame's bytes as uint64 words, zero-padded to a whole word: (X, W)."""
    count = len(frames_X)
    raw_XB = np.ascontiguousarray(frames_X).reshape(count, -1 if count else 0).view(np.uint8)
    pad = -raw_XB.shape[1] % 8
    if pad:
        raw_XB = np.pad(raw_XB, ((0, 0), (0, pad)))
    return raw_XB.view(np.uint64)


def fingerprints(frames_X: np.ndarray) -> np.ndarray:
    """A 64-bit fingerprint of each frame's bytes (any shape and dtype per frame)."""
    words_XW = _words(frames_X)
    mult_W = _multipliers(words_XW.shape[1])
    if frame_kernels is not None and len(words_XW):
        return frame_kernels.fingerprints(words_XW, mult_W)
    # uint64 arithmetic wraps: a random linear hash mod 2**64 in one matmul.
    return words_XW @ mult_W


def _all_equal(all_X: np.ndarray, first_K: np.ndarray, ref_X: np.ndarray) -> bool:
    """Whether every frame equals its fingerprint's first frame, byte for byte."""
    if frame_kernels is not None:
        return bool(frame_kernels.equal_to_representatives(_words(all_X), first_K[ref_X]))
    return bool(np.array_equal(all_X[first_K][ref_X], all_X))


def encode(fields: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A record's fields by name -> (the same with (N, F) int32 references in place of the
    stacks, the distinct frames (K, H, W))."""
    obs_NO, next_NO = (fields[name] for name in STACKS)
    n, stack = obs_NO.shape[:2]
    all_XHW = np.concatenate([obs_NO.reshape(n * stack, *obs_NO.shape[2:]),
                              next_NO.reshape(n * stack, *obs_NO.shape[2:])])
    _, first_K, ref_X = np.unique(fingerprints(all_XHW), return_index=True,
                                  return_inverse=True)
    if _all_equal(all_XHW, first_K, ref_X):
        frames_KHW = all_XHW[first_K]
    else:  # a fingerprint collision
        frames_KHW, ref_X = all_XHW, np.arange(len(all_XHW))
    ref_2NF = ref_X.astype(np.int32).reshape(2, n, stack)
    return fields | dict(zip(STACKS, ref_2NF, strict=True)), frames_KHW


def decode(fields: dict[str, np.ndarray], frames_KHW: np.ndarray) -> dict[str, np.ndarray]:
    """The stacks again, gathered from ``frames_KHW`` (fresh arrays)."""
    return fields | {name: frames_KHW[fields[name]] for name in STACKS}
