"""The learner in a Ray actor (``runtime.learner_host = "actor"``) on a real multi-node Ray
cluster on this machine: a head without CPUs (serving Ray Client on a free port), a 2-CPU
worker, and a 2-CPU worker that declares one GPU. What is tested is that the learner asks
for it, Ray places the learner there and hands it over; where torch sees CUDA the learner
computes on it, elsewhere (the GPU a Ray resource only) on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from _runners import closing, run_until  # noqa: E402
from test_ray import SMALL, TESTS_DIR, WORKER, RayCluster, assert_all_gone, ray_cluster  # noqa: E402

import qfleet  # noqa: E402
from qfleet.algos import build_program  # noqa: E402
from qfleet.config import Config, ConfigError  # noqa: E402
from qfleet.experiment import Experiment, resume  # noqa: E402
from qfleet.runtime import RayOptions, WorkerError, make_runner  # noqa: E402
from qfleet.runtime.ray_learner import RemoteRunner  # noqa: E402

GRAD_SMALL = ["actors.count=2", "env.num_envs=1", "actors.chunk_size=4", "net.hidden=[32]",
              "learner.batch_size=16", "learner.learning_starts=32", "replay.capacity=5000",
              "log.progress=false", "log.tensorboard=false", "runtime.backend=ray"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[tuple[RayCluster, str, int]]:
    """(cluster, the GPU node's id, the Ray Client port)."""
    port = _free_port()
    with ray_cluster(workers=1, head={"ray_client_server_port": port}) as handle:
        gpu_node = handle.cluster.add_node(**WORKER, num_gpus=1)
        handle.cluster.wait_for_nodes()
        handle.workers.append(gpu_node)
        yield handle, gpu_node.node_id, port
    assert_all_gone(handle.procs)


def _remote(preset: str, device: str, *extra: str) -> AbstractContextManager[RemoteRunner]:
    small = GRAD_SMALL if "gorila" in preset else SMALL
    cfg = qfleet.load_config(preset, [*small, *extra])
    runner = make_runner("ray", build_program(cfg),
                         RayOptions(learner_host="actor", learner_device=device))
    assert isinstance(runner, RemoteRunner)
    return closing(runner)


def _all_cpus_free(timeout_s: float = 30.0) -> bool:
    """Every CPU of the cluster is back: no actor or bundle of a run is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def test_learner_actor_asks_for_the_gpu_and_lands_on_its_node(
        gpu_cluster: tuple[RayCluster, str, int]) -> None:
    _, gpu_node, _ = gpu_cluster
    with _remote("cartpole-apex", "auto") as runner:
        assert runner.gpus == 1 and runner.info["node_id"] == gpu_node
        # learner.device = "auto": CUDA where torch sees it (Ray hands the actor GPU 0),
        # else the CPU; on a machine without CUDA the GPU is a Ray resource only.
        expected = "cuda:0" if torch.cuda.is_available() else "cpu"
        assert runner.info["gpu_ids"] == ["0"] and runner.info["device"] == expected
        table = ray.util.placement_group_table(runner.pg)  # reserved as its own bundle
        assert table["bundles"] == {0: {"CPU": 1.0, "GPU": 1.0}}, table
        assert table["bundles_to_node_id"][0] == gpu_node
        before = [p.detach().clone() for p in runner.policy_net.parameters()]
        reports = run_until(runner, lambda r, _: r.updates >= 100, 60.0)
        assert runner.env_steps == sum(r.env_steps for r in reports) > 0
        assert any("learner actor on node" in n for r in reports for n in r.notes)
        after = list(runner.policy_net.parameters())  # fetched from the learner actor
        assert any(not (a == b).all() for a, b in zip(after, before, strict=True))
    assert _all_cpus_free() and ray.available_resources().get("GPU", 0) == 1


def test_cpu_learner_asks_for_no_gpu(gpu_cluster: tuple[RayCluster, str, int]) -> None:
    with _remote("cartpole-apex", "cpu") as runner:
        assert runner.gpus == 0 and runner.info["gpu_ids"] == []
        run_until(runner, lambda r, _: r.updates >= 20, 60.0)


def test_async_gradients_go_through_the_aggregator_actor(
        gpu_cluster: tuple[RayCluster, str, int]) -> None:
    _, gpu_node, _ = gpu_cluster
    with _remote("cartpole-gorila-async", "auto") as runner:
        assert runner.info["node_id"] == gpu_node
        # Both workers' gradients arrive (on a loaded machine one may start seconds later).
        reports = run_until(runner, lambda r, reps: r.updates >= 100 and {
            w for x in reps for w in x.steps_by_actor} == {0, 1}, 90.0)
        assert sum(r.grads_applied for r in reports) >= 100


def test_more_gpus_than_the_cluster_has_is_a_clear_error(
        gpu_cluster: tuple[RayCluster, str, int], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = qfleet.load_config("cartpole-apex", SMALL)
    monkeypatch.setattr("qfleet.runtime.ray_learner.learner_gpus", lambda device: 2)
    with pytest.raises(ConfigError, match=r"learner\.device = 'cuda'.*cluster has 1"):
        make_runner("ray", build_program(cfg),
                    RayOptions(learner_host="actor", learner_device="cuda"))


def _experiment_cfg(tmp: Path, total: int) -> Config:
    return qfleet.load_config("cartpole-apex", [
        *SMALL, "runtime.learner_host='actor'", f"train.total_env_steps={total}",
        "checkpoint.every=400", "train.eval_every=0", "train.eval_episodes=2"])


def test_lost_learner_stops_the_run_naming_a_checkpoint_that_resumes(
        gpu_cluster: tuple[RayCluster, str, int], tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    exp = Experiment(_experiment_cfg(tmp_path, 100_000), run_dir)
    assert isinstance(exp.runner, RemoteRunner)
    host = exp.runner.host

    def kill_after_first_checkpoint() -> None:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "latest").exists() and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        ray.kill(host, no_restart=True)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    with pytest.raises(WorkerError, match="learner actor was lost") as err:
        exp.run()
    killer.join()
    assert "last checkpoint:" in str(err.value) and "qfleet resume" in str(err.value)
    assert _all_cpus_free()  # the learner's actors went with it
    result = resume(run_dir, _experiment_cfg(tmp_path, 1200))
    assert result.env_steps >= 1200 and result.updates > 0


def _client_server_logs(handle: RayCluster) -> str:
    """The head node's Ray Client server logs: why a connection's server did not start."""
    logs = Path(handle.cluster.head_node.get_logs_dir_path())
    return "".join(f"\n--- {path.name}:\n{path.read_text(errors='replace')[-1500:]}"
                   for path in sorted(logs.glob("ray_client_server*.err")))


def test_cli_over_ray_client_with_the_learner_on_the_cluster(
        gpu_cluster: tuple[RayCluster, str, int], tmp_path: Path) -> None:
    """``runtime.address = 'ray://host:port'``: the qfleet process is a Ray Client; the
    learner actor and the actors run on the cluster."""
    handle, _, port = gpu_cluster
    run_dir = tmp_path / "run"
    sets = [*SMALL, f"runtime.address='ray://127.0.0.1:{port}'", "runtime.learner_host='actor'",
            "runtime.replay_on='actors'", "train.total_env_steps=1500", "train.eval_episodes=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}
    proc = subprocess.run(
        [sys.executable, "-m", "qfleet", "train", "cartpole-apex", "--run-dir", str(run_dir),
         *[x for s in sets for x in ("--set", s)]],
        env=env, text=True, capture_output=True, timeout=180, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:] + _client_server_logs(handle)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["env_steps"] >= 1500 and result["updates"] > 0
    assert _all_cpus_free()
