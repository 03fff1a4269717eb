"""The processes backends' inbox: one pipe per worker incarnation. A worker that dies in
the middle of a message must not stop the others' messages (with one shared
multiprocessing.Queue it did: the dead writer kept the queue's write lock, and a resumed
run hung), and stopping workers must not wait on a worker blocked on a full pipe."""

from __future__ import annotations

import time
from multiprocessing.connection import Connection

import pytest

from qfleet.runtime.errors import WorkerError
from qfleet.runtime.processes import SHUTDOWN_S, ErrorMsg, Inbox, arrived, context, stop_processes
from qfleet.runtime.shm import Flag


def _send_huge(out: Connection) -> None:
    out.send(b"x" * 50_000_000)  # far more than a pipe holds: blocks mid-message


def _send(out: Connection, *messages: object) -> None:
    for msg in messages:
        out.send(msg)
    out.close()


def _send_until_stopped(out: Connection, stop: Flag, name: int) -> None:
    i = 0
    while not stop.is_set():
        out.send((name, i, b"y" * 1000))  # fills the pipe while nobody reads
        i += 1
    out.close()


def _collect(inbox: Inbox, want: int, timeout_s: float = 20.0) -> list[object]:
    got: list[object] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += inbox.ready(0.05)
    return got


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_worker_killed_mid_message_spoils_only_its_own_pipe(start_method: str) -> None:
    ctx = context(start_method)
    inbox = Inbox(ctx)
    try:
        dying = inbox.start((0, 0), lambda out: ctx.Process(target=_send_huge, args=(out,)))
        assert inbox.readers[(0, 0)].poll(30)  # part of the message is in the pipe
        dying.kill()
        dying.join()
        alive = inbox.start((1, 0), lambda out: ctx.Process(target=_send, args=(out, "a", "b")))
        assert _collect(inbox, 2) == ["a", "b"]
        alive.join(10)
        assert _collect(inbox, 1, timeout_s=0.5) == []  # both pipes ended: nothing more
        assert inbox.readers == {}  # each was dropped at its end, the half message too
    finally:
        inbox.close()


def test_stopping_reads_what_workers_send_so_none_blocks_on_a_full_pipe() -> None:
    ctx = context("fork")
    inbox, stop = Inbox(ctx), Flag(ctx)
    try:
        procs = [inbox.start((i, 0), lambda out, i=i: ctx.Process(  # type: ignore[misc]
            target=_send_until_stopped, args=(out, stop, i))) for i in range(2)]
        time.sleep(1.0)  # nobody reads: both pipes fill and both senders block
        start = time.monotonic()
        stop_processes(procs, stop, inbox)
        assert time.monotonic() - start < SHUTDOWN_S / 2
        assert [p.exitcode for p in procs] == [0, 0]  # they ended, not killed
        held = inbox.ready(0.0)  # what was read while stopping comes first, in order
        for i in range(2):
            numbers = [m[1] for m in held if m[0] == i]
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        assert inbox.ready(0.0) == []
    finally:
        inbox.close()


def test_a_workers_error_reaches_the_main_process_as_its_traceback() -> None:
    ctx = context("fork")
    inbox = Inbox(ctx)
    try:
        proc = inbox.start((3, 2), lambda out: ctx.Process(
            target=_send, args=(out, "before", ErrorMsg(3, 2, "Traceback: boom"))))
        proc.join(10)
        got = []
        failed = "actor 3 \\(incarnation 2\\) failed:\nTraceback: boom"
        with pytest.raises(WorkerError, match=failed):
            for msg in arrived(inbox, True, "actor", time.monotonic() + 20):
                got.append(msg)
        assert got == ["before"]
    finally:
        inbox.close()
