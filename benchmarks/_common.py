"""What several benchmarks share: CPU accounting from /proc (Linux) and Atari-sized chunks
for the transport measurements. Benchmarks run as scripts (``python benchmarks/X.py``), so
their own folder is on sys.path and they import this as ``_common``."""

from __future__ import annotations

import os

import numpy as np

from qfleet.replay import Transitions
from qfleet.replay.storage import RingStorage

TICKS = os.sysconf("SC_CLK_TCK")
NO_TRAINING = 10**12  # learner.learning_starts: the learner never owes an update
ATARI_OBS = (4, 84, 84)
SOURCES = 4  # distinct source chunks cycled through: 4 x 14.5 MB does not fit in L3


# ------------------------------------------------------------------ CPU accounting

def proc_stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [0] state, [1] parent pid,
    [11] utime, [12] stime (fields 3, 4, 14 and 15 of proc(5))."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def stat_cpu_s(fields: list[str]) -> float:
    """User + system CPU seconds in the ``proc_stat`` fields of a process."""
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of one process so far (Linux /proc)."""
    return stat_cpu_s(proc_stat(pid))


def busy_cores_s() -> float:
    """CPU seconds the whole machine has spent busy so far, all processes (/proc/stat)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / TICKS  # user .. steal; guest time is inside user


# ------------------------------------------------------------------ Atari-sized chunks

def atari_chunks(rows: int, count: int, seed: int) -> list[Transitions]:
    """Chunks as an Atari actor sends them: the frame stacks of an episode, so consecutive
    rows share F - 1 frames and a row's next_obs is the next row's obs (what the frame codec
    and FrameStorage exploit); the pixels are random, so nothing else compresses."""
    rng = np.random.default_rng(seed)
    stack = ATARI_OBS[0]

    def chunk() -> Transitions:
        frames_THW = rng.integers(0, 256, (rows + stack, *ATARI_OBS[1:]), dtype=np.uint8)
        stacks_NO = np.lib.stride_tricks.sliding_window_view(frames_THW, stack, axis=0)
        stacks_NO = np.ascontiguousarray(np.moveaxis(stacks_NO, -1, 1))  # (rows + 1, F, H, W)
        return Transitions(stacks_NO[:-1], rng.integers(0, 6, rows),
                           rng.random(rows, dtype=np.float32), np.full(rows, 0.99, np.float32),
                           stacks_NO[1:])

    return [chunk() for _ in range(count)]


def obs_mb(rows: int) -> float:
    """MB of obs + next_obs in a chunk of ``rows`` transitions."""
    return 2 * rows * int(np.prod(ATARI_OBS)) / 1e6


def new_ring(ring_rows: int) -> RingStorage:
    ring = RingStorage(ring_rows, ATARI_OBS, np.dtype(np.uint8))
    for array in ring.arrays.values():
        array.fill(1)  # fault every page in now, not inside a timed copy
    return ring
