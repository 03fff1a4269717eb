"""Where a run's time goes: the verdict against hand-made splits, and on each backend a
real run with slow actors (an env that sleeps) or a slow learner (a sleep in the update)
whose verdict names that side; ``qfleet inspect`` reads it back from the run's files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import qfleet
from qfleet.config import load_config
from qfleet.inspection import inspect_run
from qfleet.metrics import read_metrics
from qfleet.roles.clock import Clock
from qfleet.roles.learner import DQNLearner as Learner
from qfleet.timesplit import fractions, verdict


def test_clock_charges_each_lap_to_its_name() -> None:
    clock = Clock()
    time.sleep(0.02)
    clock.lap("a")
    time.sleep(0.04)
    clock.lap("b")
    clock.lap("a")
    split = clock.take()
    assert 0.015 < split["a"] < 0.035 and 0.035 < split["b"] < 0.06
    assert clock.take() == {}


def test_fractions_are_shares_of_each_role() -> None:
    share = fractions({"actor.env": 3.0, "actor.waiting": 1.0, "learner.update": 2.0})
    assert share == {"actor.env": 0.75, "actor.waiting": 0.25, "learner.update": 1.0}


@pytest.mark.parametrize("times, expected", [
    ({"actor.waiting": 6, "actor.env": 4, "learner.update": 9, "learner.wait": 1},
     "learner-bound: actors waited 60% of their time for the learner to take their data"),
    ({"actor.waiting": 1, "actor.env": 9, "learner.update": 3, "learner.wait": 7},
     "actor-bound: the learner waited 70% of its time for data"),
    ({"worker.waiting": 5, "worker.learn": 5, "aggregator.wait": 8, "aggregator.apply": 2},
     "hand-off-bound: workers waited 50% of their time and the aggregator 80% of its"),
    ({"actor.waiting": 1, "actor.env": 6, "actor.inference": 3, "learner.update": 8,
      "learner.wait": 2}, "balanced: actors env 60%, inference 30%, waiting 10%; learner "
                          "update 80%, wait 20%"),
    ({"learner.actors": 3, "learner.update": 7, "actor.waiting": 9, "actor.env": 1},
     "one process: update 70%, actors 30%"),
])
def test_verdict(times: dict[str, float], expected: str) -> None:
    assert verdict(fractions(times)).startswith(expected)


SETS = ["train.eval_every=0", "train.eval_episodes=1",
        "log.every=1000", "checkpoint.every=0"]


def _slow_update(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Learner.update_many

    def slowed(self: Learner, batch: Any, count: int) -> Any:
        time.sleep(0.005 * count)
        return original(self, batch, count)

    monkeypatch.setattr(Learner, "update_many", slowed)


def _verdict(tmp_path: Path, preset: str, backend: str, slow: str,
             monkeypatch: pytest.MonkeyPatch) -> str:
    extra = ["env.id=faulty_envs:SlowCartPole"] if slow == "actors" else []
    if slow == "learner":
        _slow_update(monkeypatch)
    # Ray's actors fill a call with ~20 ms of chunks and report the time they sat idle with
    # their next call's chunks, so the held-back phase shows only after a few slow rounds:
    # at 3,000 steps the last window still held the start (CI saw "balanced", actors 6%).
    steps = 6000 if backend == "ray" else 3000
    cfg = load_config(preset, [*SETS, f"train.total_env_steps={steps}",
                               f"runtime.backend={backend}", *extra])
    result = qfleet.train(cfg, tmp_path / slow)
    lines = inspect_run(tmp_path / slow)  # the same verdicts, read back from the files
    last = [r for r in read_metrics(tmp_path / slow) if r["event"] == "train"][-1]
    assert any(result.verdict in line for line in lines), lines
    assert f"  last window: {last['verdict']}" in lines, lines
    # The last window's: the whole run's also holds the start, where Ray's actors boot
    # and every learner waits for learning_starts.
    return str(last["verdict"])


def test_inline_names_the_slow_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _verdict(tmp_path, "cartpole-dqn", "inline", "actors", monkeypatch) \
        .startswith("one process: actors")
    assert _verdict(tmp_path, "cartpole-dqn", "inline", "learner", monkeypatch) \
        .startswith("one process: update")


@pytest.mark.parametrize("backend", ["processes", pytest.param("ray", marks=pytest.mark.slow)])
def test_verdict_names_the_slow_side(backend: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "ray":
        ray = pytest.importorskip("ray")
        # Ray's workers import the test env by name: they need this folder on their path
        here = str(Path(__file__).parent)
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [
            here, os.environ.get("PYTHONPATH")])))
    try:
        slow_actors = _verdict(tmp_path, "cartpole-apex", backend, "actors", monkeypatch)
        slow_learner = _verdict(tmp_path, "cartpole-apex", backend, "learner", monkeypatch)
    finally:
        if backend == "ray":
            ray.shutdown()
    assert slow_actors.startswith("actor-bound"), slow_actors
    assert slow_learner.startswith("learner-bound"), slow_learner
