"""The Ray backend on a real multi-node Ray cluster on this machine (no mocks of Ray).

One head node without CPUs (so no actor can land there) and two worker nodes of 2 CPUs each:
a PACK placement would put both 1-CPU actors on one node, so the placement assertions can
fail. Every cluster started here is shut down, and its processes are checked to be gone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _runners import (
    closing,
    run_until,
)

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import qfleet  # noqa: E402
from qfleet.algos import build_program  # noqa: E402
from qfleet.config import ConfigError  # noqa: E402
from qfleet.runtime import InlineRunner, RoundReport, WorkerError, make_runner  # noqa: E402
from qfleet.runtime.ray_runner import RayRunner  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
MB = 2**20
# Health checks every 0.5 s: a killed node is declared dead in ~2 s instead of ~30 s.
# Workers at nice 0 (Ray's default is 15), as the runner's local mode starts them.
HEAD: dict[str, Any] = {
    "num_cpus": 0, "object_store_memory": 100 * MB, "include_dashboard": False,
    "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                       "health_check_initial_delay_ms": 0, "worker_niceness": 0}}
WORKER: dict[str, Any] = {"num_cpus": 2, "object_store_memory": 100 * MB}

SMALL = ["actors.count=2", "env.num_envs=2", "actors.chunk_size=8", "learner.learning_starts=64",
         "learner.train_every=32", "learner.updates_per_round=4", "learner.batch_size=16",
         "replay.capacity=2000", "net.hidden=[32]", "actors.sync_every=16",
         "log.progress=false", "log.tensorboard=false", "runtime.backend=ray"]


def _cfg(*extra: str) -> qfleet.Config:
    return qfleet.load_config("cartpole-apex", [*SMALL, *extra])


# ------------------------------------------------------------------ processes and clusters

def _process_table() -> dict[int, int]:
    """pid -> parent pid of every process on the machine (/proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            table[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def _descendants(root: int) -> dict[int, str]:
    """pid -> command line of every process below ``root``."""
    table, found, frontier = _process_table(), set[int](), {root}
    while frontier:
        frontier = {pid for pid, parent in table.items() if parent in frontier} - found
        found |= frontier
    cmdlines = {}
    for pid in found:
        try:
            cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
    return {pid: cmd.decode(errors="replace") for pid, cmd in cmdlines.items()}


def _running(pids: Iterable[int]) -> set[int]:
    """The pids still running (zombies waiting for their parent's wait() do not count)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def assert_all_gone(procs: dict[int, str], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while left := _running(procs):
        if time.monotonic() > deadline:
            raise AssertionError(f"Ray processes left running: "
                                 f"{ {p: procs[p][:80] for p in left} }")
        time.sleep(0.2)


@dataclass
class RayCluster:
    cluster: Cluster
    workers: list = field(default_factory=list)  # ray._private.node.Node of each worker
    procs: dict[int, str] = field(default_factory=dict)  # pid -> cmdline, at teardown


@contextmanager
def ray_cluster(workers: int = 2, head: dict[str, Any] | None = None,
                worker: dict[str, Any] | None = None) -> Iterator[RayCluster]:
    """A head and ``workers`` worker nodes (``HEAD`` / ``WORKER`` updated by ``head`` /
    ``worker``), this process connected as the driver. Always shut down; ``procs`` then
    names every Ray process that was running, for a leak check."""
    old_path = os.environ.get("PYTHONPATH")  # nodes' workers import tests/ray_envs.py
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), old_path]))
    before = set(_descendants(os.getpid()))  # not Ray's: e.g. multiprocessing's tracker
    handle = RayCluster(Cluster(initialize_head=True, head_node_args={**HEAD, **(head or {})}))
    try:
        handle.workers = [handle.cluster.add_node(**{**WORKER, **(worker or {})})
                          for _ in range(workers)]
        handle.cluster.wait_for_nodes()
        ray.init(address=handle.cluster.address)
        yield handle
    finally:
        handle.procs = {pid: cmd for pid, cmd in _descendants(os.getpid()).items()
                        if pid not in before and "multiprocessing.resource_tracker" not in cmd}
        ray.shutdown()
        handle.cluster.shutdown()
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def actors_die(method: str) -> Callable[[Any], Callable[[], None]]:
    """For ``closing``: every actor the runner holds when it closes is killed for good by
    the close (a call of ``method`` on it soon fails instead of running)."""

    def gone(runner: Any) -> Callable[[], None]:
        handles = [s.handle for s in runner.slots]

        def check() -> None:
            for handle in handles:
                assert dies(getattr(handle, method).remote), "an actor outlived runner.close()"

        return check

    return gone


def ray_runner(*extra: str) -> AbstractContextManager[RayRunner]:
    runner = make_runner("ray", build_program(_cfg(*extra)))
    assert isinstance(runner, RayRunner)
    return closing(runner, actors_die("node_id"))


def dies(call: Callable[[], Any], timeout_s: float = 30.0) -> bool:
    """ray.kill does not wait: a call sent right after it may still reach the actor (seen
    on this loaded machine), so ask until a call fails, within a deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(call(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def _shard_sizes(runner: RayRunner | InlineRunner) -> dict[int, int]:
    return {k: len(s) for k, s in runner.replay.shards.items()}  # type: ignore[attr-defined]


# ------------------------------------------------------------------ tests

def test_cluster_processes_are_gone_even_when_the_test_fails() -> None:
    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    with pytest.raises(RuntimeError, match="on purpose"), ray_cluster(workers=1) as handle:
        assert len(ray.nodes()) == 2
        raise RuntimeError("test failed on purpose")
    # The check saw the cluster (the GCS and both raylets at least), and all of it is gone.
    cmdlines = list(handle.procs.values())
    assert sum("raylet" in c for c in cmdlines) >= 2 and any("gcs_server" in c for c in cmdlines)
    assert_all_gone(handle.procs)
    assert not ray.is_initialized()


def test_choosing_ray_without_ray_installed_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'qfleet\[ray\]'"):
        make_runner("ray", build_program(_cfg()))


def test_apex_spreads_actors_over_nodes_and_trains(cluster: RayCluster) -> None:
    with ray_runner() as runner:
        nodes = runner.node_ids()
        workers = {n.node_id for n in cluster.workers}
        assert len(set(nodes)) == 2 and set(nodes) <= workers, (nodes, workers)
        reports = run_until(runner, lambda r, _: r.updates >= 300, 45.0)
        assert runner.updates >= 300 and runner.params_version == runner.learner.version
        assert {a for r in reports for a in r.steps_by_actor} == {0, 1}
        assert all(n > 0 for n in _shard_sizes(runner).values())
        assert not any(r.actor_restarts for r in reports)


def test_restore_gives_each_actor_the_next_incarnation(cluster: RayCluster) -> None:
    with ray_runner() as runner:
        run_until(runner, lambda r, _: len(r.replay) >= 100, 45.0)
        tensors, meta, replay = runner.state(with_replay=True)
        assert [a["incarnation"] for a in meta["actors"]] == [0, 0]
        meta["actors"] = [{"incarnation": 2}, {"incarnation": 7}]
        runner.restore(tensors, meta, replay)
        assert [s.incarnation for s in runner.slots] == [3, 8]
        steps = runner.env_steps
        run_until(runner, lambda r, _: r.env_steps > steps + 100, 45.0)
        assert runner.state(with_replay=False)[1]["actors"] == [{"incarnation": 3},
                                                                {"incarnation": 8}]


def test_actor_exception_stops_the_run_with_the_remote_traceback(cluster: RayCluster) -> None:
    with ray_runner("env.id='ray_envs:ExplodingInRayActor'") as runner, \
            pytest.raises(WorkerError, match="boom from inside the env") as err:
        run_until(runner, lambda *_: False, 30.0)
    assert "ray_envs.py" in str(err.value) and "actor " in str(err.value)


def test_lost_node_actors_come_back_on_surviving_nodes(cluster: RayCluster) -> None:
    try:
        with ray_runner() as runner:
            run_until(runner, lambda r, _: r.updates >= 50 and len(r.replay) >= 300, 45.0)
            nodes = runner.node_ids()
            victim = next(n for n in cluster.workers if n.node_id == nodes[0])
            lost = [i for i, n in enumerate(nodes) if n == victim.node_id]
            before, steps, updates = _shard_sizes(runner), runner.env_steps, runner.updates
            cluster.cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
            cluster.workers.remove(victim)

            def recovered(r: RayRunner, reps: list[RoundReport]) -> bool:
                restarted = [i for i, x in enumerate(reps) if x.actor_restarts]
                after = reps[restarted[0]:] if restarted else []
                return bool(after) and not any(s.recovering for s in r.slots) and \
                    all(any(x.steps_by_actor.get(i) for x in after[1:]) for i in lost)

            reports = run_until(runner, recovered, 60.0)
            assert sum(r.actor_restarts for r in reports) >= len(lost)
            assert any("lost" in note for r in reports for note in r.notes)
            moved = runner.node_ids()
            assert victim.node_id not in moved and set(moved) <= {n.node_id
                                                                 for n in cluster.workers}
            assert [runner.slots[i].incarnation for i in lost] == [1] * len(lost)
            # Delivered data stays, in every shard; training went on.
            assert all(_shard_sizes(runner)[k] >= n for k, n in before.items())
            assert runner.env_steps > steps and runner.updates > updates
    finally:  # give the cluster its second worker back for the tests after this one
        while len(cluster.workers) < 2:
            cluster.workers.append(cluster.cluster.add_node(**WORKER))
        cluster.cluster.wait_for_nodes()


def test_actor_killed_for_good_is_replaced_by_a_new_one(cluster: RayCluster) -> None:
    """ray.kill(no_restart=True): Ray will not bring the actor back, so the runner must."""
    with ray_runner() as runner:
        run_until(runner, lambda r, _: all(n > 0 for n in _shard_sizes(r).values()), 45.0)
        old = runner.slots[1].handle
        ray.kill(old, no_restart=True)
        reports = run_until(runner, lambda r, reps: any(x.actor_restarts for x in reps)
                            and not r.slots[1].recovering, 45.0)
        assert any("ActorDiedError" in note for r in reports for note in r.notes)
        assert runner.slots[1].handle != old and runner.slots[1].incarnation == 1
        steps = runner.env_steps
        run_until(runner, lambda r, reps: any(x.steps_by_actor.get(1) for x in reps)
                  and r.env_steps > steps + 200, 45.0)


def test_cli_trains_and_resumes_on_a_running_cluster(cluster: RayCluster, tmp_path: Path) -> None:
    """``qfleet train/resume`` in their own process join the cluster by runtime.address."""
    import subprocess

    run_dir = tmp_path / "run"
    sets = [*SMALL, f"runtime.address='{cluster.cluster.address}'", "train.eval_episodes=2",
            "train.total_env_steps=1500", "checkpoint.every=500"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qfleet", *args], env=env, text=True,
                              capture_output=True, timeout=120, cwd=tmp_path, check=False)

    first = cli("train", "cartpole-apex", "--run-dir", str(run_dir),
                *[x for s in sets for x in ("--set", s)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run_dir / "result.json").read_text())["env_steps"] >= 1500
    second = cli("resume", str(run_dir), "--set", "train.total_env_steps=3000")
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["env_steps"] >= 3000 and result["updates"] > 0


@pytest.mark.slow
def test_cartpole_apex_learns_on_the_ray_cluster(cluster: RayCluster, tmp_path: Path) -> None:
    cfg = qfleet.load_config("cartpole-apex", ["seed=0", "runtime.backend=ray",
                                               "log.progress=false", "log.tensorboard=false"])
    assert cfg.actors.count == 2
    result = qfleet.train(cfg, tmp_path / "run")
    assert result.eval_return_mean >= 475.0, result
    assert result.env_steps <= cfg.train.total_env_steps
