"""The remote half of the Ray backend for gradient schemes: the Ray actors that hold a
GradientWorker (``GradHost``) or the replay every worker shares (``ReplayHost``), and what
they send back, and where the driver places them. The driver half is
``ray_gradients.RayGradientRunner``.

Sync averaging is a ``torch.distributed`` all_reduce among the workers (gloo: workers
compute on CPU). Every member contributes the same vector in every round, also a worker
whose replay is still filling (zeros, counted 0) or whose own code raised (it raises only
after the collective): so a round never leaves a peer waiting for a member that will not
come. The vector carries the gradient weighted by its rows and three counters (gradients in
it, their staleness, rows), so the sum is all the driver needs for the mean over all rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from qfleet.compute import pin_torch
from qfleet.replay import Batch, Replay, Transitions
from qfleet.replay import describe as describe_replay
from qfleet.roles import ParamSnapshot, gradient_step
from qfleet.roles.gradients import Gradient, GradientWorker
from qfleet.runtime.ray_common import Host

CALL_S = 0.02  # async: a call runs work() for at most this long while no gradient comes
# after the gradient in a reduced vector: included, staleness sum, rows
COUNTERS = 3


@dataclass(frozen=True)
class HostSpec:
    """What a worker process needs; shipped by value (cloudpickle), so a restarted actor
    does not depend on an object that lived on a lost node."""

    make_worker: Callable[[int, int, Replay | None], GradientWorker]
    num_params: int  # of the global online net: the length of a flat gradient
    sync_every: int
    timeout_s: float  # of the process group's rendezvous and of each collective
    # The ReplayHost's actor name (replay.scope shared/sharded), or "": a name, not a
    # handle, since Ray warns that a restartable actor built from a handle may not restart.
    replay: str = ""
    prioritized: bool = False


@dataclass
class Sent:
    """One call's result: the counters of each ``work()`` it ran (gradients stripped) and
    one flat vector: async, the last work's gradient; sync, on rank 0 only, the reduced
    sum with its counters. ``failed``: sync, the collective failed (a peer was lost)."""

    works: list[Gradient] = field(default_factory=list)
    grads_P: np.ndarray | None = None
    has_grad: bool = False  # the last work computed a gradient
    failed: str = ""


def _stripped(grad: Gradient) -> Gradient:
    return dataclasses.replace(grad, grads_P=None)


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


class GradHost(Host):
    """One gradient-worker slot in a Ray worker process. The GradientWorker is built on
    the first call and rebuilt whenever the driver's incarnation for the slot moves."""

    def __init__(self, spec: HostSpec, index: int) -> None:
        super().__init__()
        pin_torch(1)
        self.spec, self.index = spec, index
        self.worker: GradientWorker | None = None
        self.restored: tuple[int, dict[str, np.ndarray]] | None = None  # incarnation, replay

    def info(self) -> dict[str, Any]:
        joined = dist.is_initialized()
        return {"node_id": ray.get_runtime_context().get_node_id(), "dist": joined,
                "backend": dist.get_backend() if joined else "",
                "world_size": dist.get_world_size() if joined else 0,
                "rank": dist.get_rank() if joined else -1}

    def address(self) -> tuple[str, int]:
        """Where rank 0 will host the group's rendezvous: this node's IP, a free port."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
        return ray.util.get_node_ip_address(), port

    def init_group(self, ip: str, port: int, rank: int, world: int) -> str:
        """Leave the old process group and join a new one; '' when joined, else why not
        (a member that never came is a fault the driver handles by rebuilding again)."""
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group: we build a new one anyway
                dist.destroy_process_group()
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{ip}:{port}", rank=rank,
                                    world_size=world,
                                    timeout=timedelta(seconds=self.spec.timeout_s))
        except Exception as err:  # timeouts and lost peers alike
            return _first_line(err)
        return ""

    def _work(self, incarnation: int, version: int, params: list[ray.ObjectRef]) -> Gradient:
        """One gradient_step of the slot's worker for ``incarnation`` (built on its first
        call), pulling the published parameters if due and they moved."""
        spec, worker = self.spec, self.worker
        if worker is None or worker.actor.incarnation != incarnation:
            if worker is not None:
                worker.close()
            replay = None if not spec.replay else \
                ReplayActorClient(ray.get_actor(spec.replay), spec.prioritized)
            worker = self.worker = spec.make_worker(self.index, incarnation, replay)
            if self.restored is not None and self.restored[0] == incarnation:
                worker.load_replay_state(self.restored[1])
            self.restored = None

        def fetch(held: int) -> ParamSnapshot | None:
            return None if held == version else ray.get(params[0])

        return gradient_step(worker, fetch, spec.sync_every)

    def replay_state(self, incarnation: int) -> dict[str, np.ndarray]:
        """The worker's own replay for a checkpoint ({} if it has none yet)."""
        worker = self.worker
        if worker is None or worker.actor.incarnation != incarnation:
            return {}
        return worker.replay_state()

    def load_replay_state(self, incarnation: int, state: dict[str, np.ndarray]) -> None:
        """Fill the replay of this slot's worker ``incarnation`` when it is built."""
        self.restored = (incarnation, state)

    def work(self, incarnation: int, version: int, params: list[ray.ObjectRef]) -> Sent:
        """Async / grouped: at most one gradient per call (the driver's gate sees each
        as it comes); while the replay fills, several works per call for CALL_S, since a
        Ray call costs about as much CPU as a CartPole chunk."""
        sent, t_end = Sent(), time.monotonic() + CALL_S
        while True:
            grad = self._work(incarnation, version, params)
            sent.works.append(_stripped(grad))
            if grad.grads_P is not None:
                sent.grads_P, sent.has_grad = grad.grads_P.numpy(), True
                return sent
            if time.monotonic() >= t_end:
                return sent

    def sync_step(self, incarnation: int, version: int, params: list[ray.ObjectRef]) -> Sent:
        """Sync: one work() and one all_reduce of its (weighted) gradient; rank 0 returns
        the sum for the driver's aggregator, which takes the one optimizer step."""
        error: Exception | None = None
        grad = None
        try:
            grad = self._work(incarnation, version, params)
        except Exception as err:  # raised after the collective
            error = err
        vec_P = self._contribution(grad, version)
        try:
            dist.all_reduce(vec_P)
        except Exception as err:  # a peer lost or timed out: a fault
            if error is not None:
                raise error from None
            return Sent([_stripped(grad)] if grad else [], failed=_first_line(err))
        if error is not None:  # our own code raised: a bug, after the peers got their sum
            raise error
        assert grad is not None
        leader = dist.get_rank() == 0
        return Sent([_stripped(grad)], vec_P.numpy() if leader else None,
                    grad.grads_P is not None)

    def _contribution(self, grad: Gradient | None, version: int) -> torch.Tensor:
        size = self.spec.num_params
        vec_P = torch.zeros(size + COUNTERS)
        if grad is None or grad.grads_P is None:
            return vec_P
        # Sync averages every member's gradient, however many updates old its parameters
        # are (GradientGate applies no staleness rule to a group of all workers).
        staleness = version - grad.base_version
        # Weighted by its rows, as the gate weights it: the driver divides the sum by the
        # total rows, so the step is the mean over all rows even when rollouts differ in
        # length (rows 0 = unknown: equal weights).
        rows = float(grad.rows or 1)
        vec_P[:size] = grad.grads_P * rows
        vec_P[size], vec_P[size + 1], vec_P[size + 2] = 1.0, float(staleness), rows
        return vec_P


