"""A method's sampler run with the volume sharded over the mesh: one volume spans several devices.

`jit_sample(method, mesh)` compiles `method.sample` (the whole sampling loop, one `lax.scan`) with
the condition laid out like a training batch (batch on "data", depth on "spatial"), the parameters
in the method's own layout (replicated, or the residual DiT's kernels over "model"), and the
prediction sharded like the condition. XLA partitions every network evaluation in the loop:
convolution halos travel by collective-permute and GroupNorm statistics by all-reduce, so each
device holds 1/spatial of every full-resolution feature map. The methods pin their denoiser's
output and the starting noise to the volume layout (`jaxvol.models.layers.constrain_volume`,
active here through jaxvol.parallel.sharding), so the loop carry stays sharded whatever propagation
would pick.

The result equals one device's up to float reassociation in the sharded reductions: JAX's
partitionable threefry draws the same noise whatever the sharding, and every step's key is a
fold_in of the sampler's key.

Sliding windows (config.inference.window) are the other way to use several devices:
jaxvol.ops.windows spreads the windows, each whole on one device. The two do not combine;
`jit_sample` asks for an empty window.

`evaluation_sampler(config, method)` is what --mode=evaluate, --mode=sample and `jaxvol predict`
use when config.mesh asks for a split (jaxvol.eval.samplers.choose chooses): a `VolumeSampler` on a mesh of config.mesh's
"spatial" and "model" sizes with data = 1 (volumes are sampled one at a time), taking host
(numpy) conditions of any shape and returning host predictions. It edge-pads the condition at the
end of each axis up to the method's spatial multiple, as `method.sample` itself does, and the
depth further up to a multiple of the spatial axis, then crops the prediction back; the result is
one device's whenever the method's padded depth already divides by the spatial axis (otherwise the
extra edge slices, and the noise drawn for them, change the result). A depth that is not a
multiple of (the method's multiple) x (spatial) at every network level is still sampled correctly,
but the levels it does not split evenly are partitioned by XLA with halo-extended copies; the
sampler logs a warning then, and `halo_convolutions` counts the convolutions that exchange halos
themselves (jaxvol.models.layers.conv3d_same). Parameters restored on one device (from a
checkpoint of any mesh) are laid out with `put_params`. Across hosts every process passes the
same condition and gets the whole prediction (gathered after the loop); the mesh must then
include devices of every process, so the spatial axis spans hosts and each convolution's halos
cross the network (slower than within a node, but it is what lets a volume exceed one node's
memory). The "model" axis only splits PRDiT's DiT kernels: a U-Net's convolutions run the same on
every model device.
"""

import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxvol.parallel import cost as cost_lib
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib

log = logging.getLogger("jaxvol")


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
      (pass `loop.build_everything(...).compute_params_sharding` for the DiT kernels over
      "model"; not a zero1/fsdp train-state layout, whose split kernels would reach the
      activations).
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


