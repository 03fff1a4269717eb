"""learner.background_sample: the next prioritized group is drawn in a thread while the
current one trains. The thread changes when a draw happens, not what it draws: a run with
it equals, bit for bit, the same lagged order run without a thread; errors on either side
reach the caller, and no thread outlives the round."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch
from _runners import closing

import qfleet
from qfleet.algos import build_program
from qfleet.algos.dqn import background_sample
from qfleet.algos.program import ActorLearnerProgram
from qfleet.config import ConfigError
from qfleet.runtime import InlineRunner, LearnerSide, base

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=16", "learner.batch_size=16",
         "learner.learning_starts=256", "learner.train_every=64", "learner.updates_per_round=8",
         "learner.prefetch=2", "replay.capacity=4000", "net.hidden=[32]",
         "log.progress=false", "log.tensorboard=false", "learner.device='cpu'"]


class InlineAhead:
    """Ahead without a thread: the draw runs where the thread would start."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.out = fn(*args)

    def wait(self) -> None:
        pass

    def result(self) -> Any:
        return self.out


def _program(*extra: str) -> ActorLearnerProgram:
    program = build_program(qfleet.load_config("cartpole-apex", [*SMALL, *extra]))
    assert isinstance(program, ActorLearnerProgram)
    return program


def _run(background: str, rounds: int = 12) -> tuple[list[torch.Tensor], np.ndarray, int]:
    """(parameters, every shard's priorities, updates) after ``rounds`` inline rounds."""
    with closing(InlineRunner(_program(f"learner.background_sample='{background}'"))) as r:
        for _ in range(rounds):
            r.step()
        params = [p.detach().clone() for p in r.learner.online.parameters()]
        shards = r.replay.shards  # type: ignore[attr-defined]
        priorities = np.concatenate([shards[k].tree.priorities_N for k in sorted(shards)])
        return params, priorities, r.learner.version


def test_the_thread_draws_what_the_same_order_draws_without_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    threaded = _run("on")
    monkeypatch.setattr(base, "Ahead", InlineAhead)
    unthreaded = _run("on")
    assert threaded[2] == unthreaded[2] > 40  # several rounds of 4 groups of 2 updates
    for a, b in zip(threaded[0], unthreaded[0], strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(threaded[1], unthreaded[1])
    # and the lag is real: drawing after the priorities are written trains another model
    sequential = _run("off")
    assert sequential[2] == threaded[2]
    assert not all(torch.equal(a, b) for a, b in zip(threaded[0], sequential[0], strict=True))


def test_auto_is_on_only_for_a_cuda_learner_with_its_replay_in_process() -> None:
    def resolved(*sets: str) -> bool:
        return background_sample(qfleet.load_config("cartpole-apex", list(sets)))

    assert resolved("learner.background_sample='on'")
    assert not resolved("learner.background_sample='off'")
    assert resolved("learner.background_sample='auto'", "learner.device='cpu'") is False
    if torch.cuda.is_available():
        assert resolved("learner.background_sample='auto'", "learner.device='cuda'")
    refusal = re.escape("learner.background_sample = 'on': runtime.replay_on = 'actors'")
    with pytest.raises(ConfigError, match=refusal):
        qfleet.load_config("cartpole-apex", ["runtime.backend='ray'",
                                             "runtime.replay_on='actors'",
                                             "learner.background_sample='on'"])


def _filled_side(*extra: str) -> LearnerSide:
    side = LearnerSide(_program("learner.background_sample='on'", *extra))
    with closing(InlineRunner(_program("learner.learning_starts=100000"))) as runner:
        for _ in range(4):
            runner.step()  # fill a replay with real transitions, then hand it over
        side.replay = runner.replay
    return side


def _sample_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qfleet-sample-ahead"]


def test_an_error_in_the_background_draw_reaches_the_round() -> None:
    side = _filled_side()
    draw, calls = side.replay.sample, []

    def failing(rows: int) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:  # the first draw is the round's own, the second the thread's
            raise RuntimeError("the replay broke while drawing ahead")
        return draw(rows)

    side.replay.sample = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="broke while drawing ahead"):
        side.train(8)
    assert calls[1] == "qfleet-sample-ahead" and not _sample_threads()


def test_an_update_that_raises_waits_for_the_draw_before_it_leaves() -> None:
    side = _filled_side()
    draw, finished = side.replay.sample, []

    def slow(rows: int) -> Any:
        if threading.current_thread().name == "qfleet-sample-ahead":
            time.sleep(0.5)  # still drawing when the update fails
            finished.append(True)
        return draw(rows)

    def broken(*args: Any) -> Any:
        raise FloatingPointError("the update diverged")

    side.replay.sample = slow  # type: ignore[method-assign]
    side.learner.update_many = broken  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError):
        side.train(8)
    assert finished == [True] and not _sample_threads()  # nobody touches the replay now
