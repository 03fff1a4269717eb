"""Two "hosts" made by the test: network namespaces joined by a veth pair, a Ray head node
in one (no CPUs, so no actor can run there) and a worker node in the other. ``qfleet train``
runs in the head's namespace with runtime.address naming the head's IP, so every chunk and
parameter crosses the veth link: nothing in the Ray backend may assume one host.

Needs root and iproute2 (skipped otherwise). Every process started in the namespaces is
killed by pid at teardown (never ``ray stop``, which would stop other Ray clusters on the
machine), and the namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

TESTS_DIR = Path(__file__).resolve().parent
RAY = Path(sys.executable).with_name("ray")
PORT = 6379

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not RAY.exists(),
    reason="needs root, iproute2 and the ray command")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                         timeout=30)
    return [int(p) for p in out.stdout.split()]


def _kill_all_in(name: str) -> None:
    deadline = time.monotonic() + 15
    while pids := _netns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes left in netns {name}: {pids}"
        time.sleep(0.2)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """Ray's session folders hold unix sockets, whose paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qfray", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str, str]]:
    """(namespace a, namespace b, head IP): namespaces joined by a veth pair."""
    tag = f"qf{os.getpid() % 100000}"
    ns_a, ns_b, subnet = f"{tag}a", f"{tag}b", f"10.{77 + os.getpid() % 100}.{os.getpid() % 250}"
    created: list[str] = []
    try:
        for ns in (ns_a, ns_b):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", f"{tag}va", "type", "veth", "peer", "name", f"{tag}vb")
        for ns, dev, host in ((ns_a, f"{tag}va", 1), (ns_b, f"{tag}vb", 2)):
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ns_a, ns_b, f"{subnet}.1"
    finally:
        for ns in created:
            _kill_all_in(ns)
            _ip("netns", "del", ns)  # takes the veth pair with it


def test_apex_trains_across_two_network_namespaces(two_hosts: tuple[str, str, str],
                                                   short_tmp: Path, tmp_path: Path) -> None:
    ns_a, ns_b, head_ip = two_hosts
    # Token authentication (Ray's default for clusters): every node and the driver share one
    # token, made here (`ray start` no longer writes one, Ray >= 2.60); PYTHONPATH so
    # qfleet imports the same in every process.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR)])}

    def in_ns(ns: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], env=env, text=True,
                              capture_output=True, timeout=timeout, check=False, cwd=tmp_path)

    common = ["--object-store-memory=100000000", "--disable-usage-stats"]
    head = in_ns(ns_a, str(RAY), "start", "--head", f"--node-ip-address={head_ip}",
                 f"--port={PORT}", "--num-cpus=0", "--include-dashboard=false",
                 f"--temp-dir={short_tmp / 'a'}", *common)
    assert head.returncode == 0, head.stderr[-2000:]
    worker_ip = head_ip.rsplit(".", 1)[0] + ".2"
    worker = in_ns(ns_b, str(RAY), "start", f"--address={head_ip}:{PORT}",
                   f"--node-ip-address={worker_ip}", "--num-cpus=2",
                   f"--temp-dir={short_tmp / 'b'}", *common)
    assert worker.returncode == 0, worker.stderr[-2000:]
    run_dir = tmp_path / "run"
    sets = ["runtime.backend=ray", f"runtime.address='{head_ip}:{PORT}'",
            "train.total_env_steps=2000", "train.eval_episodes=2", "log.tensorboard=false",
            "log.progress=false", "learner.learning_starts=500"]
    train = in_ns(ns_a, sys.executable, "-m", "qfleet", "train", "cartpole-apex", "--run-dir",
                  str(run_dir), *[x for s in sets for x in ("--set", s)], timeout=180)
    assert train.returncode == 0, train.stderr[-3000:]
    # The head has no CPUs, so the placement group could only put the 1-CPU actors in the
    # other namespace: every env step below crossed the veth link as an object-store chunk.
    result = json.loads((run_dir / "result.json").read_text())
    assert result["env_steps"] >= 2000 and result["updates"] > 0
