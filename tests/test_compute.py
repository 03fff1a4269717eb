"""A run flushes denormal floats while it trains (qfleet.compute) and puts the CPU flag
back when it ends, so code that shares the process (other tests, a user's notebook) still
has them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import qfleet
from qfleet.compute import denormals_flushed


def test_denormals_flushed_reads_the_flag() -> None:
    assert not denormals_flushed() and sys.float_info.min / 4 > 0.0
    torch.set_flush_denormal(True)
    try:
        assert denormals_flushed()
    finally:
        torch.set_flush_denormal(False)
    assert not denormals_flushed()


class Seen:
    def __init__(self) -> None:
        self.flushed: list[bool] = []

    def on_metrics(self, event: str, record: dict[str, Any]) -> None:
        self.flushed.append(denormals_flushed())


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_flushes_while_it_trains_and_restores_the_flag(tmp_path: Path,
                                                             fails: bool) -> None:
    cfg = qfleet.load_config("cartpole-dqn", [
        "train.total_env_steps=600", "learner.learning_starts=200", "net.hidden=[16]",
        "train.eval_episodes=1", "train.eval_every=300", "log.progress=false",
        "log.tensorboard=false", "checkpoint.every=0"])
    seen = Seen()
    callbacks: list[Any] = [seen]
    if fails:
        class Boom:
            def on_eval(self, record: dict[str, Any]) -> None:
                raise RuntimeError("boom")
        callbacks.append(Boom())
    assert not denormals_flushed()
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            qfleet.train(cfg, tmp_path / "run", callbacks=callbacks)
    else:
        qfleet.train(cfg, tmp_path / "run", callbacks=callbacks)
    assert seen.flushed and all(seen.flushed)
    assert not denormals_flushed()
