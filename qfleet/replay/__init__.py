"""Replay as small pure parts: ring storage, n-step accumulator, samplers."""

from __future__ import annotations

import numpy as np

from qfleet.config import ReplayConfig
from qfleet.replay.nstep import NStepAccumulator
from qfleet.replay.storage import RingStorage
from qfleet.replay.transitions import Batch, Transitions
from qfleet.replay.uniform import UniformReplay

Replay = UniformReplay

__all__ = ["Batch", "NStepAccumulator", "Replay", "RingStorage", "Transitions",
           "UniformReplay", "make_replay"]


def make_replay(cfg: ReplayConfig, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                rng: np.random.Generator) -> Replay:
    return UniformReplay(RingStorage(cfg.capacity, obs_shape, obs_dtype), rng)
