"""GradientWorker by hand: when its first gradient comes (learning_starts and a full batch
in its replay), what each Gradient carries (its chunk's steps, returns and epsilon, the
batch's rows), and when it asks for parameters (before its first gradient, then every
sync_every gradients)."""

from __future__ import annotations

import pytest
from _runners import gradient_program

import qfleet
from qfleet.roles.gradients import GradientWorker
from qfleet.roles.params import ParamSnapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[16]",
         "learner.batch_size=16", "replay.capacity=2000", "runtime.backend='inline'",
         "log.progress=false", "log.tensorboard=false"]


def _workers(*extra: str) -> tuple[GradientWorker, GradientWorker]:
    """Worker 0 and a twin of it (same index and seeds: the same chunks)."""
    program = gradient_program(qfleet.load_config("cartpole-gorila-sync", [*SMALL, *extra]))
    return program.make_worker(0, 0, None), program.make_worker(0, 0, None)


@pytest.mark.parametrize("learning_starts, first", [(29, 8), (32, 8), (33, 9), (0, 4)])
def test_first_gradient_waits_for_learning_starts_and_a_full_batch(learning_starts: int,
                                                                  first: int) -> None:
    """4 env steps (rows) per work(): the first gradient comes at the first work after
    which at least learning_starts steps were collected and 16 rows are in the replay."""
    worker, _ = _workers(f"learner.learning_starts={learning_starts}")
    try:
        got = [worker.work().grads_P is not None for _ in range(first + 1)]
    finally:
        worker.close()
    assert got == [False] * (first - 1) + [True, True]
    assert worker.collected == 4 * (first + 1)


def test_each_gradient_carries_its_chunk_and_batch() -> None:
    worker, twin = _workers("learner.learning_starts=16", "actors.eps_start=1.0",
                            "actors.eps_end=0.1", "train.total_env_steps=400")
    try:
        returns = 0
        for _ in range(60):
            grad = worker.work()
            chunk = twin.actor.collect(4)
            assert (grad.worker, grad.env_steps) == (0, chunk.env_steps) == (0, 4)
            assert grad.episode_returns == chunk.episode_returns
            assert grad.epsilon == chunk.epsilon is not None
            returns += len(grad.episode_returns)
            if grad.grads_P is not None:
                assert grad.rows == 16
        assert returns > 0, "episodes must end within 240 steps for this to check anything"
    finally:
        worker.close()
        twin.close()


def test_parameters_are_due_before_the_first_gradient_then_every_sync_every() -> None:
    worker, _ = _workers("learner.learning_starts=16")
    try:
        due = []
        for _ in range(12):
            due.append(worker.wants_params(3))
            grad = worker.work()
            if grad.grads_P is None:
                assert worker.sent == worker.sent_total == 0
        # Works 1-3 fill the replay (no gradient), work 4 sends the first gradient: due
        # before each of them; then not due after 1 and 2 gradients, due from the 3rd on
        # (nothing pulled meanwhile).
        assert due == [True] * 4 + [False, False] + [True] * 6
        assert (worker.sent, worker.sent_total) == (9, 9)
        worker.set_params(_snapshot(worker))
        assert worker.sent == 0 and not worker.wants_params(3)
    finally:
        worker.close()


def _snapshot(worker: GradientWorker) -> ParamSnapshot:
    """The worker's own parameters as a newer version (what a pull hands over)."""
    return ParamSnapshot.of(worker.model, worker.version + 1)
