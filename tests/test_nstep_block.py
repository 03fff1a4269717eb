"""The chunk-at-once n-step block against the step-at-a-time accumulator (the reference):
the same transitions in the same order, over chunks of every length, episode ends of both
kinds, chunk boundaries inside open windows and envs reset mid-stream; and the initial
priorities an Ape-X actor gives from the Q-values it acted with, against |TD| computed
afresh on the same transitions with the same network."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qfleet
from qfleet.algos import build_program
from qfleet.algos.program import ActorLearnerProgram
from qfleet.losses import TorchBatch, td_abs
from qfleet.replay import NStepAccumulator, Transitions
from qfleet.replay.nstep_block import NStepBlock
from qfleet.roles.actor import Chunk
from qfleet.roles.params import ParamSnapshot

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OBS = (2,)


def _same(got: Transitions, want: Transitions) -> None:
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.obs_NO, want.obs_NO)
    np.testing.assert_array_equal(got.action_N, want.action_N)
    np.testing.assert_allclose(got.reward_N, want.reward_N, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.discount_N, want.discount_N)
    np.testing.assert_array_equal(got.next_obs_NO, want.next_obs_NO)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_block_emits_what_the_accumulator_emits(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    E, gamma = 3, 0.9
    ref = NStepAccumulator(n, gamma, E, OBS, np.dtype(np.float32))
    block = NStepBlock(n, gamma, E, OBS, np.dtype(np.float32))
    counter = iter(range(1, 10**9))

    def fresh_obs() -> np.ndarray:  # every obs distinct, so a wrong row cannot pass
        return np.array([[next(counter), e] for e in range(E)], np.float32)

    obs_EO = fresh_obs()
    block.begin(obs_EO)
    total = 0
    for chunk in range(30):
        if chunk % 11 == 10:  # envs reset from outside (a restore): nothing carries over
            obs_EO = fresh_obs()
            ref.reset()
            block.begin(obs_EO)
        steps = int(rng.integers(1, 8))  # shorter and longer than n
        block.reserve(steps)
        want: list[Transitions] = []
        for _ in range(steps):
            action_E = rng.integers(0, 4, E)
            reward_E = rng.normal(size=E).astype(np.float32)
            term_E = rng.random(E) < 0.12
            trunc_E = ~term_E & (rng.random(E) < 0.08)
            final_EO = fresh_obs()  # the true last obs where an episode ended
            next_EO = fresh_obs()  # a reset obs there, the next obs elsewhere
            real_next_EO = np.where((term_E | trunc_E)[:, None], final_EO, next_EO)
            want.append(ref.step(obs_EO, action_E, reward_E, real_next_EO, term_E, trunc_E))
            block.record(action_E, reward_E, next_EO, term_E, trunc_E, final_EO)
            obs_EO = next_EO
        got = block.emit()
        _same(got, Transitions.concat(want))
        np.testing.assert_array_equal(block.obs_EO, obs_EO)
        total += len(got)
    assert total > 100


def test_a_long_chunk_grows_the_block_and_keeps_what_it_carries() -> None:
    n, E = 3, 2
    ref = NStepAccumulator(n, 0.5, E, OBS, np.dtype(np.float32))
    block = NStepBlock(n, 0.5, E, OBS, np.dtype(np.float32))
    obs_EO = np.zeros((E, 2), np.float32)
    block.begin(obs_EO)
    for steps in (5, 300, 4):  # 300 is past the block's first size
        block.reserve(steps)
        want = []
        for t in range(steps):
            nxt = obs_EO + 1
            no_E = np.zeros(E, bool)
            want.append(ref.step(obs_EO, np.full(E, t % 3), np.ones(E, np.float32), nxt,
                                 no_E, no_E))
            block.record(np.full(E, t % 3), np.ones(E, np.float32), nxt, no_E, no_E, None)
            obs_EO = nxt
        _same(block.emit(), Transitions.concat(want))


def _apex_actor(*overrides: str) -> tuple[ActorLearnerProgram, qfleet.Config]:
    cfg = qfleet.load_config("cartpole-apex", ["env.num_envs=3", "actors.count=1",
                                               "algo.n_step=3", "log.progress=false",
                                               "log.tensorboard=false", *overrides])
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    return program, cfg


def _scored_afresh(chunk: Chunk, net: torch.nn.Module) -> None:
    """The chunk's priorities are |TD| computed afresh on its transitions with ``net``."""
    data, t = chunk.transitions, torch.from_numpy
    batch = TorchBatch(t(data.obs_NO), t(data.action_N), t(data.reward_N),
                       t(data.discount_N), t(data.next_obs_NO), weights_B=None)
    with torch.no_grad():
        want_N = td_abs(net, batch, double=True).numpy()
    assert chunk.priorities_N is not None and len(chunk.priorities_N) == len(data)
    np.testing.assert_allclose(chunk.priorities_N, want_N, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("limit", [0, 7])  # 7: many truncated episodes to bootstrap from
def test_an_apex_actor_scores_each_transition_with_its_td_error(limit: int) -> None:
    program, cfg = _apex_actor(f"env.max_episode_steps={limit}")
    actor = program.make_actor(0, 0)
    try:
        chunks = [actor.collect(cfg.actors.chunk_size) for _ in range(6)]
    finally:
        actor.close()
    truncated = 0
    for chunk in chunks:
        data = chunk.transitions
        _scored_afresh(chunk, actor.net)
        # a window shorter than n that bootstraps: its episode was truncated
        truncated += int((data.discount_N > np.float32(cfg.algo.gamma ** 3) * 1.0001).sum())
    assert (truncated > 0) == (limit > 0)


def test_a_plain_dqn_actor_does_not_score() -> None:
    cfg = qfleet.load_config("cartpole-dqn", ["log.progress=false", "log.tensorboard=false"])
    program = build_program(cfg)
    assert isinstance(program, ActorLearnerProgram)
    actor = program.make_actor(0, 0)
    try:
        assert actor.collect(8).priorities_N is None
    finally:
        actor.close()


def test_new_parameters_rescore_the_state_the_last_chunk_ended_in() -> None:
    """n = 1 carries no steps, only the current state: after a pull, every transition of
    the next chunk is scored by the new parameters alone, that state's values included."""
    program, cfg = _apex_actor("algo.n_step=1")
    actor = program.make_actor(0, 0)
    try:
        actor.collect(cfg.actors.chunk_size)
        new = {k: v + 0.05 * torch.randn_like(v) for k, v in actor.net.state_dict().items()}
        actor.set_params(ParamSnapshot(1, new))
        chunk = actor.collect(cfg.actors.chunk_size)
    finally:
        actor.close()
    _scored_afresh(chunk, actor.net)