def _global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole (works across hosts)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class VolumeSampler:
  """Whole-volume sampling of host conditions on a spatial x model mesh (module docstring).

  Call `put_params(params)` once, then `sampler(placed_params, cond, rng)` per volume with a
  (1, D, H, W, C) numpy condition; returns the (1, D, H, W, C_out) prediction as numpy.
  """

  def __init__(self, method, mesh: Mesh, params_sharding):
    if mesh.shape["data"] != 1:
      raise ValueError(f"volumes are sampled one at a time: the sampling mesh needs data = 1, "
                       f"got {dict(mesh.shape)}")
    self.method, self.mesh = method, mesh
    self.params_sharding = params_sharding
    self._repl = mesh_lib.replicated(mesh)
    self._cond_sharding = mesh_lib.batch_sharding(mesh)
    self._sampler = jit_sample(method, mesh, params_sharding, self._cond_sharding)
    mult = tuple(int(m) for m in method.spatial_multiple())
    self.multiple = (math.lcm(mult[0], mesh.shape["spatial"]),) + mult[1:]
    self._checked = set()
    self._compiled = {}

  def put_params(self, params):
    """Lays parameters out as the sampler reads them: host arrays, or arrays each process holds
    whole (a restored checkpoint on one local device), the same on every process."""
    return jax.tree.map(lambda p, sh: _global(np.asarray(p), sh), params, self.params_sharding)

  def padded_shape(self, spatial) -> tuple[int, int, int]:
    """The shape a (D, H, W) volume is edge-padded to: the method's multiple, depth also a
    multiple of the spatial axis."""
    return tuple(-(-int(s) // m) * m for s, m in zip(spatial, self.multiple))

  def halo_convolutions(self, spatial) -> int:
    """How many convolutions of the sampler exchange one-slice halos themselves
    (jaxvol.models.layers.conv3d_same) for a (D, H, W) volume; the others are partitioned by
    XLA (halo-extended copies) or not split. Traces the sampler; compiles nothing."""
    example = self.method.abstract_batch(1, self.padded_shape(spatial))
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                          self.method.param_shapes(example))
    cond = jax.ShapeDtypeStruct((1,) + self.padded_shape(spatial) + (self.method.cond_channels,),
                                jnp.float32)
    with sharding_lib.activated(self.mesh):
      jaxpr = jax.make_jaxpr(self.method.sample)(params, cond, jax.random.PRNGKey(0))
    return str(jaxpr).count("shard_map[")

  def _check_depth(self, spatial) -> None:
    depth, n = self.padded_shape(spatial)[0], self.mesh.shape["spatial"]
    full = int(self.method.spatial_multiple()[0]) * n
    if (depth, n) not in self._checked and depth % full:
      log.warning("depth %d (padded from %d) does not split evenly over %d devices at every "
                  "level of the network (puzzle, U-Net levels, token grid): those levels are "
                  "partitioned by XLA, with halo-extended copies (more memory there). A depth "
                  "that is a multiple of %d avoids it.", depth, spatial[0], n, full)
    self._checked.add((depth, n))

  def compile(self, params, cond) -> None:
    """Compiles ahead of time for a (1, D, H, W, C) condition's padded shape (cached), so that
    calls are timed without compilation."""
    shape = tuple(np.shape(cond))
    key = (self.padded_shape(shape[1:4]), shape[-1])
    if key not in self._compiled:
      cond_abs = jax.ShapeDtypeStruct((1,) + key[0] + (key[1],), jnp.float32,
                                      sharding=self._cond_sharding)
      rng_abs = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self._repl)
      self._compiled[key] = self._sampler.lower(params, cond_abs, rng_abs).compile()

  def __call__(self, params, cond, rng) -> np.ndarray:
    cond = np.asarray(cond, np.float32)
    if cond.ndim != 5 or cond.shape[0] != 1:
      raise ValueError(f"the condition must be one (1, D, H, W, C) volume, got {cond.shape}")
    spatial = cond.shape[1:4]
    self._check_depth(spatial)
    target = self.padded_shape(spatial)
    pads = [(0, 0)] + [(0, t - s) for s, t in zip(spatial, target)] + [(0, 0)]
    padded = np.pad(cond, pads, mode="edge") if any(p[1] for p in pads) else cond
    fn = self._compiled.get((target, cond.shape[-1]), self._sampler)
    out = fn(params, _global(padded, self._cond_sharding), _global(np.asarray(rng), self._repl))
    return _to_host(out)[:, :spatial[0], :spatial[1], :spatial[2]]


def sampling_mesh(mesh_cfg, devices=None) -> Mesh:
  """The evaluation mesh: config.mesh's spatial and model sizes, data = 1 (first devices)."""
  spatial, model = int(mesh_cfg.spatial), int(mesh_cfg.model)
  devices = list(jax.devices() if devices is None else devices)
  if spatial * model > len(devices):
    raise ValueError(f"sampling on spatial={spatial} x model={model} needs {spatial * model} "
                     f"devices; {len(devices)} are available (config.mesh is the training run's: "
                     f"pass --config.mesh.spatial=1 --config.mesh.model=1 to sample on one device)")
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, spatial=spatial, model=model)),
                            devices)
  missing = set(range(jax.process_count())) - {d.process_index for d in mesh.devices.flat}
  if missing:
    raise ValueError(f"the sampling mesh (spatial={spatial} x model={model}) has no device of "
                     f"process(es) {sorted(missing)}; across hosts it must span every host "
                     f"(spatial x model = {jax.device_count()} devices here)")
  return mesh


def evaluation_sampler(config, method, devices=None) -> VolumeSampler | None:
  """The VolumeSampler --mode=evaluate/sample use, or None to sample on one device.

  None when config.mesh asks for no spatial or model split, or when config.inference.window is
  set (windows are spread over the local devices instead, jaxvol.ops.windows).
  """
  if int(config.mesh.spatial) * int(config.mesh.model) == 1:
    return None
  if method.sliding_window() is not None:
    log.warning("config.inference.window is set: volumes are sampled in windows spread over this "
                "process's devices, and config.mesh (spatial=%s, model=%s) does not apply to "
                "sampling; leave the window empty to split each volume instead",
                config.mesh.spatial, config.mesh.model)
    return None
  mesh = sampling_mesh(config.mesh, devices)
  example = method.abstract_batch(1, config.data.crop_size)
  shapes = method.param_shapes(example)
  params_sharding, _ = sharding_lib.param_shardings(mesh, shapes, method.param_axes(example))
  return VolumeSampler(method, mesh, params_sharding)


