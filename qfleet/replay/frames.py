"""Frame-deduplicated storage for stacked image observations (Atari: 4x84x84 uint8).

Actors send full stacks: a transition's ``obs`` and ``next_obs`` are each F frames, and
consecutive stacks of one episode share F-1 frames, so a naive store keeps every frame
about 2F times (1M Atari transitions: ~56 GB). Here each distinct frame is stored once in
a ring of frames, and a transition keeps 2F small references into that ring.

Frames are matched by content, not by bookkeeping: a new frame reuses a stored one when
its 64-bit fingerprint matches a frame written within the last ``window`` frames *and*
the bytes are equal (the check makes a fingerprint collision harmless). So a sample
returns exactly the stacks the actor sent, whatever the env count, n-step length or
episode boundaries; a stack never mixes episodes because it is the actor's own stack.
An episode's first stack (the reset frame repeated) collapses to one frame, and a
steady stream costs about one new frame per transition plus one per episode end.

The frame ring holds ``capacity + window + spare`` frames. A transition stays valid while
the oldest frame it references is in the ring. If frames run out first (very short
episodes), the oldest transitions are dropped early; ``pop_dropped`` reports them so a
prioritized sampler can zero them.
"""

from __future__ import annotations

import numpy as np

from qfleet.replay.arrays import Alloc, MetaSlot, zeros
from qfleet.replay.frame_codec import fingerprints
from qfleet.replay.records import RecordSpec, allocate
from qfleet.replay.transitions import Transitions


def storage_nbytes(capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                   window: int = 4096, spare: int | None = None) -> int:
    """Bytes a FrameStorage preallocates (computed without allocating it)."""
    stack, frame_bytes = obs_shape[0], int(np.prod(obs_shape[1:])) * np.dtype(obs_dtype).itemsize
    frames = capacity + window + _spare(capacity, stack, spare)
    per_frame = frame_bytes + 8  # pixels + fingerprint
    per_transition = 2 * stack * 4 + 8 + 4 + 4 + 8  # refs, action, reward, discount, floor
    return frames * per_frame + capacity * per_transition


