"""n-step transitions for E parallel envs, computed once per chunk instead of once per step.

An actor records each vector step into preallocated arrays (a few copies, no allocation)
and calls ``emit`` at the chunk's end: one vectorized pass finds, for every start step k
and env e, where its n-step window ends (n steps later, or at the episode's end, whichever
comes first) and emits the windows that ended inside this chunk. The last n - 1 steps are
carried over, since their windows end in the next chunk.

``NStepAccumulator`` (one step at a time) is the reference: ``emit`` returns the same
transitions in the same order (by the step where the window ends; at one step, full windows
before episode ends; then by env, oldest first).

With ``num_values`` the block also keeps one row of values per state (an actor's Q-values,
which score Ape-X's initial priorities without a second forward pass), carried with the
states; ``has_values_L`` says which states have them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qfleet.replay.transitions import Transitions


@dataclass
class Windows:
    """Where each emitted transition came from: its start step, env and last step (indices
    into the block's arrays as they were at ``emit``), and whether the episode ended there."""

    start_K: np.ndarray
    env_K: np.ndarray
    end_K: np.ndarray
    done_K: np.ndarray


class NStepBlock:
    def __init__(self, n: int, gamma: float, num_envs: int, obs_shape: tuple[int, ...],
                 obs_dtype: np.dtype, num_values: int = 0) -> None:
        self.n, self.gamma, self.num_envs = n, gamma, num_envs
        self.obs_shape, self.obs_dtype, self.num_values = obs_shape, obs_dtype, num_values
        self.powers_n = gamma ** np.arange(n)
        self.steps = 0  # recorded steps in the arrays, the carried ones first
        self.carried = 0  # of which came from the last chunk
        self._allocate(n - 1 + 64)

    STATES = ("obs_LEO", "values_LEA", "has_values_L")  # one row per state: steps + 1
    STEPS = ("final_LEO", "action_LE", "reward_LE", "term_LE", "done_LE")

    def _allocate(self, size: int) -> None:
        """Arrays for ``size`` steps (and size + 1 states), keeping what is recorded."""
        old = {name: getattr(self, name) for name in self.STATES + self.STEPS} \
            if hasattr(self, "size") else {}
        E, obs_shape = self.num_envs, self.obs_shape
        self.size = size
        # [k]: the state step k acted in; [k + 1] the one after it (a reset obs after an end)
        self.obs_LEO = np.zeros((size + 1, E, *obs_shape), self.obs_dtype)
        self.values_LEA = np.zeros((size + 1, E, self.num_values), np.float32)
        self.has_values_L = np.zeros(size + 1, bool)
        # the true last obs where an episode ended at step k
        self.final_LEO = np.zeros((size, E, *obs_shape), self.obs_dtype)
        self.action_LE = np.zeros((size, E), np.int64)
        self.reward_LE = np.zeros((size, E))  # float64, as envs give them: exact returns
        self.term_LE = np.zeros((size, E), bool)
        self.done_LE = np.zeros((size, E), bool)
        for name, array in old.items():
            keep = self.steps + (name in self.STATES)
            getattr(self, name)[:keep] = array[:keep]

    def begin(self, obs_EO: np.ndarray) -> None:
        """Start over from freshly reset envs: nothing pending."""
        self.steps = self.carried = 0
        self.obs_LEO[0] = obs_EO
        self.has_values_L[0] = False

    def reserve(self, steps: int) -> None:
        """Room for ``steps`` more steps before the next ``emit``."""
        if self.steps + steps > self.size:
            self._allocate(self.steps + steps)

    @property
    def obs_EO(self) -> np.ndarray:
        """The state the next step acts in (a view: valid until the next ``record``)."""
        return self.obs_LEO[self.steps]

    def record(self, action_E: np.ndarray, reward_E: np.ndarray, next_obs_EO: np.ndarray,
               term_E: np.ndarray, trunc_E: np.ndarray,
               final_obs: np.ndarray | None) -> None:
        """One vector step (``final_obs``: the true last obs of the envs that ended, by env,
        as a SAME_STEP autoreset vector env gives it)."""
        k = self.steps
        self.action_LE[k] = action_E
        self.reward_LE[k] = reward_E
        self.term_LE[k] = term_E
        done_E = np.logical_or(term_E, trunc_E, out=self.done_LE[k])
        self.obs_LEO[k + 1] = next_obs_EO
        self.has_values_L[k + 1] = False
        if final_obs is not None and done_E.any():
            for e in np.flatnonzero(done_E):
                self.final_LEO[k, e] = final_obs[e]
        self.steps = k + 1

    def windows(self) -> Windows:
        """The n-step windows that end in the steps recorded since the last ``emit``."""
        K, n = self.steps, self.n
        steps_K1 = np.arange(K)[:, None]
        done_KE = self.done_LE[:K]
        ends_at_KE = np.where(done_KE, steps_K1, K + n)
        next_end_KE = np.minimum.accumulate(ends_at_KE[::-1], axis=0)[::-1]
        end_KE = np.minimum(steps_K1 + n - 1, next_end_KE)
        start_K, env_K = np.nonzero((end_KE < K) & (end_KE >= self.carried))
        end_K = end_KE[start_K, env_K]
        done_K = done_KE[end_K, env_K]
        # by end step, full windows before ended ones, env, start: one int key, one argsort
        key_K = ((end_K * 2 + done_K) * self.num_envs + env_K) * K + start_K
        order = np.argsort(key_K, kind="stable")
        return Windows(start_K[order], env_K[order], end_K[order], done_K[order])

    def transitions(self, w: Windows) -> Transitions:
        span_K = w.end_K - w.start_K + 1  # steps folded in: 1 .. n
        offset_n = np.arange(self.n)
        at_Kn = np.minimum(w.start_K[:, None] + offset_n, self.steps - 1)
        reward_Kn = np.where(offset_n < span_K[:, None], self.reward_LE[at_Kn, w.env_K[:, None]],
                             0.0)
        reward_K = (reward_Kn @ self.powers_n).astype(np.float32)
        term_K = self.term_LE[w.end_K, w.env_K]
        discount_K = np.where(term_K, 0.0, self.gamma ** span_K).astype(np.float32)
        next_obs_KO = self.obs_LEO[w.end_K + 1, w.env_K]
        if w.done_K.any():
            next_obs_KO[w.done_K] = self.final_LEO[w.end_K[w.done_K], w.env_K[w.done_K]]
        return Transitions(self.obs_LEO[w.start_K, w.env_K], self.action_LE[w.start_K, w.env_K],
                           reward_K, discount_K, next_obs_KO)

    def carry(self) -> None:
        """Keep the last n - 1 steps (their windows are still open) and the current state."""
        K = self.steps
        keep = min(self.n - 1, K)
        for name in self.STATES + self.STEPS:
            extra = name in self.STATES  # keep + 1 states: the current one too
            array = getattr(self, name)
            array[: keep + extra] = array[K - keep: K + extra]
        self.steps = self.carried = keep

    def emit(self) -> Transitions:
        """The transitions completed since the last emit; the open windows carry over."""
        out = self.transitions(self.windows())
        self.carry()
        return out
