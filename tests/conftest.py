"""Shared helpers for the foundation tests: small configs and the real ``qfleet`` command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _cli import cli_env as _cli_env
from _runners import one_torch_thread as _one_torch_thread
from hypothesis import settings

from qfleet.config import Config, load_config

# Every Hypothesis test draws the same examples on every run (a test's own @settings may
# add to this): a failure found once is found again, on any machine, without a database.
settings.register_profile("qfleet", derandomize=True, database=None)
settings.load_profile("qfleet")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:  # makes "envs_for_tests:Class" importable
    sys.path.insert(0, str(TESTS_DIR))

# A CartPole run that takes a few seconds: enough rounds to train, log, eval and checkpoint.
FAST_SETS = (
    "train.total_env_steps=2000",
    "learner.learning_starts=500",
    "train.eval_episodes=3",
    "log.tensorboard=false",
    "log.progress=false",
)


def _set_args(sets: Sequence[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


@pytest.fixture(scope="session")
def fast_sets() -> list[str]:
    return list(FAST_SETS)


@pytest.fixture
def make_cfg() -> Callable[..., Config]:
    """``make_cfg("learner.lr=1e-3", ...)``: the cartpole preset, shrunk, plus overrides."""

    def make(*overrides: str, preset: str = "cartpole-dqn") -> Config:
        return load_config(preset, [*FAST_SETS, *overrides])

    return make


CliRunner = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> CliRunner:
    """Run ``python -m qfleet ARGS`` for real; returns the completed process (text).

    ``cwd`` defaults to a scratch folder, so a default ``runs/`` never lands in the repo.
    """
    scratch = tmp_path_factory.mktemp("cli-cwd")

    def run(*args: str, sets: Sequence[str] = (), cwd: Path | None = None,
            timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qfleet", *args, *_set_args(sets)],
                              cwd=cwd or scratch, env=_cli_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)

    return run


@pytest.fixture
def spawn_cli(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start ``python -m qfleet ARGS`` in the background (output to files under tmp_path).

    Every process started here is killed at teardown if the test left it running.
    """
    procs: list[subprocess.Popen[str]] = []
    handles = []

    def spawn(*args: str, sets: Sequence[str] = (), name: str = "proc") -> subprocess.Popen[str]:
        out = (tmp_path / f"{name}.stdout").open("w")
        err = (tmp_path / f"{name}.stderr").open("w")
        handles.extend([out, err])
        proc = subprocess.Popen([sys.executable, "-m", "qfleet", *args, *_set_args(sets)],
                                cwd=tmp_path, env=_cli_env(), stdout=out, stderr=err,
                                text=True)
        procs.append(proc)
        return proc

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for fh in handles:
            fh.close()


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 2, every needle on stderr, and no Python traceback anywhere."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread in this process for a whole module: ``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")`` (see ``_runners.one_torch_thread``)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A Ray cluster for a module's tests (``test_ray.ray_cluster``: a head and two worker
    nodes, this process the driver), shut down after the module; its processes are then
    checked to be gone."""
    from test_ray import assert_all_gone, ray_cluster

    with ray_cluster() as handle:
        yield handle
    assert_all_gone(handle.procs)


@pytest.fixture
def clean_error() -> Callable[..., None]:
    return assert_clean_error


# A CartPole DQN run of a few seconds (inline), trained once per session for the tests that
# only read a run: loading, predicting, exporting, pushing, provenance. Tests write only
# into tmp_path, never into this run.
TINY_SETS = (*FAST_SETS, "train.total_env_steps=1000", "learner.learning_starts=200",
             "net.hidden=[32]", "train.eval_every=0", "checkpoint.every=0")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qfleet.experiment import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    with _one_torch_thread():
        train(load_config("cartpole-dqn", TINY_SETS), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def cartpole_dqn_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Any]:
    """The cartpole-dqn preset trained inline on one seed, once per session: the slow
    lane's DQN test and PER's comparison with DQN read the same run (inline runs are
    deterministic under a seed on one machine), instead of training it twice."""
    from qfleet.experiment import Result, train

    runs: dict[int, Result] = {}

    def run(seed: int) -> Result:
        if seed not in runs:
            cfg = load_config("cartpole-dqn", [f"seed={seed}", "log.tensorboard=false",
                                               "log.progress=false", "checkpoint.every=0"])
            runs[seed] = train(cfg, tmp_path_factory.mktemp(f"dqn-{seed}") / "run")
        return runs[seed]

    return run
