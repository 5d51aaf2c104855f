"""Devices, mesh and shardings; multi-host start-up; host arrays -> global arrays.

One code path for every scale: a 1-D mesh with a 'data' axis over all devices of all
processes. Batches are sharded along their first dimension, parameters and optimizer
state are replicated, and `jax.jit` inserts the collectives (gradient and BatchNorm
reductions over the global batch). No pmap.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax.errors import UserError

DATA_AXIS = "data"

# Environment variables that say "this process is one of several" to jax.distributed's
# auto-detection (SLURM, Open MPI, Cloud TPU pods, GKE/JobSet, an explicit coordinator).
_CLUSTER_HINTS = (
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_ADDRESS",
    "JOBSET_NAME",
)


class DistributedError(UserError, ValueError):
    """The multi-process set-up does not match what the config or environment says."""


def _cluster_detected() -> bool:
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return False  # one task of a SLURM job: nothing to coordinate
    if os.environ.get("TPU_WORKER_HOSTNAMES") is not None and "," not in os.environ["TPU_WORKER_HOSTNAMES"]:
        return False  # a single-host TPU VM
    return any(os.environ.get(k) for k in _CLUSTER_HINTS)


def initialize(dist: Mapping[str, Any], timeout_s: int = 300) -> None:
    """Starts jax.distributed as `dist` (the config's `distributed` block) says.

    initialize='never': single process. 'always': call jax.distributed.initialize, with
    the explicit coordinator_address / num_processes / process_id when given, else JAX's
    auto-detection (Cloud TPU, SLURM, Open MPI). 'auto': as 'always' when explicit
    fields are given or a cluster environment is detected, else single process.
    Must run before anything touches jax.devices(). `timeout_s`: how long the processes
    wait for each other to join (JAX's own default; large pods may need more).
    """
    mode = dist.get("initialize", "auto")
    explicit = dist.get("coordinator_address") is not None
    if mode == "never" or jax.distributed.is_initialized():
        return
    if mode == "auto" and not explicit and not _cluster_detected():
        return
    # Multi-process collectives on CPU need an implementation; it does not affect GPU/TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if explicit:
        kwargs = dict(
            coordinator_address=dist["coordinator_address"],
            num_processes=dist["num_processes"],
            process_id=dist["process_id"],
        )
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    except Exception as e:  # JAX raises RuntimeError / ValueError with its own wording
        raise DistributedError(
            f"jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {e}. "
            "Check config.distributed (coordinator_address host:port reachable from every process, "
            "num_processes equal on all, process_id unique) or set config.distributed.initialize='never'."
        ) from e
    expected = dist.get("num_processes")
    if expected is not None and jax.process_count() != expected:
        # Only the coordinator's count is binding; a process told otherwise would
        # compute its share of every batch wrongly.
        raise DistributedError(
            f"config.distributed.num_processes = {expected} but {jax.process_count()} "
            "processes joined; give every process the same num_processes"
        )
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over every device of every process (or the given ones)."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Sharded along `axis` (the batch axis) over the mesh's 'data' axis."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    n = mesh.devices.size
    if size % n:
        raise DistributedError(
            f"{what} = {size} does not divide by the {n} devices of the mesh; use a multiple of {n}"
        )


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array that every process holds in full.

    Each process fills only its addressable shards, so it works unchanged from one
    device to many hosts (the host array is small: indices, CIFAR, statistics).
    """
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def host_local_to_global(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global batch arrays from each process's own rows (a per-host input pipeline).

    Every process passes its share of the global batch (the same leading size on all
    processes: `global batch / process_count`); the rows of process p become rows
    [p * n, (p + 1) * n) of the global arrays, sharded along 'data' over `mesh`, and no
    process ever holds another's rows. Shapes are checked here, not inside a compiled step.
    """
    if not local:
        raise ValueError(
            "host_local_to_global: the batch is empty; pass a dict of arrays such as "
            "{'image': ..., 'label': ...}"
        )
    arrays = {k: np.asarray(v) for k, v in local.items()}
    sizes = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"host_local_to_global: every array needs the same leading (batch) size; got {sizes}"
        )
    rows = next(iter(sizes.values()))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    if local_devices == 0 or rows % local_devices:
        raise ValueError(
            f"host_local_to_global: the local batch of {rows} rows does not divide by this "
            f"process's {local_devices} devices of the mesh; per-host batch must be a multiple "
            f"of {local_devices} (global batch = per-host batch x {jax.process_count()} processes)"
        )
    sharding = batch_sharded(mesh)
    global_rows = rows * jax.process_count()
    return {
        k: jax.make_array_from_process_local_data(sharding, a, (global_rows, *a.shape[1:]))
        for k, a in arrays.items()
    }


def is_main_process() -> bool:
    return jax.process_index() == 0


def describe_devices(devices: Any = None) -> str:
    """What runs where, in words: '1 CPU device (2 cores)', '8 NVIDIA H200 GPUs over 2 processes'."""
    devices = list(jax.devices() if devices is None else devices)
    kinds: dict[str, int] = {}
    for device in devices:
        name = "CPU" if device.platform == "cpu" else f"{device.device_kind} {device.platform.upper()}"
        kinds[name] = kinds.get(name, 0) + 1
    parts = [
        f"{count} {name} device{'s' if count > 1 else ''}"
        if name == "CPU"
        else f"{count} {name}{'s' if count > 1 else ''}"
        for name, count in kinds.items()
    ]
    text = ", ".join(parts)
    if all(device.platform == "cpu" for device in devices):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        text += f" ({cores} core{'s' if cores != 1 else ''})"
    processes = len({device.process_index for device in devices})
    return text + (f" over {processes} processes" if processes > 1 else "")


def prefetch_to_mesh(
    batches: Iterator[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Each process's rows -> global arrays, `size` batches ahead of the consumer.

    The transfers are asynchronous, so while the step runs on batch t the next ones are
    already on their way to the devices.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(host_local_to_global(batch, mesh))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