class LocalSampler:
  """`method.sample` on this process: one device, or the windows spread over its devices.

  `compile(params, cond)` compiles ahead of time for a condition's shape (cached per shape), so
  calls are timed without compilation.
  """

  def __init__(self, method):
    self._jitted = jax.jit(method.sample)
    self._compiled = {}
    self._sharding = None
    window = method.sliding_window()
    if window is not None and window.mesh is not None:
      # Windows are spread over this process's devices: params and inputs live on all of them.
      self._sharding = jax.sharding.NamedSharding(window.mesh, jax.sharding.PartitionSpec())

  def _put(self, x):
    return jnp.asarray(x) if self._sharding is None else jax.device_put(x, self._sharding)

  def put_params(self, params):
    return jax.tree.map(self._put, params)

  def compile(self, params, cond) -> None:
    shape = tuple(np.shape(cond))
    if shape not in self._compiled:
      self._compiled[shape] = self._jitted.lower(params, self._put(cond),
                                                 jax.random.PRNGKey(0)).compile()

  def __call__(self, params, cond, rng) -> np.ndarray:
    fn = self._compiled.get(tuple(np.shape(cond)), self._jitted)
    return np.asarray(jax.block_until_ready(fn(params, self._put(cond), rng)))


def choose(config, method):
  """The sampler the volumes of `config` run on, chosen here for every command (evaluate, sample,
  generate, predict, validation during training): the spatially split `VolumeSampler` when
  config.mesh asks for one, else a `LocalSampler`. Tests that need a stand-in sampler replace
  this function (monkeypatch `jaxvol.eval.samplers.choose`); nothing else chooses."""
  sampler = evaluation_sampler(config, method) if config is not None else None
  return sampler if sampler is not None else LocalSampler(method)


def flip_sets(axes) -> list[tuple[int, ...]]:
  """Every subset of the spatial `axes` (0, 1, 2: depth, height, width), the empty one first:
  the flips of a geometric self-ensemble (config.inference.flip_axes)."""
  axes = tuple(sorted({int(a) for a in (axes or ())}))
  if any(a not in (0, 1, 2) for a in axes):
    raise ValueError(f"config.inference.flip_axes must name spatial axes among 0, 1, 2; got {axes}")
  return [tuple(a for i, a in enumerate(axes) if mask >> i & 1) for mask in range(2 ** len(axes))]


class SamplerPredictor:
  """A predictor from a sampler and its placed parameters: `volume.inputs` is the condition.

  With `flip_axes` (config.inference.flip_axes) the prediction is the mean over every combination
  of flips of those axes: the condition flipped, sampled with key fold_in(key, j) for the j-th
  combination, the prediction flipped back. Flipping a volume and its position channels together
  is what training's flips (config.data.flips) show the network, so the ensemble asks nothing new
  of it; only for conditional methods (the condition is what is flipped)."""

  def __init__(self, sampler, params, flip_axes=()):
    self.sampler, self.params = sampler, params
    self.flips = flip_sets(flip_axes)

  @classmethod
  def from_config(cls, config, sampler, params) -> "SamplerPredictor":
    inference = config.get("inference") if config is not None else None
    axes = tuple(inference.get("flip_axes", ())) if inference is not None else ()
    return cls(sampler, params, axes)

  def prepare(self, volume) -> None:
    compile_fn = getattr(self.sampler, "compile", None)
    if compile_fn is not None:
      compile_fn(self.params, volume.inputs)

  def __call__(self, volume, key) -> np.ndarray:
    if len(self.flips) == 1:
      return self.sampler(self.params, volume.inputs, key)
    cond = np.asarray(volume.inputs)
    if cond.ndim != 5:
      raise ValueError(f"a flip ensemble needs a (B, D, H, W, C) condition, got {cond.shape}")
    total = None
    for j, axes in enumerate(self.flips):
      flipped = np.ascontiguousarray(np.flip(cond, [1 + a for a in axes])) if axes else cond
      pred = np.asarray(self.sampler(self.params, flipped, jax.random.fold_in(key, j)))
      if axes:  # (B, D, H, W, C) or (D, H, W): the spatial axes sit where the condition's do
        pred = np.flip(pred, [a + (1 if pred.ndim == 5 else 0) for a in axes])
      total = pred.astype(np.float64) if total is None else total + pred
    return (total / len(self.flips)).astype(np.float32)


class CompiledPredictor:
  """A predictor from `build(volume) -> (fn, args)`: jax.jit(fn) compiled for each volume in
  `prepare` (which returns {"bytes": XLA's compiled memory}) and called as fn(*args, key)."""

  def __init__(self, build: Callable[[Any], tuple[Callable, tuple]]):
    self._build = build
    self._current = None

  def prepare(self, volume) -> dict:
    fn, args = self._build(volume)
    compiled = jax.jit(fn).lower(*args, jax.random.PRNGKey(0)).compile()
    self._current = (volume.name, compiled, args)
    return {"bytes": int(cost_lib.compiled_cost(compiled)["bytes"])}

  def __call__(self, volume, key):
    if self._current is None or self._current[0] != volume.name:
      self.prepare(volume)
    _, compiled, args = self._current
    return np.asarray(jax.block_until_ready(compiled(*args, key)))
