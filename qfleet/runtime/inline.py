"""The inline backend: every role in this process, round-robin, deterministic under a seed.

It is the reference the other backends are tested against. One ``step()`` is one round:
each actor collects a chunk into replay, the learner runs the updates the schedule owes,
and actors pull the new parameter snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qfleet.algos.program import ActorLearnerProgram
from qfleet.checkpoint import flatten_optimizer, unflatten_optimizer
from qfleet.roles import Chunk, UpdateStats


@dataclass
class RoundReport:
    env_steps: int = 0
    updates: int = 0
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    loss_sum: float = 0.0
    q_sum: float = 0.0
    param_lag_sum: int = 0
    chunks: int = 0

    def add_chunk(self, chunk: Chunk, learner_version: int) -> None:
        self.env_steps += chunk.env_steps
        self.episode_returns += chunk.episode_returns
        self.episode_lengths += chunk.episode_lengths
        self.param_lag_sum += learner_version - chunk.param_version
        self.chunks += 1

    def add_updates(self, stats: list[UpdateStats]) -> None:
        if stats:  # one sync for the whole round instead of one per update
            self.loss_sum += float(torch.stack([s.loss for s in stats]).sum())
            self.q_sum += float(torch.stack([s.q_mean for s in stats]).sum())
            self.updates += len(stats)


class InlineRunner:
    def __init__(self, program: ActorLearnerProgram) -> None:
        self.program = program
        self.replay = program.make_replay()
        self.learner = program.make_learner()
        self.actors = [program.make_actor(i) for i in range(program.num_actors)]
        self.env_steps = 0
        # Updates the schedule owed while a replay restored empty was refilling: forgiven,
        # so a resumed run does not burst hundreds of updates on a few fresh transitions.
        self.forgiven = 0
        self.refill_until = 0
        self._publish()

    def _publish(self) -> None:
        snapshot = self.learner.snapshot()
        for actor in self.actors:
            actor.set_params(snapshot)

    def step(self) -> RoundReport:
        sched, report = self.program.schedule, RoundReport()
        for actor in self.actors:
            chunk = actor.collect(sched.chunk_steps)
            self.replay.add(chunk.transitions)
            self.env_steps += chunk.env_steps
            report.add_chunk(chunk, self.learner.version)
        owed = max(0, sched.updates_owed(self.env_steps) - self.learner.version - self.forgiven)
        if self.env_steps < self.refill_until:
            self.forgiven, owed = self.forgiven + owed, 0
        stats = self._train(owed, sched.batch_size)
        report.add_updates(stats)
        if stats:
            self._publish()
        return report

    def _train(self, count: int, batch_size: int) -> list[UpdateStats]:
        if count == 0:
            return []
        if not self.replay.prioritized:  # draws are independent: fetch the round at once
            return self.learner.update_many(self.replay.sample(count * batch_size), count)
        stats = []
        for _ in range(count):  # each draw must see the previous update's priorities
            batch = self.replay.sample(batch_size)
            stats.append(self.learner.update(batch))
            self.replay.update_priorities(batch.indices_B, stats[-1].td_abs_B.cpu().numpy())
        return stats

    @property
    def updates(self) -> int:
        return self.learner.version

    @property
    def policy_net(self) -> torch.nn.Module:
        return self.learner.online

    # ------------------------------------------------------------ checkpoint state

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, np.ndarray]]:
        """(tensors, JSON-able meta, replay arrays) for a checkpoint."""
        tensors = {f"online.{k}": v for k, v in self.learner.online.state_dict().items()}
        tensors |= {f"target.{k}": v for k, v in self.learner.target.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer(self.learner.opt.state_dict())
        tensors |= opt_tensors
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"env_steps": self.env_steps, "updates": self.learner.version,
                "forgiven": self.forgiven, "refill_until": self.refill_until,
                "optimizer": opt_meta, "replay_rng": self.replay.rng.bit_generator.state,
                "actors": [{"env_steps": a.env_steps, "resets": a.resets,
                            "rng": a.rng.bit_generator.state} for a in self.actors]}
        replay = self.replay.state_dict() if with_replay else {}
        return tensors, meta, replay

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, np.ndarray]) -> None:
        learner = self.learner
        learner.online.load_state_dict(_prefixed(tensors, "online."))
        learner.target.load_state_dict(_prefixed(tensors, "target."))
        learner.opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
        learner.version = meta["updates"]
        torch.set_rng_state(tensors["torch_rng"])
        self.env_steps = meta["env_steps"]
        self.replay.rng.bit_generator.state = meta["replay_rng"]
        self.forgiven, self.refill_until = meta["forgiven"], meta["refill_until"]
        if replay:
            self.replay.load_state_dict(replay)
        else:  # not saved (checkpoint.replay = false): collect afresh before training again
            self.refill_until = self.env_steps + self.program.schedule.learning_starts
        for actor, state in zip(self.actors, meta["actors"], strict=True):
            actor.env_steps, actor.resets = state["env_steps"], state["resets"]
            actor.rng.bit_generator.state = state["rng"]
            actor.reset_envs()  # env internals cannot be saved: start fresh episodes
        self._publish()

    def close(self) -> None:
        for actor in self.actors:
            actor.close()


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
