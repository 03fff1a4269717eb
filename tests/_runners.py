"""Helpers the runner tests share: a runner closed even when the test fails, stepping a
runner until a condition holds, one torch thread, and the Ape-X replay checks (one
backend's shards against the inline reference's, row by row)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from qfleet.algos import GradientProgram, build_program
from qfleet.compute import pin_torch
from qfleet.config import Config
from qfleet.runtime import ProcessesGradientRunner, ProcessesRunner, RoundReport


class _Runner(Protocol):
    def step(self) -> RoundReport: ...

    def close(self) -> None: ...


R = TypeVar("R", bound=_Runner)
Gone = Callable[[R], Callable[[], None]]


@contextmanager
def closing(runner: R, gone: Gone[R] | None = None) -> Iterator[R]:
    """Yield ``runner`` and close it, also when the test fails. ``gone(runner)``, called
    just before the close, returns a check run just after it: that nothing the runner
    started outlived the close."""
    try:
        yield runner
    finally:
        check = gone(runner) if gone is not None else None
        runner.close()
        if check is not None:
            check()


def gradient_program(cfg: Config) -> GradientProgram:
    """``build_program(cfg)`` for a gradient scheme's preset."""
    program = build_program(cfg)
    assert isinstance(program, GradientProgram)
    return program


def workers_gone(runner: ProcessesRunner | ProcessesGradientRunner) -> Callable[[], None]:
    """For ``closing``: no worker process of the runner is alive after its close."""

    def check() -> None:
        assert not any(w.process.is_alive() for w in runner.workers), "worker left running"

    return check


def run_until(runner: R, done: Callable[[R, list[RoundReport]], bool],
              timeout_s: float = 30.0) -> list[RoundReport]:
    """Step ``runner`` until ``done(runner, reports so far)``; fails past ``timeout_s``."""
    reports: list[RoundReport] = []
    deadline = time.monotonic() + timeout_s
    while not done(runner, reports):
        assert time.monotonic() < deadline, "condition not reached in time"
        reports.append(runner.step())
    return reports


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Compute in this process as the workers and ``runtime.torch_threads = 1`` do: one
    thread (on a small, shared machine two make these small nets 20x slower), denormals
    flushed (``qfleet.compute``)."""
    before = torch.get_num_threads()
    flushed_before = pin_torch(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(flushed_before)


def assert_apex_replay(runner: Any) -> None:
    """The sharded prioritized replay of a cartpole-apex run with 2 actors: CartPole-shaped
    samples, importance weights in (0, 1], both shards filled, actor-sent priorities."""
    batch = runner.replay.sample(32)
    assert batch.data.obs_NO.shape == (32, 4) and batch.data.next_obs_NO.shape == (32, 4)
    assert batch.weights_B is not None and np.all((batch.weights_B > 0)
                                                 & (batch.weights_B <= 1))
    shards = runner.replay.shards
    assert sorted(shards) == [0, 1] and all(len(s) > 0 for s in shards.values())
    # Actors sent priorities from their own TD errors, so they are not all the max.
    prio = np.concatenate([s.tree.priorities_N[: len(s)] for s in shards.values()])
    assert np.all(np.isfinite(prio)) and np.all(prio > 0) and len(np.unique(prio)) > 10


# Ape-X with learning off: every row comes from the initial parameters, so what each actor
# writes depends on its seeds alone, not on when the learner's updates reach it.
APEX_NO_LEARNING = ("learner.learning_starts=100000000", "replay.capacity=20000")


def inline_apex_shards(cfg: Config, rounds: int) -> dict[int, Any]:
    """The shards (key -> PrioritizedReplay) of an inline Ape-X run of ``rounds`` rounds."""
    from qfleet.runtime import InlineRunner

    program = build_program(cfg)
    with one_torch_thread(), closing(InlineRunner(program)) as inline:  # type: ignore[arg-type]
        for _ in range(rounds):
            inline.step()
        assert inline.learner.version == 0
        return dict(inline.replay.shards)  # type: ignore[attr-defined]


def assert_same_apex_rows(reference: dict[int, Any], other: dict[int, Any]) -> None:
    """Every row the reference shards hold, and the initial priority the actor gave it,
    is at the same slot of the other backend's shard (which may hold more: it ran on)."""
    assert sorted(reference) == sorted(other)
    for key, ref in reference.items():
        n = len(ref)
        assert n > 0 and len(other[key]) >= n, (key, n, len(other[key]))
        assert other[key].added < other[key].capacity, "a shard wrapped: raise the capacity"
        mine, theirs = ref.storage.get(np.arange(n)), other[key].storage.get(np.arange(n))
        for field in ("obs_NO", "action_N", "reward_N", "discount_N", "next_obs_NO"):
            np.testing.assert_array_equal(getattr(theirs, field), getattr(mine, field),
                                          err_msg=f"shard {key}: {field}")
        np.testing.assert_array_equal(other[key].tree.priorities_N[:n],
                                      ref.tree.priorities_N[:n], err_msg=f"shard {key}")
        assert len(np.unique(ref.tree.priorities_N[:n])) > n // 2  # actors' own, not max
