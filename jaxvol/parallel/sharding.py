"""Logical axis rules: how named parameter and activation axes land on the mesh.

Model code names axes, never mesh axes: activations through `nn.with_logical_constraint`
(volumes as `jaxvol.models.layers.VOLUME_AXES`, PRDiT tokens as `jaxvol.models.prdit.TOKEN_AXES`)
and parameters through `nn.with_logical_partitioning` (the residual DiT's large kernels). RULES maps
the names onto the ("data", "spatial", "model") mesh of jaxvol.parallel.mesh:

  batch -> data        data parallelism
  depth -> spatial     one volume spans devices along its depth; XLA exchanges convolution halos
  tokens -> spatial    PRDiT's token sequence follows the depth split of its volume
  mlp, heads -> model  the DiT's MLP and attention kernels are sharded (FSDP style: XLA gathers a
                       kernel where a matmul needs it whole); with model = 1 nothing changes
  height, width, channels, embed -> not sharded

In the method's own layout (`param_shardings`) every unnamed parameter is replicated: every U-Net
parameter (the U-Net methods' weights are small next to their full-resolution activations), norms,
biases, time embeddings, PRDiT's frozen local denoiser. A named axis that its mesh axis does not
divide falls back to replication; `param_shardings` reports each fallback. Samplers use this
layout, and it is where the network sees its parameters in a train step.

The train state can go further (config.mesh.state_sharding, `state_layouts`): with "replicated"
(the default) the optimizer moments and the EMA copy of a parameter are laid out as the parameter.
"zero1" (ZeRO stage 1) shards the moments and the EMA copy of each otherwise replicated parameter
over the devices of the "data" and "spatial" axes together, on one array dimension (`zero_spec`:
the largest one they divide); "fsdp" shards the parameters themselves that way too, at rest: the
step all-gathers the whole parameter tree before the network (`GatheredMethod`), not layer by
layer, and keeps each device's slice of the all-reduced gradients, so the step's peak still holds
every parameter and gradient (ZeRO-3's per-layer gathers and reduce-scattered gradients are not
what this does). Leaves under config.mesh.state_sharding_min_size elements, leaves no dimension
of which the axes divide, and leaves the method's layout already splits (the DiT kernels over
"model") keep their layout. With data x spatial = 1 every mode is "replicated".

The activation constraints only act while `activated(mesh)` is entered during tracing (jitted
train step and sampler lowering do this); elsewhere they are no-ops, so one device and unsharded
callers run exactly as before.
"""

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvol import trees

RULES = (
    ("batch", "data"),
    ("depth", "spatial"),
    ("height", None),
    ("width", None),
    ("channels", None),
    ("tokens", "spatial"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
)


@contextlib.contextmanager
def activated(mesh: Mesh):
  """Makes `mesh` and RULES current, so the models' logical constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def mesh_axes(logical) -> P:
  """The mesh PartitionSpec of a logical one: ("batch", "depth") -> P("data", "spatial")."""
  return nn.logical_to_mesh_axes(tuple(logical), RULES)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in names)


def fit_spec(mesh: Mesh, spec: P, shape) -> tuple[P, list[tuple[int, object]]]:
  """`spec` with each axis its mesh axes do not divide set to None, and those (dim, axes)."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  fallbacks = []
  for i, (axes, size) in enumerate(zip(entries, shape)):
    if axes is not None and size % _axis_size(mesh, axes):
      fallbacks.append((i, axes))
      entries[i] = None
  return P(*entries), fallbacks


def param_shardings(mesh: Mesh, abstract_params, logical_specs=None):
  """Shardings of the parameters from their logical specs (None: every parameter replicated).

  Args:
    mesh: the mesh.
    abstract_params: the parameters' shapes.
    logical_specs: pytree like the parameters of logical PartitionSpecs (`Method.param_axes`).

  Returns:
    (pytree of NamedSharding, list of "path: axis i (size n) not divisible by mesh axes a" strings
    for the named axes that fell back to replication).
  """
  if logical_specs is None:
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params), []
  shapes = trees.flat_paths(abstract_params)
  specs = trees.flat_paths(logical_specs)  # PartitionSpecs are pytree leaves
  out, notes = {}, []
  for path, leaf in shapes.items():
    spec, fallbacks = fit_spec(mesh, mesh_axes(specs.get(path, P())), leaf.shape)
    out[path] = NamedSharding(mesh, spec)
    notes += [f"{'/'.join(path)}: axis {i} (size {leaf.shape[i]}) not divisible by mesh axis "
              f"{axes} ({_axis_size(mesh, axes)})" for i, axes in fallbacks]
  treedef = jax.tree.structure(abstract_params)
  return jax.tree.unflatten(treedef, [out[p] for p in shapes]), notes


STATE_SHARDING_MODES = ("replicated", "zero1", "fsdp")
STATE_AXES = ("data", "spatial")  # the mesh axes ZeRO / FSDP shard the train state over
DEFAULT_MIN_SIZE = 2**14


def state_axes_size(mesh: Mesh) -> int:
  """The number of devices ZeRO / FSDP split the train state over: data x spatial."""
  return _axis_size(mesh, STATE_AXES)


