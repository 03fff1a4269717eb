"""The shared-memory all_gather of sync members on one machine (runtime.node_exchange),
between real processes in a real gloo group: every member's vector, round after round,
with members late to post or to read; the same result as gloo's all_gather; a member
that stops posting; members on different machines (gloo stays); no file left behind."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from qfleet.runtime.node_exchange import open_exchange

SIZE = 5000
ROUNDS = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _vector(r: int, rank: int) -> torch.Tensor:
    return torch.arange(SIZE, dtype=torch.float32) * (r + 1) + rank


def _member(rank: int, world: int, port: int, node: str, mode: str, out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    try:
        exchange = open_exchange(SIZE, 2.0, node)
        if exchange is None:
            out.put((rank, "gloo"))
            return
        if mode == "quit":  # member 1 never posts round 1
            out.put((rank, "quit") if rank == 1 else (rank, exchange.all_gather(
                torch.zeros(SIZE))))
            return
        bad = 0
        for r in range(1, ROUNDS + 1):
            late = rank == r % world  # one member late in each round, in turn
            if late:
                time.sleep(0.002)
            got = exchange.all_gather(_vector(r, rank))
            if late:  # reads its views while the others post the next round
                time.sleep(0.002)
            bad += sum(not torch.equal(a, _vector(r, k)) for k, a in enumerate(got))
        want = [torch.empty(SIZE) for _ in range(world)]
        dist.all_gather(want, _vector(ROUNDS, rank))  # gloo agrees on the last round
        got = [g.clone() for g in exchange.all_gather(_vector(ROUNDS, rank))]
        bad += sum(not torch.equal(a, b) for a, b in zip(got, want, strict=True))
        out.put((rank, bad))
    except TimeoutError as err:
        out.put((rank, f"timeout: {err}"))
    finally:
        dist.destroy_process_group()


def _run(world: int, nodes: list[str], mode: str = "") -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), _free_port()
    members = [ctx.Process(target=_member, args=(r, world, port, nodes[r], mode, out),
                           daemon=True) for r in range(world)]
    for p in members:
        p.start()
    try:
        return dict(out.get(timeout=120) for _ in range(world))
    finally:
        for p in members:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _files() -> set[str]:
    return set(glob.glob("/dev/shm/qfleet-sync-*"))


@pytest.mark.parametrize("world", [2, 3])
def test_every_round_gathers_what_gloo_gathers(world: int) -> None:
    before = _files()
    assert _run(world, ["here"] * world) == {r: 0 for r in range(world)}
    assert _files() == before  # unlinked once every member mapped it


def test_a_member_that_stops_posting_times_the_round_out() -> None:
    result = _run(2, ["here", "here"], mode="quit")
    assert result[1] == "quit"
    assert str(result[0]).startswith("timeout: a member did not post round 1")


def test_members_on_different_machines_keep_gloo() -> None:
    assert _run(2, ["node-a", "node-b"]) == {0: "gloo", 1: "gloo"}


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_the_file_is_gone_even_when_a_member_fails_to_open_it() -> None:
    before = _files()
    _run(2, ["here", "here"], mode="quit")
    assert _files() == before
