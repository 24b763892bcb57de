"""Orbax checkpoints of the train state, the Grain iterator and the run's metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `meta` is JSON: the config and the
intensity presets of the store, so evaluation can map predictions back to the original scale.
A checkpoint is restored (training resume, evaluation, parameter transfer) only under a config
that agrees with its saved one on the fields its method declares to define its model
(`check_same_model`, jaxvol.methods.model_fields). Saves are asynchronous; `wait()` before exit.
Restoring takes an abstract state that carries the shardings wanted now, so a checkpoint restores
onto any mesh, and the data iterator restores on any number of hosts (`IteratorHandler`).
Evaluation reads checkpoints through this module only.
"""

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jaxvol import methods


# Fields added after checkpoints were written without them: (method, value an absent field had).
# A PRDiT run saved before `prdit.layout` existed holds parameter layout 1.
ABSENT_MEANS = {"prdit.layout": ("prdit", 1)}
HINTS = {"prdit.layout": "PRDiT parameter layout 1 predates the authors-parity rework "
                         "(jaxvol.models.prdit.LAYOUT_VERSION) and cannot be loaded by this "
                         "version: retrain, or use the jaxvol version that wrote it"}


def check_same_model(meta: dict, config, directory: str, fields=None) -> None:
  """A clear error when a checkpoint was trained with another method, network or diffusion.

  Args:
    meta: the checkpoint's metadata (its "config" entry is compared).
    config: the config of this run.
    directory: named in the error.
    fields: dotted config fields that must agree (those absent from the saved config are skipped);
      None: the fields that define the model of `config.method` (jaxvol.methods.model_fields).

  Raises:
    ValueError: the configs differ in `fields` (each difference named), or an unknown method.
  """
  if fields is None:
    fields = methods.model_fields(config)
  saved = (meta or {}).get("config", {})
  now = json.loads(config.to_json_best_effort())

  def get(tree, dotted):
    root = tree
    for part in dotted.split("."):
      tree = tree.get(part) if isinstance(tree, dict) else None
    if dotted == "ppdm.factor" and tree is not None:  # 2, [2] and [2, 2, 2] are one factor
      tree = [tree] * 3 if isinstance(tree, int) else list(tree) * (3 if len(tree) == 1 else 1)
    if tree is None and root is saved and dotted in ABSENT_MEANS and saved:
      method, value = ABSENT_MEANS[dotted]
      tree = value if saved.get("method") == method else None
    return tree

  diff = {k: (get(saved, k), get(now, k)) for k in fields
          if get(saved, k) is not None and get(saved, k) != get(now, k)}
  if diff:
    hints = "".join(f"; {HINTS[k]}" for k in diff if k in HINTS)
    raise ValueError(f"the checkpoint in {directory} was trained with a different config: "
                     + ", ".join(f"{k} saved {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                     + hints + "; use the training config or another workdir")


class IteratorHandler(grain.checkpoint.CheckpointHandler):
  """Grain's iterator item, restorable by a job with another number of hosts.

  Each host saves its own iterator state (data/process_<i>-of-<n>.json). jaxvol's per-host
  iterators all stand at the same position, the number of global batches drawn
  (jaxvol.data.pipeline), so when this host finds no file of its own (the job now runs on another
  number of hosts) the state the saving hosts agreed on is its state too.
  """

  def restore(self, directory, item=None, args=None):
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
      return super().restore(directory, item=item, args=args)
    item = item or args.item
    files = sorted(directory.glob("process_*-of-*.json"))
    states = [json.loads(f.read_text()) for f in files]
    if not isinstance(item, grain.DatasetIterator) or not states or any(
        st != states[0] for st in states):
      raise ValueError(f"{directory}: no iterator state for process {jax.process_index()} of "
                       f"{jax.process_count()}, and the saved ones ({[f.name for f in files]}) do "
                       "not agree on one position")
    item.set_state(states[0])
    item.start_prefetch()
    return item


# Orbax finds an item's handler through the type of its arguments: Grain's CheckpointSave and
# CheckpointRestore are bound to Grain's handler, so IteratorHandler gets its own (same fields).
@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  """Saves a Grain iterator (`item`) with IteratorHandler."""
  item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  """Restores into a fresh Grain iterator (`item`) with IteratorHandler."""
  item: Any


CHECKPOINTS = "checkpoints"
BEST = "best_checkpoint"  # the step with the best validation score (keep 1; no data iterator)


class Checkpointer:
  """An Orbax CheckpointManager over WORKDIR/`subdir` (the run's checkpoints, or BEST)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, with_data: bool = True,
               subdir: str = CHECKPOINTS, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), subdir)
    # The data handler is always registered so that readers which skip the iterator (evaluation)
    # still know the item; `with_data` decides whether it is saved and restored.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": IteratorHandler()}
    self.with_data = with_data
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=create),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, data_iter=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if self.with_data and data_iter is not None:
      items["data"] = IteratorSave(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step=None, data_iter=None):
    """Restores (state, meta) at `step` (default latest) and, if given, the iterator in place."""
    step = self.latest_step() if step is None or step < 0 else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {self.all_steps()})")
    if abstract_state is None:
      abstract_state = self.local_target(step)
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if self.with_data and data_iter is not None:
      items["data"] = IteratorRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def local_target(self, step: int, device=None):
    """Abstract state placing every array on one local device, whatever mesh saved it.

    Evaluation on a laptop of a model trained on a multi-GPU node restores through this.
    """
    device = device or jax.local_devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    tree = self.manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                        tree, is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

  def restore_meta(self, step=None) -> dict:
    step = self.latest_step() if step is None or step < 0 else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def parse_selection(value) -> str | int:
  """A checkpoint selection: "auto", "best", "latest" or a step (int, or a string of digits).

  Raises:
    ValueError: anything else.
  """
  if isinstance(value, bool):
    raise ValueError(f"checkpoint selection must be auto, best, latest or a step, got {value!r}")
  if isinstance(value, int):
    if value < 0:
      return "latest"
    return value
  text = str(value).strip().lower()
  if text.isdigit():
    return int(text)
  if text in ("auto", "best", "latest"):
    return text
  raise ValueError(f"checkpoint selection must be auto, best, latest or a step number, got "
                   f"{value!r}")


def open_selected(workdir: str, selection="auto") -> tuple[Checkpointer, int, str]:
  """(checkpointer, step, description) of the checkpoint a selection names; the caller closes it.

  "best": the step kept in WORKDIR/best_checkpoint by validation during training
  (jaxvol.train.loop); "latest": the newest of WORKDIR/checkpoints; "auto": best when training
  validated, else latest; a step: that step in checkpoints/, or the best checkpoint if it holds it.

  Raises:
    FileNotFoundError: no checkpoint matches (the message lists what exists).
  """
  selection = parse_selection(selection)
  main = Checkpointer(workdir, with_data=False, async_save=False, create=False)
  best = Checkpointer(workdir, with_data=False, async_save=False, subdir=BEST, create=False)
  try:
    best_step, latest = best.latest_step(), main.latest_step()
    if selection in ("best", "auto") and best_step is not None:
      chosen, step, why = best, best_step, f"best validation checkpoint (step {best_step})"
    elif selection == "best":
      raise FileNotFoundError(f"{best.directory}: no best checkpoint (training kept one only "
                              "with config.train.validate_every > 0); use --checkpoint=latest"
                              + (f" (latest step {latest})" if latest is not None else ""))
    elif selection in ("latest", "auto"):
      if latest is None:
        raise FileNotFoundError(f"no checkpoint found under {main.directory}: train first")
      chosen, step = main, latest
      why = (f"latest checkpoint (step {latest})" + (
          "; no validation ran during training, so no best checkpoint exists"
          if selection == "auto" else ""))
    elif selection in main.all_steps():
      chosen, step, why = main, selection, f"checkpoint step {selection} (chosen by step)"
    elif selection == best_step:
      chosen, step, why = best, selection, f"checkpoint step {selection} (the best one)"
    else:
      raise FileNotFoundError(
          f"no checkpoint for step {selection} in {main.directory} (available: "
          f"{sorted(main.all_steps())}; best: {best_step})")
  except BaseException:
    main.close()
    best.close()
    raise
  (best if chosen is main else main).close()
  return chosen, int(step), why
