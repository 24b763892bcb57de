"""jaxvol.train.distributed: config -> jax.distributed.initialize arguments, per-host batch blocks.

The real multi-process run is tests/test_multihost.py; these check the pieces without one.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvol import config as base
from jaxvol.train import distributed


@pytest.fixture
def captured(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  return calls


def test_empty_section_leaves_everything_to_jax(captured):
  c = base.base_config()
  assert not distributed.requested(c)
  distributed.initialize(c)
  distributed.initialize(None)
  assert captured == [{}, {}]  # SLURM / Open MPI / TPU / JAX_COORDINATOR_ADDRESS detection


def test_config_fields_become_arguments(captured):
  c = base.base_config()
  c.distributed.coordinator_address = "10.0.0.1:1234"
  c.distributed.num_processes = 4
  c.distributed.process_id = 3
  c.distributed.local_device_ids = (0, 1)
  assert distributed.requested(c)
  distributed.initialize(c)
  assert captured == [dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                           local_device_ids=[0, 1])]


def test_cpu_options_after_backend_start_are_a_clear_error(captured):
  jax.devices()  # the backend is up, as in any test process
  c = base.base_config()
  c.distributed.num_cpu_devices = 2
  with pytest.raises(RuntimeError, match="before JAX starts a backend"):
    distributed.initialize(c)
  assert not captured


class _Rows:
  """A stand-in sharding whose local devices hold the given batch rows."""

  def __init__(self, *row_slices):
    self.row_slices = row_slices

  def addressable_devices_indices_map(self, shape):
    return {i: (s,) + (slice(None),) * (len(shape) - 1) for i, s in enumerate(self.row_slices)}


def test_batch_shard_reads_the_rows_of_this_process():
  shape = (8, 4, 4, 4, 1)
  assert distributed.batch_shard(_Rows(slice(4, 6), slice(6, 8)), shape) == (1, 2)
  assert distributed.batch_shard(_Rows(slice(2, 4)), shape) == (1, 4)
  # Depth sharded across hosts: both hold all rows, feed the whole batch.
  assert distributed.batch_shard(_Rows(slice(0, 8)), shape) == (0, 1)
  with pytest.raises(ValueError, match="contiguous"):
    distributed.batch_shard(_Rows(slice(0, 2), slice(4, 6)), shape)
  if len(jax.devices()) >= 4:
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "spatial"))
    assert distributed.batch_shard(NamedSharding(mesh, P("data", "spatial")), shape) == (0, 1)
