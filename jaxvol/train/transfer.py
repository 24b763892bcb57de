"""Parameters carried over from other runs: frozen earlier stages and warm starts.

A method names them (`Method.frozen_prefixes`, `Method.param_sources`); this module turns that into
  * a `Plan`, computed from shapes only (the other runs' checkpoint metadata, nothing loaded):
    per-leaf optimizer labels ("fresh", "frozen" or the source's name), the learning-rate factor
    of each label, and the frozen mask the train step uses to leave those leaves untouched;
  * `load`, run once at the start of a fresh run: copies the sources' parameters (EMA or raw, as
    each source says) into both the parameters and the EMA parameters of the new state, placed
    with the state's shardings.
PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation", ICLR 2026)
uses both: stage 2 freezes the stage-1 local denoiser (the stage-1 run's raw weights, as the
authors load them), and a higher resolution warm-starts from a lower one at a reduced learning
rate, with the time fine head left fresh. A source may refuse a checkpoint whose parameter paths
betray another layout (`ParamSource.check`), before anything is copied.

A resumed run recomputes the plan from the same sources (so the optimizer state has the same
structure) but loads nothing: its checkpoint already holds every parameter.
"""

import dataclasses
import logging
import math
import os
from typing import Any

import jax
import numpy as np

from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.trees import flat_paths, path_of

log = logging.getLogger("jaxvol")

FRESH = "fresh"
FROZEN = "frozen"


@dataclasses.dataclass
class Plan:
  """Where each parameter comes from and how it trains.

  Attributes:
    labels: pytree like the parameters: FRESH, FROZEN or a source's name; None when every leaf is
      FRESH (the plain optimizer, exactly as without this module).
    lr_scales: label -> learning-rate factor (FROZEN leaves get no updates at all).
    frozen: pytree of bools like the parameters, or None when nothing is frozen.
    copies: (source, {path: shape}) per source, the leaves it supplies (later sources win).
  """

  labels: Any = None
  lr_scales: dict = dataclasses.field(default_factory=dict)
  frozen: Any = None
  copies: list = dataclasses.field(default_factory=list)


def _under(path, prefix) -> bool:
  return tuple(path[:len(prefix)]) == tuple(prefix)


def _checkpointer(workdir: str, what: str) -> ckpt_lib.Checkpointer:
  # Checking first, because the checkpoint manager would create an empty folder for a typo.
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{what}: {workdir} holds no checkpoints/ folder; train that run first")
  ckpt = ckpt_lib.Checkpointer(workdir, with_data=False, async_save=False)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise FileNotFoundError(f"{what}: no checkpoint under {ckpt.directory}")
  return ckpt


def _tree(source) -> str:
  tree = getattr(source, "tree", "ema_params")
  if tree not in ("params", "ema_params"):
    raise ValueError(f"{source.name}: tree must be params or ema_params, got {tree!r}")
  return tree


def source_shapes(source, config) -> dict:
  """{path: shape} of a source's parameters (`source.tree`), from checkpoint metadata only.

  Raises ValueError when the saved config differs in `source.same_fields` or `source.check`
  rejects the saved parameter paths.
  """
  ckpt = _checkpointer(source.workdir, source.name)
  try:
    step = ckpt.newest_sound(what=f"{source.name} checkpoint")
    if source.same_fields:
      ckpt_lib.check_same_model(ckpt.restore_meta(step), config, ckpt.directory,
                                fields=source.same_fields)
    target = ckpt.local_target(step)
  finally:
    ckpt.close()
  shapes = {p: tuple(v.shape) for p, v in flat_paths(target[_tree(source)]).items()}
  check = getattr(source, "check", None)
  problem = check(list(shapes)) if check is not None else None
  if problem:
    raise ValueError(f"{source.name}: the checkpoint in {ckpt.directory} cannot be used: {problem}")
  return shapes


