"""Multi-host start-up and the per-host share of a global batch.

`initialize(config)` starts JAX's distributed runtime (one process per host, or per GPU under
SLURM) from the config's `distributed` section, or, where that section is empty, from the
cluster's environment: SLURM, Open MPI and Cloud TPU are detected by JAX itself, and
JAX_COORDINATOR_ADDRESS supplies the coordinator elsewhere. It must run before anything touches a
JAX backend. CPU options (gloo collectives, fake devices) let two processes on one machine stand
in for two hosts in tests.

`batch_shard(sharding, global_shape)` says which block of the global batch this process feeds,
read from the batch sharding itself, so the global batch of a step is the same rows in the same
order whatever the number of hosts (jaxvol.data.pipeline hands each host its block).
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("jaxvol")


def _section(config):
  """config.distributed, or None (configs written before the section existed have none)."""
  if config is None:
    return None
  return config.get("distributed") if hasattr(config, "get") else None


def requested(config) -> bool:
  """True when the config itself asks for a multi-process run (coordinator or process count)."""
  dist = _section(config)
  return bool(dist is not None and (dist.get("coordinator_address") or
                                    int(dist.get("num_processes", 0) or 0) > 0))


def initialize(config=None) -> None:
  """Starts the JAX distributed runtime; every process of the job calls it, before any JAX work.

  Fields of config.distributed that are empty (``""``, 0, -1, ``()``) are left to JAX, which reads
  them from SLURM, Open MPI or Cloud TPU metadata, and the coordinator from
  JAX_COORDINATOR_ADDRESS. Calling it again in a process where the runtime is up does nothing.
  Afterwards processes other than 0 log warnings and errors only.

  Args:
    config: the run's config (its `distributed` section is read) or None for full auto-detection.

  Raises:
    RuntimeError: when the CPU options come after a JAX backend was already started.
  """
  if jax.distributed.is_initialized():
    return
  dist = _section(config)
  kwargs = {}
  if dist is not None:
    _cpu_options(dist)
    if dist.get("coordinator_address"):
      kwargs["coordinator_address"] = str(dist.coordinator_address)
    if int(dist.get("num_processes", 0) or 0) > 0:
      kwargs["num_processes"] = int(dist.num_processes)
    if int(dist.get("process_id", -1)) >= 0:
      kwargs["process_id"] = int(dist.process_id)
    if dist.get("local_device_ids"):
      ids = dist.local_device_ids
      kwargs["local_device_ids"] = [int(i) for i in ((ids,) if isinstance(ids, int) else ids)]
  jax.distributed.initialize(**kwargs)
  if jax.process_index() > 0:
    # One voice per job: hosts other than 0 only report trouble (jaxvol's logger and the root
    # logger, which main.py's messages use).
    log.setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  log.info("distributed: %d processes, %d devices (%d local), coordinator %s",
           jax.process_count(), jax.device_count(), jax.local_device_count(),
           kwargs.get("coordinator_address", "auto-detected"))


def _cpu_options(dist) -> None:
  """Applies the CPU-only settings; they take effect only before the CPU backend starts."""
  collectives = dist.get("cpu_collectives", "")
  num_cpu = int(dist.get("num_cpu_devices", 0) or 0)
  if not collectives and num_cpu <= 0:
    return
  if jax._src.xla_bridge.backends_are_initialized():  # pylint: disable=protected-access
    raise RuntimeError("config.distributed.cpu_collectives / num_cpu_devices must be applied "
                       "before JAX starts a backend: call distributed.initialize() first")
  if collectives:
    # Without them the CPU backend refuses computations that span processes.
    jax.config.update("jax_cpu_collectives_implementation", str(collectives))
  if num_cpu > 0:
    jax.config.update("jax_num_cpu_devices", num_cpu)


def batch_shard(sharding, global_shape) -> tuple[int, int]:
  """(index, count) of the block of batch rows this process feeds, for a batch-sharded array.

  The process's devices hold some rows of the global batch; for
  `jax.make_array_from_process_local_data` the process passes exactly those rows, full size along
  the other axes. Rows must form one contiguous block (true of meshes built from `jax.devices()`,
  which lists each host's devices together); hosts that share rows (a spatial axis across hosts)
  share the block index and so feed identical data.

  Args:
    sharding: the batch sharding (a NamedSharding over the global mesh).
    global_shape: the global batch shape; axis 0 is the batch.

  Returns:
    (index, count): the process feeds rows [index * n, (index + 1) * n) with
    n = global_shape[0] // count.

  Raises:
    ValueError: when this process's rows are not one contiguous block of equal-sized blocks.
  """
  batch = int(global_shape[0])
  rows = set()
  for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
    rows.update(range(*index[0].indices(batch)) if index else range(batch))
  rows = sorted(rows)
  start, n = rows[0], len(rows)
  if rows != list(range(start, start + n)) or batch % n or start % n:
    raise ValueError(
        f"process {jax.process_index()} holds batch rows {rows} of {batch}: a host must feed one "
        "contiguous block; build the mesh from jax.devices() (each host's devices together)")
  return start // n, batch // n
