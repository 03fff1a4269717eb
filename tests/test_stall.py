"""The stall watchdog (runtime.stall_timeout_s): the watch's rule against hand-made
rounds, and on each backend a real run whose env blocks for an hour: the CLI names what
stalled, prints the stuck worker's stack, checkpoints what it can and exits 1 in seconds."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qfleet.runtime import RoundReport
from qfleet.watchdog import StallWatch


def _round(env_steps: int = 0, updates: int = 0, actors: tuple[int, ...] = ()) -> RoundReport:
    return RoundReport(env_steps=env_steps, updates=updates,
                       steps_by_actor={i: 1 for i in actors})


def test_quiet_rounds_stall_once_they_add_up_past_the_timeout() -> None:
    watch = StallWatch(10.0, 2, "actor")
    assert watch.after_round(_round(actors=(0, 1)), 1.0) == []
    assert watch.after_round(_round(updates=1), 4.0) == []  # updates alone are progress
    assert watch.after_round(_round(), 6.0) == []
    assert watch.quiet_s == 6.0 and watch.silent_s == [10.0, 10.0]
    assert watch.after_round(_round(), 4.0) == [0, 1]  # nothing from either for 14 s
    assert watch.message([0, 1]).startswith("stalled: actor 0, actor 1 sent nothing for 14 s")
    assert watch.after_round(_round(), 1.0) == [0, 1]  # 11 s quiet: the run as a whole
    assert watch.message([0, 1]).startswith("stalled: no env step and no update for 11 s")


def test_one_silent_worker_is_named_while_the_others_go_on() -> None:
    watch = StallWatch(10.0, 3, "worker")
    for _ in range(10):
        assert watch.after_round(_round(5, 1, actors=(0, 1, 2)), 1.0) == []
    for _ in range(10):
        assert watch.after_round(_round(5, 1, actors=(0, 2)), 1.0) == []
    assert watch.after_round(_round(5, 1, actors=(0, 2)), 1.0) == [1]
    assert watch.message([1]).startswith("stalled: worker 1 sent nothing for 11 s")
    # an arrival resets the count
    assert watch.after_round(_round(5, 1, actors=(0, 1, 2)), 1.0) == []
    assert watch.silent_s == [0.0, 0.0, 0.0]


def test_zero_turns_the_watch_off() -> None:
    watch = StallWatch(0.0, 1, "actor")
    assert watch.after_round(_round(), 1e9) == []


STALL_SETS = ["env.id=faulty_envs:BlockingCartPole", "train.eval_every=0",
              "train.total_env_steps=100000", "log.every=100"]


def _left_running(marker: str) -> list[str]:
    """Command lines of live processes that name ``marker`` (forked workers carry their
    parent's command line, and with it the run dir)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in ps.stdout.splitlines() if marker in line and "ps -eo" not in line]


def _stalled_run(run_cli: Any, tmp_path: Path, preset: str, *sets: str,
                 timeout: float = 120) -> tuple[str, float]:
    shm_before = set(os.listdir("/dev/shm"))
    t0 = time.monotonic()
    proc = run_cli("train", preset, "--run-dir", str(tmp_path / "run"),
                   sets=[*STALL_SETS, *sets], timeout=timeout)
    took = time.monotonic() - t0
    assert not _left_running(str(tmp_path / "run")), "a worker outlived the stalled run"
    assert set(os.listdir("/dev/shm")) <= shm_before, "shared memory left behind"
    out = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert proc.returncode == 1, out[-3000:]
    assert "qfleet: error: stalled:" in out, out[-3000:]
    assert "Traceback (most recent call last)" not in out  # an error line, not a crash
    # the stuck place is shown: the env's step, where it sleeps
    assert "faulty_envs.py" in out and "in step" in out, out[-3000:]
    return out, took


def _silent(out: str) -> list[str]:
    """The actors a stall message names (checked against the two the run has)."""
    found = re.search(r"(?:stalled: |nothing arrived from )((?:actor \d, )*actor \d)", out)
    assert found is not None, out[-1500:]
    names = found.group(1).split(", ")
    assert set(names) <= {"actor 0", "actor 1"}
    return names


def test_inline_round_that_never_returns(run_cli: Any, tmp_path: Path) -> None:
    out, took = _stalled_run(run_cli, tmp_path, "cartpole-dqn", "runtime.stall_timeout_s=3")
    assert "one round of the run has not returned for 3 s" in out
    assert "a round has not returned for 3 s; where this process is" in out
    assert took < 60


def test_processes_actors_that_stop_sending(run_cli: Any, tmp_path: Path) -> None:
    out, took = _stalled_run(run_cli, tmp_path, "cartpole-apex", "runtime.backend=processes",
                             "actors.count=2", "runtime.stall_timeout_s=3")
    # both actors block after 200 steps per env, so one or both are named
    assert out.count("Current thread 0x") == len(_silent(out))  # each named one's stack
    assert list((tmp_path / "run" / "checkpoints").glob("*")), "no checkpoint was saved"
    assert took < 90


@pytest.mark.slow
def test_ray_actors_that_stop_sending(run_cli: Any, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    # Ray actors can take more than a few seconds to start here: a longer timeout
    out, _ = _stalled_run(run_cli, tmp_path, "cartpole-apex", "runtime.backend=ray",
                          "actors.count=2", "runtime.stall_timeout_s=20", timeout=240)
    assert "forwarded by Ray" in out and _silent(out)
    assert "Current thread 0x" in out  # Ray may fold the two dumps' identical lines
    assert list((tmp_path / "run" / "checkpoints").glob("*")), "no checkpoint was saved"