def zero_spec(mesh: Mesh, shape, min_size: int = DEFAULT_MIN_SIZE) -> P | None:
  """The ZeRO layout of one otherwise replicated array, or None when it stays replicated.

  Args:
    mesh: the mesh; the array is split over the devices of its STATE_AXES together.
    shape: the array's shape.
    min_size: arrays of fewer elements stay replicated.

  Returns:
    P with STATE_AXES on the largest dimension they divide (ties: the last such dimension, e.g. a
    convolution kernel's output channels) and None elsewhere; None when the axes hold one device,
    the array is smaller than `min_size` or no dimension is divisible.
  """
  n = state_axes_size(mesh)
  shape = tuple(int(v) for v in shape)
  if n == 1 or math.prod(shape) < max(int(min_size), 1):
    return None
  best = None
  for i, size in enumerate(shape):
    if size >= n and size % n == 0 and (best is None or size >= shape[best]):
      best = i
  if best is None:
    return None
  return P(*[STATE_AXES if i == best else None for i in range(len(shape))])


def state_layouts(mesh: Mesh, abstract_params, params_sharding, mode: str = "replicated",
                  min_size: int = DEFAULT_MIN_SIZE):
  """The train state's parameter layout and that of their EMA copy and optimizer moments.

  Args:
    mesh: the mesh.
    abstract_params: the parameters' shapes.
    params_sharding: the method's parameter layout (`param_shardings`).
    mode: one of STATE_SHARDING_MODES: "replicated" (both layouts are `params_sharding`), "zero1"
      (the EMA and moments of every replicated leaf by `zero_spec`, the parameters unchanged) or
      "fsdp" (the parameters too).
    min_size: leaves of fewer elements stay replicated (config.mesh.state_sharding_min_size).

  Returns:
    (parameters' sharding pytree, EMA and optimizer moments' sharding pytree); leaves that
    `params_sharding` does not replicate (the DiT kernels over "model") are kept as they are.

  Raises:
    ValueError: an unknown mode.
  """
  if mode not in STATE_SHARDING_MODES:
    raise ValueError(f"unknown config.mesh.state_sharding {mode!r}; choose one of "
                     f"{', '.join(repr(m) for m in STATE_SHARDING_MODES)}")
  if mode == "replicated" or state_axes_size(mesh) == 1:
    return params_sharding, params_sharding

  def sharded(sharding, leaf):
    if not is_replicated(sharding):
      return sharding
    spec = zero_spec(mesh, leaf.shape, min_size)
    return sharding if spec is None else NamedSharding(mesh, spec)

  moments = jax.tree.map(sharded, params_sharding, abstract_params)
  return (moments if mode == "fsdp" else params_sharding), moments


def state_shardings(mesh: Mesh, abstract_state: dict, params_sharding, *,
                    moments_sharding=None) -> dict:
  """Shardings of a train state.

  Args:
    mesh: the mesh.
    abstract_state: the state's shapes ({"step", "params", "ema_params", "opt_state"}).
    params_sharding: the parameters' layout.
    moments_sharding: the layout of the EMA copy and of each optimizer moment (pytree like the
      parameters, `state_layouts`); None: `params_sharding`.

  Returns:
    Pytree like `abstract_state`: the parameters as `params_sharding`, the EMA as
    `moments_sharding`, each optimizer moment as the `moments_sharding` leaf of the parameter it
    belongs to (matched by path suffix and shape), everything else replicated.
  """
  if moments_sharding is None:
    moments_sharding = params_sharding
  repl = NamedSharding(mesh, P())
  by_path = {p: (s, tuple(a.shape)) for (p, s), a in zip(
      trees.flat_paths(moments_sharding).items(),
      trees.flat_paths(abstract_state["params"]).values())}

  def like_param(key_path, leaf):
    names = trees.path_of(key_path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[1] == tuple(leaf.shape):
        return hit[0]
    return repl

  out = {k: jax.tree.map(lambda _: repl, v) for k, v in abstract_state.items()}
  out["params"] = params_sharding
  if "ema_params" in abstract_state:
    out["ema_params"] = moments_sharding
  if "opt_state" in abstract_state:
    out["opt_state"] = jax.tree_util.tree_map_with_path(like_param, abstract_state["opt_state"])
  return out


class GatheredMethod:
  """`method` whose loss sees its parameters in `layout`; every other attribute is the method's.

  Wraps the method of a zero1 or fsdp train step. The constraint makes XLA all-gather each
  sharded parameter (fsdp) before the network uses it, and its transpose keeps the gradients in
  `layout` until the optimizer takes them (all-reduced, then each device keeps the slice of its
  moments; XLA may fuse the two into a reduce-scatter). Without it XLA's sharding propagation
  carries a kernel's channel split from the parameters, moments or gradients into the
  activations, and gathers whole feature maps of a spatially split volume to undo it.
  """

  def __init__(self, method, layout):
    self._method = method
    self._layout = layout

  def loss(self, params, batch, rng):
    return self._method.loss(jax.lax.with_sharding_constraint(params, self._layout), batch, rng)

  def loss_at(self, params, batch, rng, step):
    return self._method.loss_at(jax.lax.with_sharding_constraint(params, self._layout), batch,
                                rng, step)

  def __getattr__(self, name):
    if name in ("_method", "_layout"):  # not set yet (copies, unpickling)
      raise AttributeError(name)
    return getattr(self._method, name)


def is_replicated(sharding) -> bool:
  """True when every device holds the whole array."""
  return bool(getattr(sharding, "is_fully_replicated", False))
