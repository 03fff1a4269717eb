"""Shared-memory parameters and the stop flag hold no lock a worker could die holding: a
reader killed mid-copy never blocks the publisher, and every copy is one version whole."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

import torch
from _cli import running
from torch import nn

from qfleet.runtime.shm import Flag, SharedParams, main_alive


def _net(value: float) -> nn.Module:
    net = nn.Linear(64, 64)
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
    return net


def _reader(params: SharedParams, stop: Flag, out: Any) -> None:
    torn, held = 0, -1
    while not stop.is_set():
        snap = params.pull(held)
        if snap is None:
            continue
        held = snap.version
        values = torch.cat([v.reshape(-1) for v in snap.params.values()]).unique()
        torn += int(len(values) != 1 or float(values[0]) != snap.version)
    out.put(torn)


def test_every_pull_is_one_whole_version_while_the_publisher_writes() -> None:
    ctx = mp.get_context("fork")
    params, stop, out = SharedParams(_net(0), ctx), Flag(ctx), ctx.Queue()
    nets = [_net(v) for v in range(2)]
    reader = ctx.Process(target=_reader, args=(params, stop, out), daemon=True)
    reader.start()
    try:
        for version in range(1, 3000):
            params.publish(nets[version % 2].requires_grad_(False), version)
            with torch.no_grad():  # the next publish writes a new constant
                for p in nets[version % 2].parameters():
                    p.fill_(version + 2)
        stop.set()
        assert out.get(timeout=30) == 0, "a pull mixed two versions"
    finally:
        stop.set()
        reader.join(timeout=10)


def test_readers_killed_mid_copy_never_block_the_publisher() -> None:
    ctx = mp.get_context("fork")
    params, stop, out = SharedParams(_net(0), ctx), Flag(ctx), ctx.Queue()
    net = _net(1)
    t0 = time.monotonic()
    for version in range(1, 30):
        reader = ctx.Process(target=_reader, args=(params, stop, out), daemon=True)
        reader.start()
        time.sleep(0.01)  # busy pulling (and reading the flag) when it is killed
        assert reader.pid is not None
        os.kill(reader.pid, signal.SIGKILL)
        reader.join(timeout=10)
        params.publish(net, version)
        stop.set()
        assert stop.is_set()
        stop.clear()
    assert time.monotonic() - t0 < 30
    assert params.pull(-1) is not None and int(params.version.value) == 29


def _pulling_worker(params: SharedParams) -> None:
    """An actor's loop, reduced to its parameter pulls."""
    while main_alive():
        params.pull(-1)


def _main_killed_mid_publish(pids: Any) -> None:
    ctx = mp.get_context("fork")
    params = SharedParams(_net(0), ctx)
    params.publish(_net(0), 0)  # a version the worker has not got: it pulls
    worker = ctx.Process(target=_pulling_worker, args=(params,))
    worker.start()
    pids.put(worker.pid)
    params.seq.value += 1  # a publish begins (seq odd) and never ends: SIGKILL
    time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_exits_when_main_is_killed_in_the_middle_of_a_publish() -> None:
    ctx = mp.get_context("fork")
    pids = ctx.Queue()
    main = ctx.Process(target=_main_killed_mid_publish, args=(pids,))
    main.start()
    worker_pid = pids.get(timeout=30)
    main.join(timeout=30)
    try:
        deadline = time.monotonic() + 10
        while running(worker_pid):
            assert time.monotonic() < deadline, "the worker spins on a publish that never ends"
            time.sleep(0.05)
    finally:
        if running(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
