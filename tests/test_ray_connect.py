"""runtime.address = 'ray://...': a Ray Client server that fails to start on the head
node is tried again, then reported as one line naming the field. ray.init is replaced
here to make the server fail on demand; the real connection is tested end to end in
test_ray_learner.py."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from qfleet.errors import QfleetFailure
from qfleet.runtime import ray_common

ADDRESS = "ray://127.0.0.1:10001"
SERVER_FAILED = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err")


def _init_failing(times: int, calls: list[str]) -> Any:
    def init(address: str, **kwargs: Any) -> Any:
        calls.append(address)
        if len(calls) <= times:
            raise SERVER_FAILED
        return object()
    return init


def test_a_client_server_that_failed_to_start_is_tried_again(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ray, "init", _init_failing(2, calls))
    monkeypatch.setattr(ray_common, "CLIENT_RETRY_S", 0.0)
    started, _ = ray_common.connect(ADDRESS, num_actors=2)
    assert started and calls == [ADDRESS] * 3
    err = capsys.readouterr().err
    assert "trying again (2/3)" in err and "trying again (3/3)" in err
    assert "Starting Ray client server failed" in err


def test_a_client_server_that_never_starts_is_one_line_naming_the_field(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(ray, "init", _init_failing(99, calls))
    monkeypatch.setattr(ray_common, "CLIENT_RETRY_S", 0.0)
    with pytest.raises(QfleetFailure, match=r"runtime.address = 'ray://127.0.0.1:10001'.*"
                                            r"failed to start 3 times"):
        ray_common.connect(ADDRESS, num_actors=2)
    assert len(calls) == ray_common.CLIENT_TRIES


def test_other_connection_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(address: str, **kwargs: Any) -> Any:
        raise ConnectionError("no cluster there")
    monkeypatch.setattr(ray, "init", refused)
    with pytest.raises(ConnectionError, match="no cluster there"):
        ray_common.connect(ADDRESS, num_actors=2)
