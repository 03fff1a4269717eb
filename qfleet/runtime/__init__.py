"""Backends: place roles and move data between them; they never import a loss."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Union

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.config import ConfigError
from qfleet.runtime.base import LearnerSide, RoundReport
from qfleet.runtime.grad_processes import ProcessesGradientRunner
from qfleet.runtime.inline import InlineGradientRunner, InlineRunner
from qfleet.runtime.processes import ProcessesRunner, WorkerError

if TYPE_CHECKING:  # ray is an optional extra: imported only when the backend is chosen
    from qfleet.runtime.ray_gradients import RayGradientRunner
    from qfleet.runtime.ray_runner import RayRunner

Runner = Union[InlineRunner, ProcessesRunner, "RayRunner",  # a string: ray may be absent
               InlineGradientRunner, ProcessesGradientRunner, "RayGradientRunner"]

__all__ = ["InlineGradientRunner", "InlineRunner", "LearnerSide", "ProcessesGradientRunner",
           "ProcessesRunner", "RoundReport", "Runner", "WorkerError", "make_runner"]


def make_runner(backend: str, program: ActorLearnerProgram | GradientProgram,
                address: str = "local") -> Runner:
    if isinstance(program, GradientProgram):
        return _gradient_runner(backend, program, address)
    if backend == "inline":
        return InlineRunner(program)
    if backend == "processes":
        return ProcessesRunner(program)
    if backend == "ray":
        _require_ray()
        from qfleet.runtime.ray_runner import RayRunner

        return RayRunner(program, address)
    raise _unknown_backend(backend)


def _gradient_runner(backend: str, program: GradientProgram, address: str) -> Runner:
    if backend == "inline":
        return InlineGradientRunner(program)
    if backend == "processes":
        return ProcessesGradientRunner(program)
    if backend == "ray":
        _require_ray()
        from qfleet.runtime.ray_gradients import RayGradientRunner

        return RayGradientRunner(program, address)
    raise _unknown_backend(backend)


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("runtime.backend = 'ray' needs Ray, which is not installed: "
                          "pip install 'qfleet[ray]'")


def _unknown_backend(backend: str) -> ConfigError:
    return ConfigError(f"runtime.backend = {backend!r}: allowed: 'inline', 'processes', 'ray'")