def _spare(capacity: int, stack: int, spare: int | None) -> int:
    # At least 2F, so any transition's own frames always fit beside a full window.
    return max(capacity // 32 if spare is None else spare, 2 * stack)


class FrameStorage:
    """``extra``: further per-row fields of the record spec, stored as they come."""

    head = MetaSlot(0, int)  # valid transitions are numbers [head, tail)
    tail = MetaSlot(1, int)
    frames_written = MetaSlot(2, int)
    size = MetaSlot(3, int)
    _unreported = MetaSlot(4, int)  # dropped numbers from here on not yet handed out

    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                 extra: RecordSpec | None = None, *, window: int = 4096,
                 spare: int | None = None, alloc: Alloc = zeros) -> None:
        if len(obs_shape) < 2:
            raise ValueError(f"obs_shape {obs_shape} is not a stack of frames (F, ...)")
        self.capacity, self.window = capacity, window
        self.stack, self.frame_shape = obs_shape[0], tuple(obs_shape[1:])
        self._frame_size = int(np.prod(self.frame_shape))
        self.frame_capacity = capacity + window + _spare(capacity, self.stack, spare)
        m, c, f = self.frame_capacity, capacity, self.stack
        self.frames_M = alloc((m, *self.frame_shape), obs_dtype)
        self.fp_M = alloc((m,), np.uint64)
        self.obs_ref_NF = alloc((c, f), np.int32)  # frame slots of obs
        self.next_ref_NF = alloc((c, f), np.int32)  # frame slots of next_obs
        self.action_N = alloc((c,), np.int64)
        self.reward_N = alloc((c,), np.float32)
        self.discount_N = alloc((c,), np.float32)
        self.floor_N = alloc((c,), np.int64)  # oldest frame number it references
        self.extra = allocate(extra or {}, c, alloc=alloc)
        self.meta = alloc((5,), np.int64)  # the MetaSlots above
        # Frames one add may write, so that a piece never recycles its own window.
        self._piece = max(1, (self.frame_capacity - window) // (2 * f))

    @property
    def nbytes(self) -> int:
        arrays = (self.frames_M, self.fp_M, self.obs_ref_NF, self.next_ref_NF, self.action_N,
                  self.reward_N, self.discount_N, self.floor_N, *self.extra.values())
        return sum(a.nbytes for a in arrays)

    # ------------------------------------------------------------ writing

    def add(self, chunk: Transitions) -> np.ndarray:
        """Write a chunk (oldest first); returns the slots written."""
        n = len(chunk)
        skip = max(0, n - self.capacity)  # only the newest `capacity` could survive
        self.tail += skip
        slots = [self._add_piece(chunk, lo, min(lo + self._piece, n))
                 for lo in range(skip, n, self._piece)]
        return np.concatenate(slots) if slots else np.empty(0, dtype=np.int64)

    def _fingerprint(self, rows_XD: np.ndarray) -> np.ndarray:
        return fingerprints(rows_XD)  # one place, so tests can plant collisions here

    def _add_piece(self, chunk: Transitions, lo: int, hi: int) -> np.ndarray:
        n, f = hi - lo, self.stack
        obs_XD = np.ascontiguousarray(chunk.obs_NO[lo:hi]).reshape(n * f, self._frame_size)
        next_XD = np.ascontiguousarray(chunk.next_obs_NO[lo:hi]).reshape(n * f, self._frame_size)
        incoming = _Incoming(obs_XD, next_XD)
        fp_X = np.concatenate([self._fingerprint(obs_XD), self._fingerprint(next_XD)])
        pos_X = self._place_frames(incoming, fp_X)
        floor = int(pos_X.min())  # the oldest frame this piece references
        self._lower_floors(floor)
        slot_X = (pos_X % self.frame_capacity).astype(np.int32)
        slots_N = (self.tail + np.arange(n, dtype=np.int64)) % self.capacity
        self.obs_ref_NF[slots_N] = slot_X[:n * f].reshape(n, f)
        self.next_ref_NF[slots_N] = slot_X[n * f:].reshape(n, f)
        self.action_N[slots_N] = chunk.action_N[lo:hi]
        self.reward_N[slots_N] = chunk.reward_N[lo:hi]
        self.discount_N[slots_N] = chunk.discount_N[lo:hi]
        for name, dst in self.extra.items():
            dst[slots_N] = chunk.extra[name][lo:hi]
        self.floor_N[slots_N] = floor
        self.tail += n
        self.head = max(self.head, self.tail - self.capacity)
        self._evict_stale()
        self.size = self.tail - self.head
        return slots_N

    def _place_frames(self, incoming: _Incoming, fp_X: np.ndarray) -> np.ndarray:
        """Frame number for each incoming frame: a recent equal frame, an equal frame
        earlier in this piece, or a newly written one."""
        written = self.frames_written
        # Newest first: among equal frames np.unique reports the first, and the newest
        # keeps this piece's oldest reference (its floor) as young as possible.
        recent_W = np.arange(written - 1, max(0, written - self.window) - 1, -1, dtype=np.int64)
        w, x = len(recent_W), len(fp_X)
        keys = np.concatenate([self.fp_M[recent_W % self.frame_capacity], fp_X])
        _, first_U, inverse_K = np.unique(keys, return_index=True, return_inverse=True)
        src_X = first_U[inverse_K[w:]]  # first key with the same fingerprint
        own_X = src_X == w + np.arange(x)
        pos_X = np.full(x, -1, dtype=np.int64)
        pos_X[own_X] = written + np.arange(int(own_X.sum()))
        from_ring_X = src_X < w
        pos_X[from_ring_X] = recent_W[src_X[from_ring_X]]
        linked_X = ~own_X & ~from_ring_X
        pos_X[linked_X] = pos_X[src_X[linked_X] - w]
        # Equal fingerprints are only a hint: compare the bytes.
        ring_K, link_K = np.flatnonzero(from_ring_X), np.flatnonzero(linked_X)
        stored_KD = self.frames_M[pos_X[ring_K] % self.frame_capacity].reshape(
            len(ring_K), self._frame_size)
        clash_K = np.concatenate([
            ring_K[(stored_KD != incoming.rows(ring_K)).any(axis=1)],
            link_K[(incoming.rows(src_X[link_K] - w) != incoming.rows(link_K)).any(axis=1)]])
        new_X = own_X.copy()
        new_X[clash_K] = True
        pos_X[clash_K] = written + int(own_X.sum()) + np.arange(len(clash_K))
        new_K = np.flatnonzero(new_X)
        dest_K = pos_X[new_K] % self.frame_capacity
        self.frames_M[dest_K] = incoming.rows(new_K).reshape(len(new_K), *self.frame_shape)
        self.fp_M[dest_K] = fp_X[new_K]
        self.frames_written += len(new_K)
        return pos_X

    def _first_above(self, value: int) -> int:
        """First number in [head, tail) whose floor is > value (floors never decrease)."""
        lo, hi = self.head, self.tail
        while lo < hi:
            mid = (lo + hi) // 2
            if self.floor_N[mid % self.capacity] <= value:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _lower_floors(self, floor: int) -> None:
        """Keep floors non-decreasing in the transition number, so that stale transitions
        are always a prefix: lowering a floor is safe, it can only drop a transition early.
        Only the last few (younger than this piece's oldest reference) are touched."""
        first = self._first_above(floor)
        if first < self.tail:
            self.floor_N[np.arange(first, self.tail) % self.capacity] = floor

    def _evict_stale(self) -> None:
        """Drop the oldest transitions whose oldest frame has been recycled."""
        oldest_alive = self.frames_written - self.frame_capacity
        if self.head < self.tail and self.floor_N[self.head % self.capacity] < oldest_alive:
            self.head = self._first_above(oldest_alive - 1)

    def pop_dropped(self) -> np.ndarray:
        """Slots dropped early (not overwritten) since the last call."""
        lo, hi = max(self._unreported, self.tail - self.capacity), self.head
        self._unreported = max(self._unreported, hi)
        return np.arange(lo, hi, dtype=np.int64) % self.capacity

    # ------------------------------------------------------------ reading

    def get(self, slots_B: np.ndarray) -> Transitions:
        return Transitions(
            obs_NO=self.frames_M[self.obs_ref_NF[slots_B]],
            action_N=self.action_N[slots_B],
            reward_N=self.reward_N[slots_B],
            discount_N=self.discount_N[slots_B],
            next_obs_NO=self.frames_M[self.next_ref_NF[slots_B]],
            extra={name: a[slots_B] for name, a in self.extra.items()})

    def uniform_slots(self, rng: np.random.Generator, batch_size: int) -> np.ndarray:
        return (self.head + rng.integers(0, self.size, size=batch_size)) % self.capacity

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, np.ndarray]:
        n, m = min(self.tail, self.capacity), min(self.frames_written, self.frame_capacity)
        return {
            "frames.frames_M": self.frames_M[:m], "frames.fp_M": self.fp_M[:m],
            "frames.obs_ref_NF": self.obs_ref_NF[:n], "frames.next_ref_NF": self.next_ref_NF[:n],
            "frames.action_N": self.action_N[:n], "frames.reward_N": self.reward_N[:n],
            "frames.discount_N": self.discount_N[:n], "frames.floor_N": self.floor_N[:n],
            "frames.meta": np.array([self.head, self.tail, self.frames_written,
                                     self._unreported], dtype=np.int64),
            **{f"frames.extra.{k}": a[:n] for k, a in self.extra.items()}}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for name in ("frames_M", "fp_M", "obs_ref_NF", "next_ref_NF", "action_N", "reward_N",
                     "discount_N", "floor_N"):
            src = state[f"frames.{name}"]
            getattr(self, name)[:len(src)] = src
        for name, dst in self.extra.items():
            src = state[f"frames.extra.{name}"]
            dst[:len(src)] = src
        self.head, self.tail, self.frames_written, self._unreported = (
            int(v) for v in state["frames.meta"])
        self.size = self.tail - self.head


class _Incoming:
    """The 2nF frames of one piece, numbered obs frames first, then next_obs frames."""

    def __init__(self, obs_XD: np.ndarray, next_XD: np.ndarray) -> None:
        self.obs_XD, self.next_XD = obs_XD, next_XD

    def rows(self, k_K: np.ndarray) -> np.ndarray:
        split = len(self.obs_XD)
        out_KD = np.empty((len(k_K), self.obs_XD.shape[1]), dtype=self.obs_XD.dtype)
        in_obs_K = k_K < split
        out_KD[in_obs_K] = self.obs_XD[k_K[in_obs_K]]
        out_KD[~in_obs_K] = self.next_XD[k_K[~in_obs_K] - split]
        return out_KD
