"""Actor: steps a vector env with a local copy of the Q-network and emits n-step chunks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from qfleet.config import EnvConfig
from qfleet.envs import box_space, make_vec_env, seeds_for
from qfleet.policies import epsilon_greedy, sample_logits
from qfleet.replay import NStepAccumulator, Transitions
from qfleet.roles.clock import Clock
from qfleet.roles.params import ParamSnapshot


@dataclass
class Chunk:
    transitions: Transitions
    env_steps: int
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)
    param_version: int = 0  # the snapshot that chose these actions (parameter lag)
    epsilon: float | None = None  # exploration rate at the chunk's end; None = sampled
    priorities_N: np.ndarray | None = None  # the actor's own |td| (Ape-X initial priorities)
    times: dict[str, float] = field(default_factory=dict)  # seconds by activity (Clock)


PriorityFn = Callable[[nn.Module, Transitions], np.ndarray]


class Actor:
    """``incarnation`` counts restarts of this actor slot: each one gets fresh seeds.
    ``priority_fn`` (Ape-X) scores each chunk with the actor's local network.
    ``sample`` = the net outputs policy logits and actions are drawn from them
    (actor-critic); otherwise they are Q-values and the actor is epsilon-greedy."""

    def __init__(self, env_cfg: EnvConfig, net: nn.Module, *, n_step: int, gamma: float,
                 epsilon: Callable[[int], float], seed: int, index: int, incarnation: int = 0,
                 priority_fn: PriorityFn | None = None, sample: bool = False) -> None:
        self.env = make_vec_env(env_cfg)
        self.net = net.eval()
        self.epsilon, self.priority_fn, self.sample = epsilon, priority_fn, sample
        self.seed, self.index, self.incarnation, self.resets = seed, index, incarnation, 0
        self.rng = np.random.default_rng([seed, index, incarnation])
        obs_shape, obs_dtype = box_space(self.env)
        self.acc = NStepAccumulator(n_step, gamma, self.env.num_envs, obs_shape, obs_dtype)
        self.num_actions = int(self.env.single_action_space.n)  # type: ignore[attr-defined]
        self.version = -1
        self.env_steps = 0
        self.return_E = np.zeros(self.env.num_envs)
        self.length_E = np.zeros(self.env.num_envs, dtype=np.int64)
        self.clock = Clock()  # env vs inference here; the worker loop adds its waits
        self.reset_envs()

    def reset_envs(self) -> None:
        """(Re)start every env with fresh seeds; a restored run gets new ones per restore."""
        stream = (1 + self.index, self.incarnation, self.resets)
        self.obs_EO, _ = self.env.reset(seed=seeds_for(self.seed, stream, self.env.num_envs))
        self.resets += 1
        self.acc.reset()
        self.return_E[:] = 0
        self.length_E[:] = 0

    def set_params(self, snapshot: ParamSnapshot) -> None:
        if snapshot.version != self.version:
            self.net.load_state_dict(snapshot.params)
            self.version = snapshot.version

    @torch.no_grad()
    def _q_values(self) -> np.ndarray:
        return self.net(torch.from_numpy(self.obs_EO)).numpy()

    def _act(self) -> np.ndarray:
        if self.sample:
            return sample_logits(self._q_values(), self.rng)
        return epsilon_greedy(self._q_values, self.env.num_envs, self.num_actions,
                              self.epsilon(self.env_steps), self.rng)

    def collect(self, vector_steps: int) -> Chunk:
        parts: list[Transitions] = []
        returns: list[float] = []
        lengths: list[int] = []
        clock = self.clock
        for _ in range(vector_steps):
            clock.lap("other")
            action_E = self._act()
            clock.lap("inference")
            next_obs_EO, reward_E, term_E, trunc_E, info = self.env.step(action_E)
            clock.lap("env")
            done_E = term_E | trunc_E
            real_next_EO = next_obs_EO
            if done_E.any():  # SAME_STEP autoreset: the true last obs sits in final_obs
                real_next_EO = next_obs_EO.copy()
                for e in np.flatnonzero(done_E):
                    real_next_EO[e] = info["final_obs"][e]
            parts.append(self.acc.step(self.obs_EO, action_E, reward_E.astype(np.float32),
                                       real_next_EO, term_E, trunc_E))
            self.return_E += reward_E
            self.length_E += 1
            for e in np.flatnonzero(done_E):
                returns.append(float(self.return_E[e]))
                lengths.append(int(self.length_E[e]))
            self.return_E[done_E] = 0
            self.length_E[done_E] = 0
            self.obs_EO = next_obs_EO
            self.env_steps += self.env.num_envs
        data = Transitions.concat(parts)
        clock.lap("other")
        priorities_N = None if self.priority_fn is None else self.priority_fn(self.net, data)
        clock.lap("inference")
        return Chunk(data, vector_steps * self.env.num_envs, returns, lengths, self.version,
                     None if self.sample else self.epsilon(self.env_steps), priorities_N)

    def close(self) -> None:
        self.env.close()
