"""Device mesh with ("data", "spatial", "model") axes and the shardings the train step uses.

Batches (B, D, H, W, C) shard B on "data" and the depth axis D on "spatial" (XLA inserts the
convolution halos), the layout jaxvol.parallel.sharding's logical rules give a volume. Parameters and
optimizer state are replicated for the U-Net methods unless config.mesh.state_sharding splits them
over "data" x "spatial" (ZeRO-1 / FSDP); the residual DiT's large kernels (and their moments) are
sharded over "model" (jaxvol.parallel.sharding).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "spatial", "model")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the mesh; mesh_cfg.data = -1 takes every device the other axes leave."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  spatial, model = int(mesh_cfg.spatial), int(mesh_cfg.model)
  data = int(mesh_cfg.data)
  if data == -1:
    if n % (spatial * model):
      raise ValueError(f"{n} devices cannot be split into spatial={spatial} x model={model}")
    data = n // (spatial * model)
  if data * spatial * model > n:
    raise ValueError(f"mesh data={data} x spatial={spatial} x model={model} needs more than the "
                     f"{n} available devices")
  devices = devices[: data * spatial * model]  # an explicit smaller mesh uses the first devices
  grid = np.asarray(devices, dtype=object).reshape(data, spatial, model)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data", "spatial"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(mesh: Mesh, batch_size: int, crop_size) -> None:
  """Clear errors for batch/crop sizes the mesh cannot split evenly."""
  if batch_size % mesh.shape["data"]:
    raise ValueError(f"global batch {batch_size} is not divisible by the data axis "
                     f"({mesh.shape['data']} devices)")
  if mesh.shape["data"] % jax.process_count():
    raise ValueError(f"the data axis ({mesh.shape['data']}) must be a multiple of the number of "
                     f"hosts ({jax.process_count()}): each host feeds whole crops")
  if crop_size[0] % mesh.shape["spatial"]:
    raise ValueError(f"crop depth {crop_size[0]} is not divisible by the spatial axis "
                     f"({mesh.shape['spatial']} devices)")
