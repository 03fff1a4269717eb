"""n-step accumulation for E parallel environments.

All envs step together, so one shared ring index ``t % n`` addresses every env's
pending steps. An env with n pending steps emits its oldest one each step (vectorized);
an env whose episode ends flushes all its pending steps (a short Python loop, rare).
"""

from __future__ import annotations

import numpy as np

from qfleet.replay.transitions import Transitions


class NStepAccumulator:
    def __init__(self, n: int, gamma: float, num_envs: int, obs_shape: tuple[int, ...],
                 obs_dtype: np.dtype) -> None:
        self.n, self.gamma, self.num_envs = n, gamma, num_envs
        self.obs_nEO = np.zeros((n, num_envs, *obs_shape), dtype=obs_dtype)
        self.act_nE = np.zeros((n, num_envs), dtype=np.int64)
        self.rew_nE = np.zeros((n, num_envs), dtype=np.float32)
        self.pending_E = np.zeros(num_envs, dtype=np.int64)
        self.t = 0
        self.powers_n = (gamma ** np.arange(n)).astype(np.float32)

    def reset(self) -> None:
        """Drop pending steps (the envs were reset, e.g. after a restore)."""
        self.pending_E[:] = 0

    def step(self, obs_EO: np.ndarray, action_E: np.ndarray, reward_E: np.ndarray,
             next_obs_EO: np.ndarray, terminated_E: np.ndarray,
             truncated_E: np.ndarray) -> Transitions:
        """Record one vector step; ``next_obs_EO`` must hold the true final obs at episode ends.

        Returns the transitions completed by this step (possibly none).
        """
        slot = self.t % self.n
        self.obs_nEO[slot], self.act_nE[slot], self.rew_nE[slot] = obs_EO, action_E, reward_E
        self.pending_E += 1
        self.t += 1
        done_E = terminated_E | truncated_E
        full = self._emit_full(~done_E & (self.pending_E == self.n), next_obs_EO)
        if not done_E.any():
            return full
        parts = [full] + [self._flush(int(e), next_obs_EO[e], bool(terminated_E[e]))
                          for e in np.flatnonzero(done_E)]
        return Transitions.concat(parts)

    def _emit_full(self, mask_E: np.ndarray, next_obs_EO: np.ndarray) -> Transitions:
        envs_K = np.flatnonzero(mask_E)
        oldest = self.t % self.n  # the slot after the newest is the oldest of n
        order_n = (oldest + np.arange(self.n)) % self.n
        rew_nK = self.rew_nE[order_n][:, envs_K]
        self.pending_E[envs_K] -= 1
        return Transitions(
            obs_NO=self.obs_nEO[oldest, envs_K],
            action_N=self.act_nE[oldest, envs_K],
            reward_N=(self.powers_n @ rew_nK).astype(np.float32),
            discount_N=np.full(len(envs_K), self.gamma ** self.n, dtype=np.float32),
            next_obs_NO=next_obs_EO[envs_K])

    def _flush(self, e: int, final_obs_O: np.ndarray, terminated: bool) -> Transitions:
        length = int(self.pending_E[e])
        slots_L = (self.t - length + np.arange(length)) % self.n  # oldest first
        rew_L = self.rew_nE[slots_L, e]
        reward_L = np.zeros(length, dtype=np.float32)
        discount_L = np.zeros(length, dtype=np.float32)
        for i in range(length):
            steps = length - i
            reward_L[i] = self.powers_n[:steps] @ rew_L[i:]
            discount_L[i] = 0.0 if terminated else self.gamma ** steps
        self.pending_E[e] = 0
        return Transitions(
            obs_NO=self.obs_nEO[slots_L, e],
            action_N=self.act_nE[slots_L, e],
            reward_N=reward_L,
            discount_N=discount_L,
            next_obs_NO=np.repeat(final_obs_O[None], length, axis=0))
