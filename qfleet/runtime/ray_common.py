"""What both Ray runners share: joining a cluster, placing 1-CPU bundles, and a slot per
restartable Ray actor (probed while Ray restarts it, replaced when Ray will not)."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import (
    ActorDiedError,
    GetTimeoutError,
    ObjectLostError,
    RayActorError,
    RayError,
    RayTaskError,
)
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from qfleet.config import ConfigError
from qfleet.errors import QfleetFailure
from qfleet.runtime.errors import WorkerError

POLL_S = 0.05  # how long the driver waits for results when there is nothing else to do
PLACEMENT_TIMEOUT_S = 120.0
PROBE_S = 0.5  # between probes of an actor that Ray is restarting
STACKS_S = 2.0  # for stalled actors to print their stacks and Ray to forward them
# Ray starts workers at nice 15, so on a machine shared with anything else the actors get
# a fraction of the CPU the processes backend's actors (nice 0) get. Ours are the workload.
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}
CLIENT_TRIES = 3
CLIENT_RETRY_S = 2.0


def connect(address: str, num_actors: int) -> tuple[bool, str | None]:
    """ray.init for runtime.address; (whether this call started/joined Ray, dashboard URL)."""
    if ray.is_initialized():  # the caller (a test, a notebook, a learner actor) chose
        return False, None
    if address == "local":
        # As many CPUs as the machine has, at least one per actor: the processes backend
        # oversubscribes the same way, and a placement group that cannot fit would hang.
        # address="local": a new instance even when another Ray runs on this machine.
        ctx = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_actors),
                       include_dashboard=None, _system_config=LOCAL_SYSTEM_CONFIG)
    elif address.startswith("ray://"):
        ctx = _connect_client(address)
    else:
        ctx = ray.init(address=address)
    return True, getattr(ctx, "dashboard_url", None) or None


def _connect_client(address: str) -> Any:
    """ray.init over Ray Client. The head node starts a server process for each
    connection, and that start can fail on a loaded head (CI saw it once); the next
    connection gets a fresh server on another port, so a failed start is tried again."""
    for attempt in range(1, CLIENT_TRIES + 1):
        try:
            return ray.init(address=address)
        except ConnectionAbortedError as err:
            why = str(err).strip().splitlines()[-1]
            if attempt == CLIENT_TRIES:
                raise QfleetFailure(
                    f"runtime.address = {address!r}: the cluster's Ray Client server failed "
                    f"to start {CLIENT_TRIES} times ({why}); its logs on the head node "
                    f"(ray_client_server_*.err in the session's logs folder) say why") from err
            print(f"qfleet: runtime.address = {address!r}: the cluster's Ray Client server "
                  f"did not start ({why}); trying again ({attempt + 1}/{CLIENT_TRIES})",
                  file=sys.stderr, flush=True)
            time.sleep(CLIENT_RETRY_S)
    raise AssertionError("unreachable")


def place_bundles(count: int, role: str, name: str = "") -> PlacementGroup:
    """One 1-CPU bundle per actor, SPREAD: on distinct nodes where the cluster allows.
    ``name`` lets another process remove it (a placement group outlives the actor that
    made it)."""
    pg = placement_group([{"CPU": 1}] * count, strategy="SPREAD", name=name)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        cpus = ray.cluster_resources().get("CPU", 0)
        raise ConfigError(f"actors.count = {count}: the Ray cluster could not place {count} "
                          f"{role} of 1 CPU each in {PLACEMENT_TIMEOUT_S:.0f} s (it has "
                          f"{cpus:g} CPUs); add nodes or lower actors.count")
    return pg


def in_bundle(remote_class: Any, pg: PlacementGroup, index: int, *args: Any) -> Any:
    """A 1-CPU actor of ``remote_class`` in bundle ``index``. Ray restarts it there when
    it is lost (the bundle moves to a live node if its node died); its calls are not
    retried (max_task_retries=0): the runner decides what is lost."""
    return remote_class.options(
        num_cpus=1, max_restarts=-1, max_task_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=index),
    ).remote(*args)


def this_node() -> NodeAffinitySchedulingStrategy:
    """On the calling process's node. Hard: Ray's soft affinity moves a 0-CPU actor off a
    node without CPUs (a head started with --num-cpus 0) even though it would fit."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


class Host:
    """What every qfleet Ray actor that runs a worker can do besides its work: say where it
    runs, and print its stacks on SIGUSR1 (to its log, which Ray forwards to the driver)."""

    def __init__(self) -> None:
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def where(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), os.getpid()


