"""Actor: steps a vector env with a local copy of the Q-network and emits n-step chunks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from qfleet.config import EnvConfig
from qfleet.envs import box_space, make_vec_env, reset_vec_env, seeds_for
from qfleet.policies import Exploration, sample_logits
from qfleet.replay import Transitions
from qfleet.replay.nstep_block import NStepBlock, Windows
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


class Actor:
    """``incarnation`` counts restarts of this actor slot: each one gets fresh seeds.
    ``scores`` (Ape-X): the actor gives each transition its |n-step TD error| under its local
    network as the initial priority, from the Q-values it computed to act (each state's
    values come from the parameters that acted there). ``sample`` = the net outputs policy
    logits and actions are drawn from them (actor-critic); otherwise they are Q-values and
    the actor is epsilon-greedy."""

    def __init__(self, env_cfg: EnvConfig, net: nn.Module, *, n_step: int, gamma: float,
                 epsilon: Callable[[int], float], seed: int, index: int, incarnation: int = 0,
                 scores: bool = False, sample: bool = False) -> None:
        self.env = make_vec_env(env_cfg, training=True)
        self.net = net.eval()
        self.epsilon, self.scores, self.sample = epsilon, scores, sample
        self.seed, self.index, self.incarnation, self.resets = seed, index, incarnation, 0
        self.rng = np.random.default_rng([seed, index, incarnation])
        obs_shape, obs_dtype = box_space(self.env)
        self.num_actions = int(self.env.single_action_space.n)  # type: ignore[attr-defined]
        self.block = NStepBlock(n_step, gamma, self.env.num_envs, obs_shape, obs_dtype,
                                num_values=self.num_actions if scores else 0)
        self.version = -1
        self.env_steps = 0
        self.return_E = np.zeros(self.env.num_envs)
        self.length_E = np.zeros(self.env.num_envs, dtype=np.int64)
        self.clock = Clock()  # env vs inference here; the worker loop adds its waits
        self.reset_envs()

    def reset_envs(self) -> None:
        """(Re)start every env with fresh seeds; a restored run gets new ones per restore."""
        stream = (1 + self.index, self.incarnation, self.resets)
        obs_EO, _ = reset_vec_env(self.env, seeds_for(self.seed, stream, self.env.num_envs))
        self.block.begin(obs_EO)
        self.resets += 1
        self.return_E[:] = 0
        self.length_E[:] = 0

    def set_params(self, snapshot: ParamSnapshot) -> None:
        if snapshot.version != self.version:
            self.net.load_state_dict(snapshot.params)
            self.moved(snapshot.version)

    def moved(self, version: int) -> None:
        """The net's parameters are now ``version`` (loaded, or stepped in place)."""
        self.version = version
        # the current state's values (computed at the last chunk's end) are stale now
        self.block.has_values_L[self.block.steps] = False

    @torch.no_grad()
    def _forward(self, obs_NO: np.ndarray) -> np.ndarray:
        return self.net(torch.from_numpy(obs_NO)).numpy()

    def _values(self) -> np.ndarray:
        """The net's output for the current state, kept for scoring when the actor scores."""
        block, k = self.block, self.block.steps
        if not self.scores:
            return self._forward(block.obs_EO)
        if not block.has_values_L[k]:
            block.values_LEA[k] = self._forward(block.obs_EO)
            block.has_values_L[k] = True
        return block.values_LEA[k]

    def collect(self, vector_steps: int) -> Chunk:
        clock, block, num_envs = self.clock, self.block, self.env.num_envs
        block.reserve(vector_steps)
        explore = self._draws(vector_steps)
        games: list[tuple[np.ndarray, np.ndarray]] = []  # Atari: the game's reward, its end
        for t in range(vector_steps):
            clock.lap("other")
            action_E = self._act(explore, t)
            clock.lap("inference")
            next_obs_EO, reward_E, term_E, trunc_E, info = self.env.step(action_E)
            clock.lap("env")
            block.record(action_E, reward_E, next_obs_EO, term_E, trunc_E,
                         info.get("final_obs"))
            if "game_over" in info:
                games.append((info["game_reward"], info["game_over"]))
            self.env_steps += num_envs
        clock.lap("other")
        if games:  # whole games with their own score, not training's lives and clipping
            returns, lengths = self._episodes(*map(np.stack, zip(*games, strict=True)))
        else:
            returns, lengths = self._episodes(block.reward_LE[block.carried: block.steps],
                                              block.done_LE[block.carried: block.steps])
        windows = block.windows()
        data = block.transitions(windows)
        priorities_N = self._score(windows, data) if self.scores else None
        block.carry()
        clock.lap("inference")
        return Chunk(data, vector_steps * num_envs, returns, lengths, self.version,
                     None if self.sample else self.epsilon(self.env_steps), priorities_N)

    def _episodes(self, reward_TE: np.ndarray, done_TE: np.ndarray) -> \
            tuple[list[float], list[int]]:
        """The returns and lengths of the episodes that ended in this chunk's steps (by
        step, then env), from its rewards: one cumulative sum, a few lines an end."""
        cum_TE = np.cumsum(reward_TE, axis=0)
        last_E = np.full(self.env.num_envs, -1)  # the step of each env's last end
        returns, lengths = [], []
        for t, e in zip(*np.nonzero(done_TE), strict=True):
            since = cum_TE[t, e] - (cum_TE[last_E[e], e] if last_E[e] >= 0 else 0.0)
            returns.append(float(self.return_E[e] + since))
            lengths.append(int(self.length_E[e] + t - last_E[e]))
            self.return_E[e], self.length_E[e], last_E[e] = 0.0, 0, t
        before_E = np.where(last_E >= 0, cum_TE[last_E, np.arange(len(last_E))], 0.0)
        self.return_E += cum_TE[-1] - before_E
        self.length_E += len(reward_TE) - 1 - last_E
        return returns, lengths

    def _draws(self, steps: int) -> Exploration | None:
        if self.sample:
            return None
        E = self.env.num_envs
        epsilon_T = np.array([self.epsilon(self.env_steps + t * E) for t in range(steps)])
        return Exploration.draw(epsilon_T, E, self.num_actions, self.rng)

    def _act(self, explore: Exploration | None, t: int) -> np.ndarray:
        if explore is None:
            return sample_logits(self._values(), self.rng)
        if explore.all_explore(t) and not self.scores:  # no forward pass needed
            return explore.random_TE[t]
        return explore.actions(t, self._values())

    def _score(self, w: Windows, data: Transitions) -> np.ndarray:
        """|R + discount * max_a Q(s_end+1, a) - Q(s, a)| of each transition, from the values
        the actor computed to act; the few states it never acted in (every env explored,
        the state after the chunk, a truncated episode's last obs) get one forward pass."""
        block = self.block
        missing = np.flatnonzero(~block.has_values_L[: block.steps + 1])
        if len(missing):
            obs_MO = block.obs_LEO[missing].reshape(-1, *block.obs_shape)
            block.values_LEA[missing] = self._forward(obs_MO).reshape(len(missing), -1,
                                                                         self.num_actions)
            block.has_values_L[missing] = True
        q_K = block.values_LEA[w.start_K, w.env_K, data.action_N]
        next_max_K = block.values_LEA[w.end_K + 1, w.env_K].max(axis=1)
        truncated = w.done_K & (data.discount_N > 0)
        if truncated.any():  # bootstrap from the true last obs, not the reset one
            next_max_K[truncated] = self._forward(data.next_obs_NO[truncated]).max(axis=1)
        target_K = data.reward_N + data.discount_N * next_max_K
        return np.abs(target_K - q_K).astype(np.float32)

    def close(self) -> None:
        self.env.close()
