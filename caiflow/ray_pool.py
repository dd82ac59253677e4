"""Generation shards on a Ray cluster: actors that keep a step's model loaded and turn records into rows.

::

    flow process (the Prefect step task)            Ray cluster
      for each pending shard: a Prefect task  ──►  ShardActor 0 (GPU 0): model of this step, loaded once
        pool.make(key, factory, records)      ──►  ShardActor 1 (GPU 1): ...
        rows come back; the flow process writes the shard file, the manifest last (as in-process)

A step hands over a `factory`: a picklable callable (a class of the step's module and its settings)
that builds the step's row maker, which loads its model on first use. An actor builds it once per
`key` (step, or step and part such as evaluate's stage; fingerprint; batch) and keeps it for every
later shard of that key, so the model is not reloaded per shard. Ray gives each actor its own GPU
(`num_gpus=1`, through CUDA_VISIBLE_DEVICES) when the cluster has GPUs. Actors run with
`max_restarts=-1` and `max_task_retries=0`: a worker that dies is restarted by Ray, but the shard it
was making fails, so Prefect retries it where the UI shows it.

No Prefect here; `tasks/shards.py` makes each shard a Prefect task. Every Ray node needs this project
installed (the same version) and the storage root mounted at the same path.
"""

from __future__ import annotations

import gc
import logging
import queue
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("caiflow.ray")


class ExecutorError(RuntimeError):
    """The configured executor cannot be used; the message names the fix."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError(
            "generation.executor.kind is 'ray' but Ray is not installed: pip install 'caiflow[ray]' "
            "(or set generation.executor.kind=local)"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when nothing answers at a Ray address (before any step runs)."""
    _ray()
    if address == "auto":
        return  # ray.init finds the local node's cluster or says there is none
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(
            f"generation.executor.address '{address}' is not HOST:PORT: give the head node's address "
            "as printed by `ray start --head`, e.g. 10.0.0.5:6379 (or 'auto')"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ExecutorError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there with "
            f"`ray start --head --port {port}`, or set generation.executor.address to a running head "
            "(or generation.executor.kind=local)"
        ) from None


def connect(address: str) -> Any:
    """Join the Ray cluster at `address` once per process; returns the `ray` module."""
    ray = _ray()
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as exc:
            raise ExecutorError(
                f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]} Start one with "
                "`ray start --head`, or set generation.executor.address"
            ) from None
    return ray


def is_lost_worker(exc: BaseException) -> bool:
    """The Ray worker, actor or node making a shard died (worth a retry); not an error in the step's code."""
    try:
        from ray import exceptions as rex
    except ImportError:
        return False
    if isinstance(exc, rex.RayTaskError):  # the shard's own code raised: a bug, or out of memory
        return False
    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    return isinstance(exc, lost + (rex.LocalRayletDiedError,))


class ShardActor:
    """One Ray actor: the row maker of the current step (its model loaded), and the shards it makes."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.make: Callable[[list[dict[str, Any]]], Any] | None = None
        self.builds = 0  # row makers built (each loads its model once): one per step, not per shard

    def make_rows(
        self,
        key: str,
        factory: Callable[[], Any],
        records: list[dict[str, Any]],
        storage: str,
        point: str,
        fault: str | None,
    ) -> Any:
        from caiflow.faults import kill_worker_once

        if not Path(storage).is_dir():
            raise ExecutorError(
                f"the Ray node {socket.gethostname()} does not see the storage root {storage}: mount the "
                "shared storage at the same path on every node"
            )
        if key != self.key:
            self.release()
            self.make, self.key = factory(), key
            self.builds += 1
        assert self.make is not None
        rows = self.make(records)  # loads the model on the first shard of this step
        kill_worker_once(point, fault, storage)  # tests: die mid-shard, rows made but not returned
        return rows

    def release(self) -> None:
        """Drop the current step's model (the next step loads its own)."""
        from caiflow.faults import free_accelerator_memory

        self.make, self.key = None, None
        gc.collect()
        free_accelerator_memory()

    def devices(self) -> dict[str, Any]:
        """What this actor sees: its host, process and the GPUs Ray assigned to it."""
        import os

        ray = _ray()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "builds": self.builds,
        }


class ShardPool:
    """Actors on a Ray cluster; `make` lends one to a shard, waits for its rows, and takes it back."""

    def __init__(self, address: str, actors: int | None = None, cpus_per_actor: float = 1.0):
        ray = connect(address)
        self.address = address
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
        # One GPU per actor where there are GPUs: Ray sets each actor's CUDA_VISIBLE_DEVICES to its own.
        count = actors or gpus or max(1, int(cpus // cpus_per_actor))
        options = {"num_cpus": cpus_per_actor, "num_gpus": 1 if gpus else 0}
        remote = ray.remote(max_restarts=-1, max_task_retries=0)(ShardActor)
        self.actors = [remote.options(**options).remote() for _ in range(count)]
        self._idle: queue.Queue = queue.Queue()
        for actor in self.actors:
            self._idle.put(actor)
        log.info(
            "Ray cluster at %s: %d actor(s), %s GPU each, %.0f CPU(s) in the cluster",
            address,
            count,
            options["num_gpus"],
            cpus,
        )

    def make(
        self,
        key: str,
        factory: Callable[[], Any],
        records: list[dict[str, Any]],
        storage: str,
        point: str,
        fault: str | None = None,
    ) -> Any:
        """One shard's rows, made by the next free actor (blocks until done; raises what the actor raised)."""
        ray = _ray()
        actor = self._idle.get()
        try:
            return ray.get(actor.make_rows.remote(key, factory, records, storage, point, fault))
        finally:
            self._idle.put(actor)

    def release(self) -> None:
        """Every actor drops its model (after a step), keeping its process for the next step."""
        ray = _ray()
        try:
            ray.get([a.release.remote() for a in self.actors], timeout=60)
        except Exception as exc:  # noqa: BLE001 - a dead actor holds no model
            log.warning("releasing the Ray actors' models: %s", exc)

    def devices(self) -> list[dict[str, Any]]:
        ray = _ray()
        return ray.get([a.devices.remote() for a in self.actors])


_POOLS: dict[tuple[str, int | None, float], ShardPool] = {}


def shard_pool(address: str, actors: int | None = None, cpus_per_actor: float = 1.0) -> ShardPool:
    """The process's pool for these settings (actors are started once and serve every step)."""
    key = (address, actors, cpus_per_actor)
    if key not in _POOLS:
        _POOLS[key] = ShardPool(address, actors, cpus_per_actor)
    return _POOLS[key]
