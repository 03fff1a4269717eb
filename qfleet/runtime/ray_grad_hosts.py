"""The remote half of the Ray backend for gradient schemes: the Ray actors that hold a
GradientWorker (``GradHost``) or the replay every worker shares (``ReplayHost``), and what
they send back, and where the driver places them. The driver half is
``ray_gradients.RayGradientRunner``.

Sync: the workers form a ``torch.distributed`` group (gloo: workers compute on CPU) and
each steps its own replica of the global model on the gathered gradients (``ray_sync``).
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
from qfleet.roles.gradients import Aggregator, Gradient, GradientWorker
from qfleet.runtime.allreduce import replica_tensors
from qfleet.runtime.node_exchange import open_exchange
from qfleet.runtime.ray_common import Host
from qfleet.runtime.ray_sync import FIELDS, Rounds, SyncSeat

CALL_S = 0.02  # async: a call runs work() for at most this long while no gradient comes


@dataclass(frozen=True)
class HostSpec:
    """What a worker process needs; shipped by value (cloudpickle), so a restarted actor
    does not depend on an object that lived on a lost node."""

    make_worker: Callable[[int, int, Replay | None], GradientWorker]
    make_aggregator: Callable[[], Aggregator]  # a sync member's replica
    sync_every: int
    timeout_s: float  # of the process group's rendezvous and of each collective
    # The ReplayHost's actor name (replay.scope shared/sharded), or "": a name, not a
    # handle, since Ray warns that a restartable actor built from a handle may not restart.
    replay: str = ""
    prioritized: bool = False
    budget: int = 0  # sync: the group stops at this many env steps (0: never)
    wait: bool = False  # sync: on_worker_loss = wait (every member's gradient in each step)


@dataclass
class Sent:
    """An async call's result: the counters of each ``work()`` it ran (gradients
    stripped) and the last work's flat gradient, if it computed one."""

    works: list[Gradient] = field(default_factory=list)
    grads_P: np.ndarray | None = None
    has_grad: bool = False


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
        self.seat: SyncSeat | None = None  # sync: this member's replica

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

    def init_group(self, ip: str, port: int, rank: int, world: int,
                   replica: tuple[dict[str, torch.Tensor], str]) -> str:
        """Leave the old process group, join a new one and seat this member on ``replica``
        (tensors, meta); '' when joined, else why not (a member that never came is a
        fault the driver handles by rebuilding again)."""
        if self.seat is not None and self.seat.exchange is not None:
            self.seat.exchange.close()
        if dist.is_initialized():
            with contextlib.suppress(Exception):  # a broken group: we build a new one anyway
                dist.destroy_process_group()
        held = None if self.seat is None else self.seat.held
        self.seat = SyncSeat(self.spec.make_aggregator(), *replica, self.spec.wait)
        self.seat.keep_if_current(held)
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{ip}:{port}", rank=rank,
                                    world_size=world,
                                    timeout=timedelta(seconds=self.spec.timeout_s))
            self.seat.exchange = open_exchange(self.seat.size + FIELDS, self.spec.timeout_s,
                                               ray.get_runtime_context().get_node_id())
        except Exception as err:  # timeouts and lost peers alike
            return _first_line(err)
        return ""

    def _worker(self, incarnation: int) -> GradientWorker:
        """The slot's worker for ``incarnation``, built on its first call."""
        spec, worker = self.spec, self.worker
        if worker is None or worker.actor.incarnation != incarnation:
            if worker is not None:
                worker.close()
            replay = None if not spec.replay else \
                ReplayActorClient(ray.get_actor(spec.replay), spec.prioritized)
            worker = self.worker = spec.make_worker(self.index, incarnation, replay)
            if self.restored is not None and self.restored[0] == incarnation:
                worker.load_state(self.restored[1])
            self.restored = None
            if self.seat is not None:
                self.seat.held = None  # the old incarnation's
        return worker

    def _work(self, incarnation: int, version: int, params: list[ray.ObjectRef]) -> Gradient:
        """One gradient_step, pulling the published parameters if due and they moved."""
        def fetch(held: int) -> ParamSnapshot | None:
            return None if held == version else ray.get(params[0])

        return gradient_step(self._worker(incarnation), fetch, self.spec.sync_every)

    def replay_state(self, incarnation: int) -> dict[str, np.ndarray]:
        """The worker's own replay for a checkpoint ({} if it has none yet)."""
        worker = self.worker
        if worker is None or worker.actor.incarnation != incarnation:
            return {}
        return worker.replay_state()

    def load_state(self, incarnation: int, state: dict[str, np.ndarray]) -> None:
        """What this slot's worker ``incarnation`` starts from when it is built
        (GradientWorker.load_state)."""
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

    def sync_rounds(self, incarnation: int, count: int) -> Rounds:
        """Sync: ``count`` rounds on this member's replica (``ray_sync``); rank 0 hands
        back its model for the driver's evaluations."""
        assert self.seat is not None, "init_group seats a member before its first round"
        worker = self._worker(incarnation)
        out = self.seat.run(worker, self.spec.sync_every, count, self.spec.budget,
                            _first_line)
        if dist.get_rank() == 0:
            out.params = {k: v.detach().clone()
                          for k, v in self.seat.replica.agg.model.state_dict().items()}
        return out

    def replica(self) -> tuple[dict[str, torch.Tensor], str] | None:
        """This member's replica (tensors, meta), or None if it has none."""
        if self.seat is None:
            return None
        replica = self.seat.replica
        return replica_tensors(replica.agg, replica.env_steps)


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
