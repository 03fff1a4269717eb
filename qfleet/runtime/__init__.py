"""Backends: place roles and move data between them; they never import a loss."""

from __future__ import annotations

import importlib.util

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.config import Config, ConfigError
from qfleet.runtime.base import LearnerSide, RayOptions, RoundReport, Runner
from qfleet.runtime.errors import WorkerError
from qfleet.runtime.grad_processes import ProcessesGradientRunner
from qfleet.runtime.inline import InlineGradientRunner, InlineRunner
from qfleet.runtime.processes import ProcessesRunner

__all__ = ["InlineGradientRunner", "InlineRunner", "LearnerSide", "ProcessesGradientRunner",
           "ProcessesRunner", "RayOptions", "RoundReport", "Runner", "WorkerError",
           "make_runner", "ray_options"]


def ray_options(cfg: Config) -> RayOptions:
    rt = cfg.runtime
    return RayOptions(address=rt.address, replay_on=rt.replay_on,
                      sample_requests=rt.sample_requests, learner_host=rt.learner_host,
                      learner_device=cfg.learner.device, torch_threads=rt.torch_threads)


def make_runner(backend: str, program: ActorLearnerProgram | GradientProgram,
                options: RayOptions | None = None, start_method: str = "auto") -> Runner:
    """``options``: what the ray backend reads (the address, where the replay and the
    learner go); ``start_method``: how the processes backend starts its workers."""
    if backend == "ray":
        return _ray_runner(program, options or RayOptions())
    if isinstance(program, GradientProgram):
        if backend == "inline":
            return InlineGradientRunner(program)
        if backend == "processes":
            return ProcessesGradientRunner(program, start_method)
    elif backend == "inline":
        return InlineRunner(program)
    elif backend == "processes":
        return ProcessesRunner(program, start_method)
    raise _unknown_backend(backend)


def _ray_runner(program: ActorLearnerProgram | GradientProgram, options: RayOptions) -> Runner:
    _require_ray()
    if options.learner_host == "actor":
        from qfleet.runtime.ray_learner import RemoteRunner

        return RemoteRunner(program, options)
    if isinstance(program, GradientProgram):
        from qfleet.runtime.ray_gradients import RayGradientRunner

        return RayGradientRunner(program, options)
    from qfleet.runtime.ray_runner import RayRunner

    return RayRunner(program, options)


def _require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("runtime.backend = 'ray' needs Ray, which is not installed: "
                          "pip install 'qfleet[ray]'")


def _unknown_backend(backend: str) -> ConfigError:
    return ConfigError(f"runtime.backend = {backend!r}: allowed: 'inline', 'processes', 'ray'")
