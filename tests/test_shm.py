"""Shared-memory parameters and the stop flag hold no lock a worker could die holding: a
reader killed mid-copy never blocks the publisher, and every copy is one version whole."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import pytest
import torch
from _cli import running
from torch import nn

from qfleet.runtime.shm import Flag, PauseGate, ProcessLock, SharedParams, main_alive


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


def _hold(lock: ProcessLock, held: Any) -> None:
    with lock:
        held.set()
        time.sleep(60)


def _count(lock: ProcessLock, total: Any, times: int, start: Any) -> None:
    start.wait()  # both count at once, however long each took to start
    for _ in range(times):
        with lock:  # a read, a pause, a write: lost updates unless the lock excludes
            seen = total.value
            time.sleep(0.0001)
            total.value = seen + 1


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_process_lock_excludes_and_is_freed_when_its_holder_is_killed(method: str) -> None:
    ctx = mp.get_context(method)
    lock, total, start = ProcessLock(), ctx.Value("q", 0, lock=False), ctx.Barrier(2)
    counters = [ctx.Process(target=_count, args=(lock, total, 200, start), daemon=True)
                for _ in range(2)]
    held = ctx.Event()
    holder = ctx.Process(target=_hold, args=(lock, held), daemon=True)
    procs = [*counters, holder]
    try:
        for p in counters:
            p.start()
        for p in counters:
            p.join(60)
        assert total.value == 400
        holder.start()
        assert held.wait(30)
        holder.kill()  # SIGKILL while it holds the lock
        holder.join(10)
        taken = threading.Event()

        def take() -> None:
            with lock:
                taken.set()

        threading.Thread(target=take, daemon=True).start()
        assert taken.wait(5), "the lock stayed with a dead process"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)


def test_a_worker_killed_holding_the_gates_lock_does_not_stop_a_pause_or_a_turn() -> None:
    ctx = mp.get_context("fork")
    gate, held = PauseGate(2, ctx), ctx.Event()
    holder = ctx.Process(target=_hold, args=(gate.lock, held), daemon=True)
    holder.start()
    try:
        assert held.wait(30)
        holder.kill()
        holder.join(10)
        done = threading.Event()

        def pause_then_turn() -> None:
            with gate.paused(lambda i: False):
                pass
            with gate.turn(1):
                done.set()

        threading.Thread(target=pause_then_turn, daemon=True).start()
        assert done.wait(5), "a dead worker's hold on the gate's lock hung the others"
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(10)
