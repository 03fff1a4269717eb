"""Record specs: the fields of a record (field -> dtype and per-row shape), declared once by
the program. Storages, transport slots and replay services allocate and copy by the spec,
never by field name, so a new field reaches the learner without touching any of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qfleet.replay.arrays import Alloc, zeros


@dataclass(frozen=True)
class Field:
    dtype: np.dtype
    shape: tuple[int, ...] = ()  # of one row

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


RecordSpec = Mapping[str, Field]


def transition_spec(obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                    extra: RecordSpec | None = None) -> dict[str, Field]:
    """An n-step transition (see Transitions), plus any ``extra`` per-row fields."""
    spec = {"obs_NO": Field(obs_dtype, obs_shape), "action_N": Field(np.dtype(np.int64)),
            "reward_N": Field(np.dtype(np.float32)), "discount_N": Field(np.dtype(np.float32)),
            "next_obs_NO": Field(obs_dtype, obs_shape)}
    return spec | dict(extra or {})


def allocate(spec: RecordSpec, rows: int, lead: tuple[int, ...] = (),
             alloc: Alloc = zeros) -> dict[str, np.ndarray]:
    """Zeroed arrays of ``(*lead, rows, *shape)`` per field."""
    return {name: alloc((*lead, rows, *f.shape), f.dtype) for name, f in spec.items()}


def row_bytes(spec: RecordSpec) -> int:
    return sum(f.row_bytes for f in spec.values())
