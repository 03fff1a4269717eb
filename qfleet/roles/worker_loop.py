"""The one loop every worker runs, on every backend: pull the newest parameters when due,
then collect a chunk (an actor) or compute a gradient (a gradient worker). The backend
supplies ``fetch``, how this worker reads the snapshot published last, and moves what
the step returns; the cadence is decided here, once."""

from __future__ import annotations

from collections.abc import Callable

from qfleet.roles.actor import Actor, Chunk
from qfleet.roles.gradients import Gradient, GradientWorker
from qfleet.roles.params import ParamSnapshot

# fetch(version the worker holds) -> the published snapshot if it is newer, else None (an
# unchanged version costs no copy).
Fetch = Callable[[int], ParamSnapshot | None]


class ActorLoop:
    """An actor pulls before a chunk once ``sync_every`` env steps passed since its last
    pull (0: before every chunk, so one in the learner's process always acts with the
    newest parameters, as single-process DQN does)."""

    def __init__(self, actor: Actor, chunk_steps: int, sync_every: int) -> None:
        self.actor, self.chunk_steps, self.sync_every = actor, chunk_steps, sync_every
        self.since_pull = sync_every  # a new actor pulls before its first chunk

    def pull_next(self) -> None:
        """Pull before the next chunk whatever the cadence (after a restore)."""
        self.since_pull = self.sync_every

    def step(self, fetch: Fetch) -> Chunk:
        clock = self.actor.clock
        clock.lap("waiting")  # since the last chunk: the backend took it (or held it up)
        if self.since_pull >= self.sync_every:
            snapshot = fetch(self.actor.version)
            if snapshot is not None:
                self.actor.set_params(snapshot)
            self.since_pull = 0
        clock.lap("params")
        chunk = self.actor.collect(self.chunk_steps)
        self.since_pull += chunk.env_steps
        chunk.times = clock.take()
        return chunk


def gradient_step(worker: GradientWorker, fetch: Fetch, sync_every: int) -> Gradient:
    """A gradient worker pulls after every ``sync_every`` gradients it sent (and before
    each work() until its first gradient), then works once."""
    clock = worker.actor.clock
    clock.lap("waiting")  # since the last gradient: the backend took it (or held it up)
    if worker.wants_params(sync_every):
        worker.pulled(fetch(worker.version))
    clock.lap("params")
    grad = worker.work()
    grad.times = clock.take()
    return grad
