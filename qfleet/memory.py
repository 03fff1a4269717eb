"""Refuse a run that cannot fit in memory before allocating it.

NumPy and torch allocate lazily, so an oversized replay or network fails late (a
MemoryError halfway, or the kernel's OOM killer) instead of at once. This estimates the
replay and the networks from the config (the network on torch's meta device: counted,
never allocated) and compares them with the memory this machine (or its cgroup) has free.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qfleet.config import Config, ConfigError, replay_kind_of
from qfleet.replay.frames import storage_nbytes

PRIORITY_BYTES = 40  # per slot: sum and min trees (2 x 2 x 8 bytes) + the slot's write id
ROW_BYTES = 8 + 4 + 4  # action, reward, discount
# Parameter copies per learner (online, target, gradient, two Adam moments) and per actor.
LEARNER_COPIES, ACTOR_COPIES = 5, 3


def fmt(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def available_bytes() -> int | None:
    """MemAvailable, or less if this process's cgroup has a lower limit; None if unknown."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        avail = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                     if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def replay_bytes(cfg: Config, obs_shape: tuple[int, ...], obs_dtype: np.dtype) -> int:
    """What the run's replays preallocate (every worker's local replay included)."""
    rc = cfg.replay
    if cfg.algo.name in ("a2c",) or (cfg.algo.name == "a3c" and cfg.algo.a3c_mode != "queue"):
        return 0  # on-policy rollouts only
    frames = rc.storage == "frames" or (rc.storage == "auto" and len(obs_shape) == 3
                                        and np.dtype(obs_dtype) == np.uint8)
    if frames:
        one = storage_nbytes(rc.capacity, obs_shape, obs_dtype)
    else:
        one = rc.capacity * (2 * int(np.prod(obs_shape)) * np.dtype(obs_dtype).itemsize
                             + ROW_BYTES)
    prioritized = replay_kind_of(cfg) == "prioritized"
    one += rc.capacity * PRIORITY_BYTES if prioritized else 0
    local = cfg.algo.name == "gorila" and rc.scope == "local"
    return one * (cfg.actors.count if local else 1)


def parameter_count(cfg: Config, obs_shape: tuple[int, ...], num_actions: int) -> int:
    from qfleet.nets import make_actor_critic, make_q_network

    make = make_actor_critic if cfg.algo.name in ("a2c", "a3c") else make_q_network
    with torch.device("meta"):
        net = make(cfg.net, obs_shape, num_actions)
    return sum(p.numel() for p in net.parameters())


def check_fits(cfg: Config) -> None:
    """Raise ConfigError naming the field to lower if the run cannot fit in free memory.
    Only for one-machine backends: on Ray the replay and actors live on other nodes."""
    from qfleet.envs import probe_spaces

    obs_shape, obs_dtype, num_actions = probe_spaces(cfg.env)
    avail = available_bytes()
    if cfg.runtime.backend == "ray" or avail is None:
        return
    replay = replay_bytes(cfg, obs_shape, obs_dtype)
    params = parameter_count(cfg, obs_shape, num_actions) * 4
    nets = params * (LEARNER_COPIES + ACTOR_COPIES * cfg.actors.count)
    if replay + nets <= avail:
        return
    field, value = (("replay.capacity", cfg.replay.capacity) if replay >= nets
                    else ("net.hidden", cfg.net.hidden))
    raise ConfigError(f"{field} = {value!r}: this run needs about {fmt(replay + nets)} of memory "
                      f"(replay {fmt(replay)}, networks {fmt(nets)}) and this machine has "
                      f"{fmt(avail)} available; lower {field}")