def plan(config, method, abstract_params) -> Plan:
  """The Plan of a run: which leaves come from which source, which are frozen, their labels.

  Args:
    config: the run's config (sources check their `same_fields` against it).
    method: the run's method (its frozen prefixes and parameter sources).
    abstract_params: the parameters' shapes (e.g. from `jax.eval_shape`).

  Returns:
    The Plan; labels and frozen are None when the method needs neither.

  Raises:
    FileNotFoundError: a source workdir has no checkpoint.
    ValueError: a source that must supply every leaf lacks one or has another shape, a source
      supplies nothing, or a source trained with different `same_fields`.
  """
  params = flat_paths(abstract_params)
  frozen_prefixes = tuple(tuple(p) for p in method.frozen_prefixes())
  is_frozen = {p: any(_under(p, f) for f in frozen_prefixes) for p in params}
  label = {p: FROZEN if is_frozen[p] else FRESH for p in params}
  result = Plan()
  for source in method.param_sources():
    saved = source_shapes(source, config)
    excluded = tuple(tuple(e) for e in getattr(source, "exclude", ()))
    wanted = [p for p in params
              if _under(p, source.prefix) and not any(_under(p, e) for e in excluded)]
    matched = {p: tuple(params[p].shape) for p in wanted if saved.get(p) == tuple(params[p].shape)}
    missing = [p for p in wanted if p not in matched]
    if source.require_all and missing:
      detail = ", ".join(f"{'/'.join(p)} {tuple(params[p].shape)} (there: {saved.get(p)})"
                         for p in missing[:5])
      raise ValueError(f"{source.name}: {source.workdir} lacks {len(missing)} of the "
                       f"{len(wanted)} parameters it must supply, or has other shapes: {detail}"
                       + (" ..." if len(missing) > 5 else ""))
    if not matched:
      raise ValueError(f"{source.name}: no parameter of {source.workdir} matches this model "
                       "(path and shape); is it the right run?")
    result.copies.append((source, matched))
    for p in matched:
      if not is_frozen[p]:
        label[p] = source.name
  for source, _ in result.copies:
    if source.name in label.values():
      result.lr_scales[source.name] = float(source.lr_scale)
  treedef = jax.tree.structure(abstract_params)
  if any(v != FRESH for v in label.values()):
    result.labels = jax.tree.unflatten(treedef, [label[p] for p in params])
    result.lr_scales[FRESH] = 1.0
  if any(is_frozen.values()):
    result.frozen = jax.tree.unflatten(treedef, [is_frozen[p] for p in params])
  return result


def describe(plan_: Plan, abstract_params) -> str:
  """One line per label: arrays and values, e.g. "frozen: 14 arrays, 1,234,567 values"."""
  if plan_.labels is None:
    return "every parameter trains from its fresh initialisation"
  sizes = {}
  for lab, leaf in zip(jax.tree.leaves(plan_.labels), jax.tree.leaves(abstract_params)):
    n, v = sizes.get(lab, (0, 0))
    sizes[lab] = (n + 1, v + math.prod(leaf.shape))
  return "; ".join(f"{lab}: {n} arrays, {v:,} values"
                   + (f", lr x{plan_.lr_scales[lab]:g}" if lab in plan_.lr_scales else "")
                   for lab, (n, v) in sorted(sizes.items()))


def check_complete(plan_: Plan) -> None:
  """ValueError when a frozen parameter would keep its random initialisation (no source)."""
  if plan_.frozen is None:
    return
  supplied = set()
  for _, matched in plan_.copies:
    supplied |= set(matched)
  orphans = [p for p, f in flat_paths(plan_.frozen).items() if f and p not in supplied]
  if orphans:
    raise ValueError(f"{len(orphans)} frozen parameters (e.g. {'/'.join(orphans[0])}) would keep "
                     "their random initialisation: name the run that trained them (PRDiT stage "
                     "2: --config.prdit.stage1_workdir=STAGE1_WORKDIR; latent diffusion: "
                     "--config.ldm.autoencoder_workdir=AUTOENCODER_WORKDIR)")


def load(plan_: Plan, state: dict) -> dict:
  """Copies every planned source's parameters into state["params"] and state["ema_params"].

  Each copied leaf keeps the dtype and sharding of the leaf it replaces. Raises ValueError when a
  frozen leaf would keep its random initialisation (`check_complete`).
  """
  check_complete(plan_)
  if not plan_.copies:
    return state
  values = {}
  for source, matched in plan_.copies:
    ckpt = _checkpointer(source.workdir, source.name)
    try:
      step, restored, _ = ckpt.restore_newest(what=f"{source.name} checkpoint")
    finally:
      ckpt.close()
    saved = flat_paths(restored[_tree(source)])
    for p in matched:
      values[p] = np.asarray(saved[p])  # on the host: every copy below is a new device buffer
    log.info("%s: %d parameter arrays from %s (step %d, %s)", source.name, len(matched),
             source.workdir, step, _tree(source))

  def replace(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for key_path, leaf in leaves:
      p = path_of(key_path)
      if p in values:
        # A fresh buffer per tree: params and ema_params are donated separately by the step.
        out.append(jax.device_put(values[p].astype(leaf.dtype), leaf.sharding))
      else:
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)

  return dict(state, params=replace(state["params"]), ema_params=replace(state["ema_params"]))
