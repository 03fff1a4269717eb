"""RingStorage: wrap-around, oversize chunks, get(), and the state_dict round trip.

Rows carry their id in every field so a wrong slot shows up as a wrong id.
"""

from __future__ import annotations

import numpy as np
import pytest

from qfleet.replay.storage import RingStorage
from qfleet.replay.transitions import FIELDS, Transitions

OBS_SHAPE = (2, 3, 3)  # image-like uint8 rows


def chunk(ids: range | list[int]) -> Transitions:
    ids_N = np.asarray(list(ids), dtype=np.int64)
    obs = np.broadcast_to((ids_N % 256).astype(np.uint8)[:, None, None, None],
                          (len(ids_N), *OBS_SHAPE)).copy()
    return Transitions(obs_NO=obs, action_N=ids_N.copy(), reward_N=ids_N.astype(np.float32),
                       discount_N=(ids_N / 1000).astype(np.float32),
                       next_obs_NO=(obs + 1).astype(np.uint8))


def ids_of(tr: Transitions) -> list[int]:
    ids = tr.action_N.tolist()
    # every other field must agree with the id in action_N
    assert tr.reward_N.tolist() == [float(i) for i in ids]
    np.testing.assert_allclose(tr.discount_N, np.asarray(ids) / 1000, rtol=1e-6)
    assert (tr.obs_NO == (np.asarray(ids) % 256)[:, None, None, None]).all()
    assert (tr.next_obs_NO == tr.obs_NO + 1).all()
    return ids


def new(capacity: int) -> RingStorage:
    return RingStorage(capacity, OBS_SHAPE, np.dtype(np.uint8))


def test_fill_then_wrap() -> None:
    s = new(5)
    assert s.add(chunk(range(3))).tolist() == [0, 1, 2]
    assert (s.size, s.cursor) == (3, 3)
    assert s.add(chunk(range(3, 7))).tolist() == [3, 4, 0, 1]  # wraps
    assert (s.size, s.cursor) == (5, 2)
    assert ids_of(s.get(np.arange(5))) == [5, 6, 2, 3, 4]
    assert s.add(chunk(range(7, 9))).tolist() == [2, 3]
    assert ids_of(s.get(np.array([4, 0, 2, 2]))) == [4, 5, 7, 7]
    assert (s.size, s.cursor) == (5, 4)


def test_chunk_larger_than_capacity_keeps_newest_rows_in_order() -> None:
    s = new(5)
    s.add(chunk(range(2)))
    slots = s.add(chunk(range(100, 112)))  # 12 rows > capacity: the newest 5 survive
    assert sorted(slots.tolist()) == [0, 1, 2, 3, 4]
    assert ids_of(s.get(slots)) == [107, 108, 109, 110, 111]
    assert s.size == 5
    assert slots[-1] == (s.cursor - 1) % 5  # the cursor sits just after the newest row
    # the oldest survivor (107) is the first to be overwritten, then 108
    assert s.add(chunk([200, 201])).tolist() == slots[:2].tolist()
    assert sorted(ids_of(s.get(np.arange(5)))) == [109, 110, 111, 200, 201]


def test_chunk_of_exactly_capacity() -> None:
    s = new(4)
    s.add(chunk(range(3)))
    assert s.add(chunk(range(10, 14))).tolist() == [3, 0, 1, 2]
    assert ids_of(s.get(np.arange(4))) == [11, 12, 13, 10]
    assert (s.size, s.cursor) == (4, 3)


def test_get_returns_copies() -> None:
    s = new(3)
    s.add(chunk(range(3)))
    got = s.get(np.array([0, 1]))
    s.add(chunk([50, 51]))  # overwrites slots 0 and 1
    assert ids_of(got) == [0, 1]


def test_many_small_chunks_match_a_list_model() -> None:
    rng = np.random.default_rng(0)
    cap = 37
    s, model, next_id = new(cap), [None] * cap, 0
    for _ in range(200):
        n = int(rng.integers(1, 2 * cap))
        ids = list(range(next_id, next_id + n))
        next_id += n
        slots = s.add(chunk(ids))
        for slot, i in zip(slots, ids[-cap:], strict=True):
            model[slot] = i
        assert len(set(slots.tolist())) == len(slots)
    assert ids_of(s.get(np.arange(cap))) == model
    # the slot holding the newest row sits just before the cursor
    assert model[(s.cursor - 1) % cap] == next_id - 1


@pytest.mark.parametrize("added", [[3], [3, 4], [3, 4, 9], [12]], ids=str)
def test_state_dict_round_trip(added: list[int]) -> None:
    cap = 8
    src, next_id = new(cap), 0
    for n in added:
        src.add(chunk(range(next_id, next_id + n)))
        next_id += n
    state = {k: v.copy() for k, v in src.state_dict().items()}
    assert len(state["obs_NO"]) == src.size  # only filled rows are saved
    dst = new(cap)
    dst.add(chunk(range(900, 905)))  # stale contents must not survive the load
    dst.load_state_dict(state)
    assert (dst.size, dst.cursor) == (src.size, src.cursor)
    for name in FIELDS:
        np.testing.assert_array_equal(dst.arrays[name][: dst.size], src.arrays[name][: src.size])
    # both continue identically
    assert dst.add(chunk([500, 501])).tolist() == src.add(chunk([500, 501])).tolist()
    assert ids_of(dst.get(np.arange(dst.size))) == ids_of(src.get(np.arange(src.size)))


def test_nbytes_counts_every_array() -> None:
    s = new(10)
    obs = 10 * 2 * 3 * 3  # uint8
    assert s.nbytes == 2 * obs + 10 * 8 + 10 * 4 + 10 * 4
