"""A method's sampler run with the volume sharded over the mesh: one volume spans several devices.

`jit_sample(method, mesh)` compiles `method.sample` (the whole sampling loop, one `lax.scan`) with
the condition laid out like a training batch (batch on "data", depth on "spatial"), the parameters
as the train state holds them (replicated, or the residual DiT's kernels over "model"), and the
prediction sharded like the condition. XLA partitions every network evaluation in the loop:
convolution halos travel by collective-permute and GroupNorm statistics by all-reduce, so each
device holds 1/spatial of every full-resolution feature map. The methods pin their denoiser's
output and the starting noise to the volume layout (`jaxvol.models.layers.constrain_volume`,
active here through jaxvol.train.sharding), so the loop carry stays sharded whatever propagation
would pick.

The result equals one device's up to float reassociation in the sharded reductions: JAX's
partitionable threefry draws the same noise whatever the sharding, and every step's key is a
fold_in of the sampler's key.

Sliding windows (config.inference.window) are the other way to use several devices:
jaxvol.ops.windows spreads the windows, each whole on one device. The two do not combine;
`jit_sample` asks for an empty window.
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jaxvol.train import mesh as mesh_lib
from jaxvol.train import sharding as sharding_lib


def check_cond(mesh: Mesh, shape) -> None:
  """Clear errors for a (B, D, H, W, C) condition the mesh cannot split evenly."""
  if len(shape) != 5:
    raise ValueError(f"the condition must be (B, D, H, W, C), got shape {tuple(shape)}")
  if shape[0] % mesh.shape["data"]:
    raise ValueError(f"batch {shape[0]} is not divisible by the data axis ({mesh.shape['data']})")
  if shape[1] % mesh.shape["spatial"]:
    raise ValueError(f"depth {shape[1]} is not divisible by the spatial axis "
                     f"({mesh.shape['spatial']})")


def _check_whole_volume(method) -> None:
  if method.sliding_window() is not None:
    raise ValueError("spatially sharded sampling evaluates the whole volume at every step; "
                     "config.inference.window spreads windows over the devices instead: leave "
                     "the window empty to shard the volume")


class ShardedSampler:
  """`method.sample` jitted for sharded inputs: call it as sampler(params, cond, rng).

  Tracing (the first call, or `lower` with abstract arguments) runs with the logical axis rules
  and the mesh active; the prediction is sharded like the condition.
  """

  def __init__(self, method, mesh: Mesh, params_sharding=None,
               cond_sharding: NamedSharding | None = None):
    _check_whole_volume(method)
    self.mesh = mesh
    repl = mesh_lib.replicated(mesh)
    self.cond_sharding = cond_sharding or mesh_lib.batch_sharding(mesh)
    self._jitted = jax.jit(method.sample,
                           in_shardings=(params_sharding or repl, self.cond_sharding, repl),
                           out_shardings=self.cond_sharding)

  def __call__(self, params, cond, rng):
    check_cond(self.mesh, cond.shape)
    with sharding_lib.activated(self.mesh):
      return self._jitted(params, cond, rng)

  def lower(self, params, cond, rng):
    with sharding_lib.activated(self.mesh):
      return self._jitted.lower(params, cond, rng)


def jit_sample(method, mesh: Mesh, params_sharding=None,
               cond_sharding: NamedSharding | None = None) -> ShardedSampler:
  """The spatially sharded sampler of `method` on `mesh`.

  Args:
    method: the method (its `sample` and `sliding_window`).
    mesh: the ("data", "spatial", "model") mesh.
    params_sharding: a sharding or pytree of shardings for the parameters; None replicates them
      (pass the train state's `state_sharding["params"]` for FSDP-sharded DiT kernels).
    cond_sharding: layout of the condition and the prediction; default the batch sharding.

  Returns:
    A ShardedSampler.

  Raises:
    ValueError: the config asks for sliding-window sampling.
  """
  return ShardedSampler(method, mesh, params_sharding, cond_sharding)


def abstract_inputs(method, mesh: Mesh, abstract_params, spatial, batch: int = 1,
                    params_sharding=None, cond_sharding: NamedSharding | None = None):
  """(params, cond, rng) as ShapeDtypeStructs with shardings, for lowering without allocating."""
  repl = mesh_lib.replicated(mesh)
  bsh = cond_sharding or mesh_lib.batch_sharding(mesh)
  if params_sharding is None:
    params_sharding = jax.tree.map(lambda _: repl, abstract_params)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_params, params_sharding)
  cond = jax.ShapeDtypeStruct((batch,) + tuple(int(s) for s in spatial) + (method.cond_channels,),
                              jnp.float32, sharding=bsh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  return params, cond, rng
