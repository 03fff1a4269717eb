"""The run directory: one writer at a time, and what counts as "already holds a run".

A process that writes a run holds an exclusive ``flock`` on ``RUN/.lock`` (the kernel
drops it when the process ends, however it ends) and writes its PID there, so a second
writer is refused with the holder's PID instead of interleaving metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from qfleet.config import ConfigError

LOCK_NAME = ".lock"
SEED_DIR = re.compile(r"seed-(\d+)")  # one run of several seeds: BASE/seed-N
# What a run writes; --overwrite removes exactly these, never other files of the user's.
RUN_FILES = ("metrics.jsonl", "config.toml", "result.json", "checkpoints", "tb",
             "system_info.json", "tracking.json")


def seed_dir(base: Path, seed: int) -> Path:
    """Where the run of ``seed`` goes among several seeds of one config (train --seeds,
    compare); plots read the same name back through SEED_DIR."""
    return base / f"seed-{seed}"


class RunDirBusy(ConfigError):
    """Another process is writing this run directory."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"run directory {str(run_dir)!r} is a file, not a directory")
        self.created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirBusy(f"run directory {str(run_dir)!r} is in use by another qfleet "
                             f"process (PID {holder}); wait for it to finish or choose "
                             "another --run-dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, failed: bool = False) -> None:
        """Drop the lock; a directory this lock created and nothing else wrote is removed
        again when the run failed before it began (an env error, a busy GPU...)."""
        if self.fd < 0:
            return
        if failed and self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def claimed(run_dir: Path) -> Iterator[RunLock]:
    """Hold ``run_dir`` for the block; release it however the block ends."""
    lock = RunLock(run_dir)
    try:
        yield lock
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()


def existing_run(run_dir: Path) -> list[str]:
    """The run files already in ``run_dir`` (empty: nothing a new run would overwrite)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def clear(run_dir: Path) -> None:
    """Remove a previous run's files (``qfleet train --overwrite``)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
