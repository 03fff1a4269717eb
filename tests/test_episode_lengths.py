"""Training episodes' lengths reach the metrics from every program shape and backend
(CartPole pays 1 per step, so an episode's length is its return: a check by hand)."""

from __future__ import annotations

from typing import Any

import pytest
from _runners import closing, run_until

from qfleet.algos import build_program
from qfleet.config import load_config
from qfleet.metrics import summarize_window
from qfleet.runtime import RoundReport, make_runner

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("preset, backend", [("cartpole-dqn", "inline"),
                                             ("cartpole-gorila-async", "inline"),
                                             ("cartpole-gorila-sync", "processes"),
                                             ("cartpole-a3c", "processes")])
def test_each_finished_episode_reports_its_length(preset: str, backend: str) -> None:
    cfg = load_config(preset, [f"runtime.backend='{backend}'", "net.hidden=[32]",
                               "log.progress=false", "learner.learning_starts=200"])
    runner: Any = make_runner(backend, build_program(cfg))
    with closing(runner):
        reports = run_until(runner, lambda r, reps: sum(len(x.episode_returns)
                                                        for x in reps) >= 10, 60.0)
    for report in reports:
        assert report.episode_lengths == [int(r) for r in report.episode_returns]
    lengths = [n for r in reports for n in r.episode_lengths]
    window = summarize_window(reports, 1.0, cfg.actors.count, cfg.learner.batch_size)
    assert window["length_mean"] == pytest.approx(sum(lengths) / len(lengths))


def test_a_window_without_finished_episodes_has_no_length() -> None:
    assert summarize_window([RoundReport(env_steps=5)], 1.0, 1, 32)["length_mean"] is None