class ReplayHost:
    """The replay every worker shares (replay.scope shared/sharded), in one Ray actor."""

    def __init__(self, make_replay: Callable[[], Replay]) -> None:
        self.replay = make_replay()

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None,
            shard: int | None) -> None:
        self.replay.add(chunk, priorities_N, shard=shard)

    def sample(self, batch_size: int) -> Batch:
        return self.replay.sample(batch_size)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        self.replay.update_priorities(indices_B, td_abs_B)

    def size(self) -> int:
        return len(self.replay)

    def describe(self) -> tuple[str, bool]:
        return describe_replay(self.replay), self.replay.prioritized

    def state(self, with_replay: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(the sampling rng's state, the replay's arrays if asked) for a checkpoint."""
        rng = dict(self.replay.rng.bit_generator.state)
        return rng, self.replay.state_dict() if with_replay else {}

    def restore(self, rng: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.replay.rng.bit_generator.state = rng
        if arrays:
            self.replay.load_state_dict(arrays)


class ReplayActorClient:
    """What a worker calls ``replay`` when the replay is a ReplayHost. Writes and priority
    updates do not wait; a Ray actor runs one caller's calls in order, so the size (and
    the batch) a worker asks for next already includes them."""

    def __init__(self, handle: Any, prioritized: bool) -> None:
        self.handle, self.prioritized = handle, prioritized
        self.rng = np.random.default_rng(0)  # unused: the ReplayHost draws the samples
        self.unchecked: list[ray.ObjectRef] = []  # writes whose errors are not seen yet

    def __len__(self) -> int:
        refs, self.unchecked = [*self.unchecked, self.handle.size.remote()], []
        return int(ray.get(refs)[-1])

    @property
    def capacity(self) -> int:
        raise NotImplementedError("the shared replay's capacity is the ReplayHost's")

    @property
    def nbytes(self) -> int:
        return 0  # the arrays live in the ReplayHost

    def add(self, chunk: Transitions, priorities_N: np.ndarray | None = None,
            shard: int | None = None) -> None:
        self.unchecked.append(self.handle.add.remote(chunk, priorities_N, shard))

    def sample(self, batch_size: int) -> Batch:
        batch: Batch = ray.get(self.handle.sample.remote(batch_size))
        # Arrays from the object store are read-only views: the loss wants its own.
        data = batch.data.map(np.array)
        weights = None if batch.weights_B is None else np.array(batch.weights_B)
        return Batch(data, np.array(batch.indices_B), weights)

    def update_priorities(self, indices_B: np.ndarray, td_abs_B: np.ndarray) -> None:
        self.unchecked.append(self.handle.update_priorities.remote(
            indices_B, td_abs_B.astype(np.float32)))

    def state_dict(self) -> dict[str, np.ndarray]:
        raise NotImplementedError("the driver checkpoints the shared replay")

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        raise NotImplementedError("the driver checkpoints the shared replay")
