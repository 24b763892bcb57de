"""Logical axis rules: how named parameter and activation axes land on the mesh.

Model code names axes, never mesh axes: activations through `nn.with_logical_constraint`
(volumes as `jaxvol.models.layers.VOLUME_AXES`, PRDiT tokens as `jaxvol.models.prdit.TOKEN_AXES`)
and parameters through `nn.with_logical_partitioning` (the residual DiT's large kernels). RULES maps
the names onto the ("data", "spatial", "model") mesh of jaxvol.train.mesh:

  batch -> data        data parallelism
  depth -> spatial     one volume spans devices along its depth; XLA exchanges convolution halos
  tokens -> spatial    PRDiT's token sequence follows the depth split of its volume
  mlp, heads -> model  the DiT's MLP and attention kernels are sharded (FSDP style: XLA gathers a
                       kernel where a matmul needs it whole); with model = 1 nothing changes
  height, width, channels, embed -> not sharded

Everything unnamed is replicated: every U-Net parameter (the U-Net methods' weights are small next
to their full-resolution activations), norms, biases, time embeddings, PRDiT's frozen local
denoiser, and the optimizer moments and EMA copy of each replicated parameter. A named axis that
its mesh axis does not divide falls back to replication; `param_shardings` reports each fallback.

The activation constraints only act while `activated(mesh)` is entered during tracing (jitted
train step and sampler lowering do this); elsewhere they are no-ops, so one device and unsharded
callers run exactly as before.
"""

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvol.train import transfer

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
  shapes = transfer.flat_paths(abstract_params)
  specs = transfer.flat_paths(logical_specs)  # PartitionSpecs are pytree leaves
  out, notes = {}, []
  for path, leaf in shapes.items():
    spec, fallbacks = fit_spec(mesh, mesh_axes(specs.get(path, P())), leaf.shape)
    out[path] = NamedSharding(mesh, spec)
    notes += [f"{'/'.join(path)}: axis {i} (size {leaf.shape[i]}) not divisible by mesh axis "
              f"{axes} ({_axis_size(mesh, axes)})" for i, axes in fallbacks]
  treedef = jax.tree.structure(abstract_params)
  return jax.tree.unflatten(treedef, [out[p] for p in shapes]), notes


def state_shardings(mesh: Mesh, abstract_state: dict, params_sharding) -> dict:
  """Shardings of a train state: parameters and EMA as `params_sharding`, each optimizer moment
  as the parameter it belongs to (matched by path suffix and shape), everything else replicated."""
  repl = NamedSharding(mesh, P())
  by_path = {p: (s, tuple(a.shape)) for (p, s), a in zip(
      transfer.flat_paths(params_sharding).items(),
      transfer.flat_paths(abstract_state["params"]).values())}

  def like_param(key_path, leaf):
    names = transfer.path_of(key_path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit is not None and hit[1] == tuple(leaf.shape):
        return hit[0]
    return repl

  out = {k: jax.tree.map(lambda _: repl, v) for k, v in abstract_state.items()}
  out["params"] = params_sharding
  if "ema_params" in abstract_state:
    out["ema_params"] = params_sharding
  if "opt_state" in abstract_state:
    out["opt_state"] = jax.tree_util.tree_map_with_path(like_param, abstract_state["opt_state"])
  return out


def is_replicated(sharding) -> bool:
  """True when every device holds the whole array."""
  return bool(getattr(sharding, "is_fully_replicated", False))
