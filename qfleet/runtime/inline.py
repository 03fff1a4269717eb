"""The inline backend: every role in this process, round-robin, deterministic under a seed.

It is the reference the other backends are tested against. One ``step()`` is one round:
each actor collects a chunk into its replay shard, the learner runs the updates the
schedule owes, and actors pull the new parameter snapshot (or, for gradient schemes,
each worker sends one gradient and the aggregator steps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.roles import Actor, ActorLoop, ParamSnapshot, gradient_step
from qfleet.runtime.base import OUTSIDE, LearnerSide, RoundReport
from qfleet.runtime.global_side import GlobalSide


class InlineRunner(LearnerSide):
    def __init__(self, program: ActorLearnerProgram) -> None:
        super().__init__(program)
        self.loops = [ActorLoop(program.make_actor(i, 0), program.schedule.chunk_steps,
                                program.sync_every) for i in range(program.num_actors)]
        self._publish()

    @property
    def actors(self) -> list[Actor]:
        return [loop.actor for loop in self.loops]

    def _publish(self) -> None:
        self.published = self.learner.snapshot()

    def _fetch(self, version: int) -> ParamSnapshot | None:
        return None if version == self.published.version else self.published

    def step(self) -> RoundReport:
        report = RoundReport()
        self.clock.lap(OUTSIDE)
        for index, loop in enumerate(self.loops):
            chunk = loop.step(self._fetch)
            self.clock.lap("actors")  # in this process: the learner waits for each
            self.write(index, chunk, report)
        stats = self.train(self.updates_owed())
        report.add_updates(stats)
        if stats:
            self._publish()
        self.clock_out(report)
        return report

    # ------------------------------------------------------------ checkpoint state

    def _actor_states(self) -> list[dict[str, Any]]:
        """Inline actors continue exactly: the same seeds' streams, not new incarnations."""
        return [{"env_steps": a.env_steps, "resets": a.resets, "rng": a.rng.bit_generator.state}
                for a in self.actors]

    def _restart_actors(self, saved: list[dict[str, Any]]) -> None:
        for loop, state in zip(self.loops, saved, strict=True):
            actor = loop.actor
            actor.env_steps, actor.resets = state["env_steps"], state["resets"]
            actor.rng.bit_generator.state = state["rng"]
            actor.reset_envs()  # env internals cannot be saved: start fresh episodes
            loop.pull_next()

    def close(self) -> None:
        for actor in self.actors:
            actor.close()


class InlineGradientRunner(GlobalSide):
    """Gradient schemes in one process: each worker in turn collects and sends one
    gradient, the gate applies complete groups, then workers due a pull take the newest
    global parameters. Async staleness arises as on a real cluster: a worker's gradient
    was computed before the steps of the workers ahead of it in the round."""

    def __init__(self, program: GradientProgram) -> None:
        super().__init__(program)
        self.workers = [program.make_worker(i, 0, self.shared_replay)
                        for i in range(program.num_workers)]
        self._snapshot()

    def _snapshot(self) -> None:
        """A snapshot at the end of each round (not at each step, as ``_publish`` would):
        what every worker pulls in the next."""
        self.published = self.aggregator.snapshot()

    def _fetch(self, version: int) -> ParamSnapshot | None:
        return None if version == self.published.version else self.published

    def step(self) -> RoundReport:
        report = RoundReport()
        self.clock.lap(OUTSIDE)
        for worker in self.workers:
            grad = gradient_step(worker, self._fetch, self.program.sync_every)
            self.clock.lap("workers")  # in this process: the aggregator waits for each
            self.take(grad, True, report)
        if self.aggregator.version != self.published.version:
            self._snapshot()
        self.clock_out(report)
        return report

    def _incarnations(self) -> list[int]:
        return [w.actor.incarnation for w in self.workers]

    def local_replays(self) -> dict[int, dict[str, np.ndarray]]:
        return {i: w.replay_state() for i, w in enumerate(self.workers)}

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        """Workers restart with fresh seeds (new incarnations) and their own replays as
        saved (or refill them); their epsilon schedules continue where they were."""
        super().restore(tensors, meta, replay)
        for i, state in enumerate(meta["workers"]):
            self.workers[i].close()
            worker = self.program.make_worker(i, state["incarnation"] + 1, self.shared_replay)
            worker.load_state(self.restored_worker(i))
            self.workers[i] = worker
        self._snapshot()

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