@dataclass
class Slot:
    """One restartable Ray actor of a role (an actor, a gradient worker).

    After a loss the slot is ``recovering``: it gets no work until a probe call answers,
    since calls made while Ray restarts the actor fail. ``incarnation`` moves with every
    loss, so the new process builds its role with fresh seeds."""

    index: int
    incarnation: int
    handle: Any  # ray.actor.ActorHandle
    recovering: bool = False
    probe: ray.ObjectRef | None = None
    probe_at: float = 0.0  # monotonic time of the next probe
    located: ray.ObjectRef = field(init=False)  # the answer of the actor's ``where()``

    def __post_init__(self) -> None:
        self.located = self.handle.where.remote()

    def lose(self, err: Exception, new_host: Callable[[int], Any]) -> None:
        """The actor's process or node is gone: wait for Ray's restart, or replace the actor
        if Ray will not restart it; the next incarnation gets fresh seeds."""
        self.incarnation += 1
        self.recovering, self.probe, self.probe_at = True, None, 0.0
        if isinstance(err, ActorDiedError):
            self.replace(new_host)

    def result(self, ref: ray.ObjectRef, tag: int, role: str,
               on_lost: Callable[[Exception], None]) -> Any:
        """A call's result, or None when the actor was lost (``on_lost`` runs once per
        incarnation: ``tag`` is the incarnation that made the call). The actor's own code
        raising is a bug: it stops the run with the actor's traceback."""
        try:
            result = ray.get(ref)
        except RayTaskError as err:
            raise WorkerError(f"{role} {self.index} (incarnation {tag}) failed:\n{err}") \
                from None
        except (RayActorError, ObjectLostError) as err:
            if tag == self.incarnation:  # else the loss this call reports is counted
                on_lost(err)
            return None
        return result

    def start_probe(self, call: Callable[[Any], ray.ObjectRef]) -> None:
        if self.recovering and self.probe is None and time.monotonic() >= self.probe_at:
            self.probe = call(self.handle)

    def probed(self, new_host: Callable[[int], Any]) -> None:
        """The probe answered: the actor is back, or still restarting (ask again later),
        or dead for good (a new actor takes the slot)."""
        assert self.probe is not None
        ref, self.probe = self.probe, None
        try:
            ray.get(ref)
        except RayActorError as err:
            self.probe_at = time.monotonic() + PROBE_S
            if isinstance(err, ActorDiedError):
                self.replace(new_host)
            return
        self.recovering = False
        self.located = self.handle.where.remote()  # a restarted actor is a new process

    def replace(self, new_host: Callable[[int], Any]) -> None:
        """A new Ray actor for the slot: Ray will not restart the old one."""
        ray.kill(self.handle, no_restart=True)
        self.handle = new_host(self.index)
        self.located = self.handle.where.remote()


def signal_stacks(slots: list[Slot], indices: list[int], role: str) -> str:
    """Have each slot's actor in ``indices`` print its stacks (SIGUSR1) when it runs on this
    machine; say where the others' are."""
    here, away = ray.util.get_node_ip_address(), []
    for i in indices:
        try:
            ip, pid = ray.get(slots[i].located, timeout=STACKS_S)
        except (RayError, GetTimeoutError):
            away.append(f"{role} {i}: not reachable")
            continue
        if ip != here:
            away.append(f"{role} {i}: pid {pid} on {ip}, in that node's Ray worker log")
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(STACKS_S)  # one at a time; Ray forwards worker logs every second or so
    return f"each {role}'s stack (faulthandler, forwarded by Ray) is printed above" + \
        "".join(f"; {line}" for line in away)


def first_line(err: BaseException, limit: int = 100) -> str:
    return (str(err).strip().splitlines() or [""])[0][:limit]


def remove_named_group(name: str) -> None:
    """Remove the placement group ``name`` if it exists (with every actor placed in it)."""
    with contextlib.suppress(ValueError, RayError):  # never made, or already gone
        remove_placement_group(ray.util.get_placement_group(name))


def teardown(handles: list[Any], pg: PlacementGroup | None, started_ray: bool) -> None:
    """Kill ``handles``, free the placement group, and stop Ray if this run started it."""
    try:
        for handle in handles:
            ray.kill(handle, no_restart=True)
        if pg is not None:
            remove_placement_group(pg)
    except RayError:  # the cluster is already gone: nothing left there to clean up
        pass
    finally:
        if started_ray:
            ray.shutdown()
