"""Replay as small pure parts: storages (a plain ring, deduplicated frames), n-step
accumulation, and samplers (uniform, prioritized, sharded prioritized)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from qfleet.config import ReplayConfig
from qfleet.replay import frame_codec
from qfleet.replay.arrays import Alloc, zeros
from qfleet.replay.base import Replay, Storage
from qfleet.replay.frames import FrameStorage
from qfleet.replay.nstep import NStepAccumulator
from qfleet.replay.prioritized import PrioritizedReplay
from qfleet.replay.queue import RolloutQueue
from qfleet.replay.records import Field, RecordSpec, transition_spec
from qfleet.replay.sharded import ShardedReplay
from qfleet.replay.storage import RingStorage
from qfleet.replay.transitions import Batch, Transitions
from qfleet.replay.uniform import UniformReplay

__all__ = ["Batch", "Field", "FrameStorage", "NStepAccumulator", "PrioritizedReplay",
           "RecordSpec", "Replay", "RingStorage", "RolloutQueue", "ShardedReplay", "Storage",
           "Transitions", "UniformReplay", "describe", "make_replay", "transition_spec"]


def uses_frames(cfg: ReplayConfig, obs_shape: tuple[int, ...], obs_dtype: np.dtype) -> bool:
    """Frame dedup pays off for stacks of uint8 images (F, H, W); "auto" picks it there."""
    if cfg.storage == "auto":
        return frame_codec.is_stacked(obs_shape, obs_dtype)
    return cfg.storage == "frames"


@dataclass(frozen=True)
class _Parts:
    """Builds storages and shards (plain data, so a replay built here pickles whole)."""

    cfg: ReplayConfig
    obs_shape: tuple[int, ...]
    obs_dtype: np.dtype
    extra: RecordSpec | None
    alloc: Alloc
    rng: np.random.Generator
    beta_steps: int

    def storage(self, capacity: int) -> Storage:
        if uses_frames(self.cfg, self.obs_shape, self.obs_dtype):
            return FrameStorage(capacity, self.obs_shape, self.obs_dtype, self.extra,
                                alloc=self.alloc)
        return RingStorage(capacity, self.obs_shape, self.obs_dtype, self.extra, self.alloc)

    def shard(self, capacity: int) -> PrioritizedReplay:
        c = self.cfg
        return PrioritizedReplay(self.storage(capacity), self.rng, alpha=c.alpha, beta0=c.beta0,
                                 eps=c.eps, beta_steps=self.beta_steps, alloc=self.alloc)


def make_replay(cfg: ReplayConfig, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                rng: np.random.Generator, anneal_steps: int | None = None,
                extra: RecordSpec | None = None, alloc: Alloc = zeros) -> Replay:
    """Build the replay ``cfg`` asks for. ``anneal_steps`` (the run's total env steps) is
    what beta anneals over when ``cfg.beta_steps`` is 0; ``extra``: the program's record
    fields beyond a transition's; ``alloc``: where its state arrays live."""
    beta_steps = cfg.beta_steps or anneal_steps or 0
    parts = _Parts(cfg, obs_shape, obs_dtype, extra, alloc, rng, beta_steps)
    if cfg.kind != "prioritized":  # "auto" is resolved per scheme (config.replay_kind_of)
        return UniformReplay(parts.storage(cfg.capacity), rng)
    if cfg.shards == 1:
        return parts.shard(cfg.capacity)
    per_shard = max(1, cfg.capacity // cfg.shards)
    return ShardedReplay(partial(parts.shard, per_shard), rng, cfg.shards, beta0=cfg.beta0,
                         beta_steps=beta_steps)


def describe(replay: Replay) -> str:
    """One line for the start of a run: kind, capacity and preallocated memory."""
    size = (f"{replay.nbytes / 1e9:.2f} GB" if replay.nbytes >= 1e9
            else f"{replay.nbytes / 1e6:.1f} MB")
    return f"replay: {type(replay).__name__}, capacity {replay.capacity:,}, {size} preallocated"
