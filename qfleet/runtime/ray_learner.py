"""The learner in a Ray actor (``runtime.learner_host = "actor"``).

The whole learner side of a Ray run (the learner or the gradient schemes' aggregator,
with the replay beside it and the driver loop of ``RayRunner`` / ``RayGradientRunner``)
moves into one ``LearnerHost`` actor that declares its resources: 1 CPU, and 1 GPU when
``learner.device`` is cuda, or auto and the cluster has a GPU, reserved as the bundle of
its own placement group. Ray then places it on a node with a free GPU and hands it that
GPU. The qfleet process keeps the experiment loop
(metrics, evals, checkpoints on its own disk) and talks to the host through ``RemoteRunner``,
one call per round.

The host is not restarted: the learner's state is the run, and a restarted learner would
silently train from scratch. A lost host ends the run with a WorkerError that names the
last checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qfleet.algos.program import ActorLearnerProgram, GradientProgram
from qfleet.compute import pin_torch
from qfleet.config import ConfigError
from qfleet.runtime.base import RayOptions, RoundReport
from qfleet.runtime.errors import WorkerError
from qfleet.runtime.ray_common import (
    PLACEMENT_TIMEOUT_S,
    connect,
    first_line,
    remove_named_group,
    teardown,
)
from qfleet.runtime.ray_gradients import RayGradientRunner
from qfleet.runtime.ray_runner import RayRunner

Program = ActorLearnerProgram | GradientProgram


class LearnerHost:
    """A RayRunner or RayGradientRunner inside a Ray actor."""

    def __init__(self, program: Program, options: RayOptions) -> None:
        pin_torch(options.torch_threads)
        self.runner: RayRunner | RayGradientRunner = (
            RayGradientRunner(program, options) if isinstance(program, GradientProgram)
            else RayRunner(program, options))

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "device": str(next(self.runner.policy_net.parameters()).device)}

    def step(self) -> tuple[RoundReport, int, int]:
        report = self.runner.step()
        return report, self.runner.env_steps, self.runner.updates

    def describe(self) -> str:
        return self.runner.describe()

    def replay_size(self) -> int:
        return self.runner.replay_size

    def policy_state(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.runner.policy_net.state_dict().items()}

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, Any]]:
        tensors, meta, replay = self.runner.state(with_replay)
        return {k: v.cpu() for k, v in tensors.items()}, meta, replay

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, Any]) -> tuple[int, int]:
        self.runner.restore(tensors, meta, replay)
        return self.runner.env_steps, self.runner.updates

    def freeze(self) -> None:
        self.runner.freeze()

    def dump_stacks(self, workers: list[int]) -> str:
        return self.runner.dump_stacks(workers)

    def close(self) -> None:
        self.runner.close()


RemoteLearnerHost = ray.remote(LearnerHost)


def learner_gpus(device: str) -> int:
    """GPUs the learner actor asks Ray for, from ``learner.device``."""
    if device.startswith("cuda"):
        return 1
    if device == "auto":
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    return 0


class RemoteRunner:
    """The qfleet process's side: a runner whose every method is a call to the host."""

    def __init__(self, program: Program, options: RayOptions) -> None:
        self.program = program
        self.started_ray, dashboard = connect(options.address, program.num_actors + 1)
        self.notes = [f"ray: dashboard at http://{dashboard}"] if dashboard else []
        self.env_steps = self.updates = 0
        self.net = program.make_eval_net()
        # Named, so this process can remove the actors' placement group if the host dies:
        # the group outlives the actor that made it (the actors in it do not).
        options = dataclasses.replace(options, group_name=f"qfleet-{uuid.uuid4().hex[:12]}")
        self.group_name = options.group_name
        self.gpus = learner_gpus(options.learner_device)
        have = ray.cluster_resources().get("GPU", 0)
        if self.gpus > have:
            self.close()
            raise ConfigError(f"learner.device = {options.learner_device!r}: the learner "
                              f"actor asks Ray for a GPU and the cluster has {have:g}; use "
                              "'auto' or 'cpu', or add a GPU node")
        try:
            # max_restarts=0: a restarted learner would train on from scratch; see above.
            self.pg = self._place()
            self.host = RemoteLearnerHost.options(
                num_cpus=1, num_gpus=self.gpus, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=0),
            ).remote(program, options)
            self.info: dict[str, Any] = self._call("info", timeout=PLACEMENT_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.notes.append(f"ray: learner actor on node {self.info['node_id'][:12]}, device "
                          f"{self.info['device']}, GPUs {self.info['gpu_ids'] or 'none'}")

    def _place(self) -> PlacementGroup:
        """The learner's bundle: 1 CPU, and its GPU if it asks for one."""
        bundle = {"CPU": 1.0, **({"GPU": float(self.gpus)} if self.gpus else {})}
        pg = placement_group([bundle], name=f"{self.group_name}-learner")
        if not ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)[0]:
            remove_placement_group(pg)
            cpus, gpus = (ray.cluster_resources().get(k, 0) for k in ("CPU", "GPU"))
            raise ConfigError(f"runtime.learner_host = 'actor': the Ray cluster could not "
                              f"place a learner of 1 CPU and {self.gpus} GPU in "
                              f"{PLACEMENT_TIMEOUT_S:.0f} s (it has {cpus:g} CPUs, {gpus:g} "
                              "GPUs, some maybe taken)")
        return pg

    def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        try:
            return ray.get(getattr(self.host, method).remote(*args), timeout=timeout)
        except RayTaskError as err:  # the learner side raised (a worker's bug, a config)
            raise WorkerError(f"the learner actor failed:\n{err}") from None
        except GetTimeoutError:
            raise WorkerError(f"the learner actor did not answer {method}() in "
                              f"{timeout:.0f} s") from None
        except (RayActorError, ObjectLostError) as err:
            raise WorkerError(f"the learner actor was lost ({type(err).__name__}: "
                              f"{first_line(err, 300)}); the run stops") from None

    def step(self) -> RoundReport:
        report: RoundReport
        report, self.env_steps, self.updates = self._call("step")
        report.notes, self.notes = self.notes + report.notes, []
        return report

    def describe(self) -> str:
        text: str = self._call("describe")
        return text

    @property
    def replay_size(self) -> int:
        size: int = self._call("replay_size")
        return size

    @property
    def policy_net(self) -> torch.nn.Module:
        self.net.load_state_dict(self._call("policy_state"))
        return self.net

    def state(self, with_replay: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                                dict[str, Any]]:
        state: tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] = \
            self._call("state", with_replay)
        return state

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                replay: dict[str, Any]) -> None:
        self.env_steps, self.updates = self._call("restore", tensors, meta, replay)

    def dump_stacks(self, workers: list[int]) -> str:
        return str(self._call("dump_stacks", workers, timeout=30.0))

    def freeze(self) -> None:
        self._call("freeze")

    def close(self) -> None:
        host = self.__dict__.pop("host", None)
        if host is not None:
            # The host tears its actors down (a lost host's are gone with their owner).
            with contextlib.suppress(RayActorError, RayTaskError, GetTimeoutError,
                                     ObjectLostError):
                ray.get(host.close.remote(), timeout=60)
        if "group_name" in self.__dict__:
            remove_named_group(self.group_name)
        teardown([] if host is None else [host], self.__dict__.pop("pg", None),
                 self.started_ray)
        self.started_ray = False
