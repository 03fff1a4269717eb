"""Replay as small pure parts: storages (a plain ring, deduplicated frames), n-step
accumulation, and samplers (uniform, prioritized, sharded prioritized)."""

from __future__ import annotations

import numpy as np

from qfleet.config import ReplayConfig
from qfleet.replay import frame_codec
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


def make_replay(cfg: ReplayConfig, obs_shape: tuple[int, ...], obs_dtype: np.dtype,
                rng: np.random.Generator, anneal_steps: int | None = None,
                extra: RecordSpec | None = None) -> Replay:
    """Build the replay ``cfg`` asks for. ``anneal_steps`` (the run's total env steps) is
    what beta anneals over when ``cfg.beta_steps`` is 0; ``extra``: the program's record
    fields beyond a transition's."""
    frames = uses_frames(cfg, obs_shape, obs_dtype)

    def new_storage(capacity: int) -> Storage:
        if frames:
            return FrameStorage(capacity, obs_shape, obs_dtype, extra)
        return RingStorage(capacity, obs_shape, obs_dtype, extra)

    if cfg.kind != "prioritized":  # "auto" is resolved per scheme (config.replay_kind_of)
        return UniformReplay(new_storage(cfg.capacity), rng)
    beta_steps = cfg.beta_steps or anneal_steps or 0

    def new_shard(capacity: int) -> PrioritizedReplay:
        return PrioritizedReplay(new_storage(capacity), rng, alpha=cfg.alpha, beta0=cfg.beta0,
                                 eps=cfg.eps, beta_steps=beta_steps)

    if cfg.shards == 1:
        return new_shard(cfg.capacity)
    per_shard = max(1, cfg.capacity // cfg.shards)
    return ShardedReplay(lambda: new_shard(per_shard), rng, cfg.shards, beta0=cfg.beta0,
                         beta_steps=beta_steps)


def describe(replay: Replay) -> str:
    """One line for the start of a run: kind, capacity and preallocated memory."""
    size = (f"{replay.nbytes / 1e9:.2f} GB" if replay.nbytes >= 1e9
            else f"{replay.nbytes / 1e6:.1f} MB")
    return f"replay: {type(replay).__name__}, capacity {replay.capacity:,}, {size} preallocated"
