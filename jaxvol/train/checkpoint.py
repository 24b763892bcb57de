"""Orbax checkpoints of the train state, the Grain iterator and the run's metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `meta` is JSON: the config and the
intensity presets of the store, so evaluation can map predictions back to the original scale.
A checkpoint is restored (training resume, evaluation, parameter transfer) only under a config
that agrees with its saved one on the fields its method declares to define its model
(`check_same_model`, jaxvol.methods.model_fields). Saves are asynchronous; `wait()` before exit.
Restoring takes an abstract state that carries the shardings wanted now, so a checkpoint restores
onto any mesh, and the data iterator restores on any number of hosts (`IteratorHandler`).
Evaluation reads checkpoints through this module only.

Damage costs a few steps, not the run. Every restore (training resume, evaluate, sample, predict,
warm starts, the PRDiT stage-1 load) goes through `Checkpointer.restore_newest` (readers:
`restore_selected`): the newest checkpoint first; one that does not restore (unreadable,
truncated or corrupt data, missing files, no commit marker) is named in one warning and the next
older one is tried; when none restores, jaxvol.errors.CheckpointError lists what was tried.
Training moves a damaged step aside (`checkpoints/60.damaged`) for inspection, never deleting
it. Each save is verified once it commits (`problem`: commit marker, metadata and tree read back)
before it counts; retention deletes old steps only after that, so the newest good checkpoint is
never deleted for an unverified one. A failed save (disk full, no permission) raises
CheckpointError naming the directory and cause, with the step's partial files moved aside.
"""

import dataclasses
import glob
import json
import logging
import os
import shutil
import zlib
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from jaxvol import fileio
from jaxvol import methods
from jaxvol.errors import CheckpointError, ConfigError

log = logging.getLogger("jaxvol")


# Fields added after checkpoints were written without them: (method, value an absent field had).
# A PRDiT run saved before `prdit.layout` existed holds parameter layout 1.
# What a model field absent from an older checkpoint's config means: field -> (the method it
# applies to, None for any method; the value). Flow matching came after the noise diffusions,
# residual learning after the plain networks.
ABSENT_MEANS = {"prdit.layout": ("prdit", 1), "diffusion.objective": (None, "diffusion"),
                "model.residual": (None, False)}
# Model fields an older checkpoint's config holds under another name: field -> old name (read
# before ABSENT_MEANS). Residual learning was config.regression.residual while only regression
# offered it.
RENAMED = {"model.residual": "regression.residual"}
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
    ConfigError (a ValueError): the configs differ in `fields` (each difference named).
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
    if tree is None and root is saved and dotted in RENAMED and saved:
      tree = get(saved, RENAMED[dotted])
    if tree is None and root is saved and dotted in ABSENT_MEANS and saved:
      method, value = ABSENT_MEANS[dotted]
      tree = value if method is None or saved.get("method") == method else None
    return tree

  diff = {k: (get(saved, k), get(now, k)) for k in fields
          if get(saved, k) is not None and get(saved, k) != get(now, k)}
  if diff:
    hints = "".join(f"; {HINTS[k]}" for k in diff if k in HINTS)
    raise ConfigError(f"the checkpoint in {directory} was trained with a different config: "
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
DAMAGED = ".damaged"  # suffix of a step directory moved aside
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it into a step directory once it commits
CHECKSUMS = "jaxvol_checksums.json"  # {relative path: [size, crc32]} of a verified step's files


def file_checksums(directory: str) -> dict:
  """{path relative to `directory`: [size in bytes, CRC-32]} of every file under it (CHECKSUMS
  itself left out)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == CHECKSUMS:
        continue
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
          crc = zlib.crc32(chunk, crc)
      out[rel] = [os.path.getsize(path), crc]
  return out


def checksum_problem(directory: str, full: bool = True) -> str | None:
  """Why the files of a step directory differ from its CHECKSUMS record, or None (also when it
  has none: steps saved before the record existed). `full`: read every byte (CRC-32), else
  compare sizes only."""
  path = os.path.join(directory, CHECKSUMS)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    return f"unreadable {CHECKSUMS}: {reason(e)}"
  for rel, (size, crc) in sorted(recorded.items()):
    file = os.path.join(directory, rel)
    if not os.path.isfile(file):
      return f"{rel} is missing"
    if os.path.getsize(file) != size:
      return f"{rel} has {os.path.getsize(file)} bytes, {size} were saved (truncated or damaged)"
  if full:
    now = file_checksums(directory)
    for rel, (_, crc) in sorted(recorded.items()):
      if now[rel][1] != crc:
        return f"{rel} does not match its checksum (damaged data)"
  return None


def reason(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (tensorstore's messages carry a JSON spec after the cause)."""
  text = " ".join(str(e).split())
  for cut in (" [source locations=", " [tensorstore_spec=", " tensorstore_spec=", ' {"'):
    if cut in text:
      text = text[:text.index(cut)]
  if len(text) > limit:  # the head says what failed, the tail why (the OS error)
    text = text[:limit // 2] + " ... " + text[-limit // 2:]
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
  """An Orbax CheckpointManager over WORKDIR/`subdir` (the run's checkpoints, or BEST).

  Keeps the `keep` newest verified steps (0: all).
  """

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, with_data: bool = True,
               subdir: str = CHECKPOINTS, create: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), subdir)
    # The data handler is always registered so that readers which skip the iterator (evaluation)
    # still know the item; `with_data` decides whether it is saved and restored.
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": IteratorHandler()}
    self.with_data = with_data
    self.keep = int(keep or 0)
    self.async_save = async_save
    self._unverified = []  # steps saved whose commit has not been checked yet
    self.skipped = []  # the damaged steps the last restore_newest passed over
    # Retention is done here (`_prune`), after verification, not by Orbax at commit time.
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                             create=create),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def save(self, step: int, state, meta: dict, data_iter=None, force: bool = False) -> bool:
    """Saves `step` (asynchronously unless async_save is off); the previous save is verified
    first.

    Raises:
      CheckpointError: this save or the previous one failed or does not read back.
    """
    self.settle()
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if self.with_data and data_iter is not None:
      items["data"] = IteratorSave(data_iter)
    try:
      saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(int(step), e)
    if saved:
      self._unverified.append(int(step))
      if not self.async_save:
        self.settle()
    return saved

  def settle(self):
    """Waits for the save in flight, verifies every unverified step, then applies retention.

    Raises:
      CheckpointError: a save failed or does not read back (its files moved aside).
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      steps, self._unverified = self._unverified, []
      self._failed(steps[-1] if steps else None, e)
    steps, self._unverified = self._unverified, []
    for step in steps:
      problem = self.problem(step)
      if problem:
        self._failed(step, CheckpointError(problem))
      if jax.process_index() == 0:
        try:
          fileio.write_json_atomic(os.path.join(self.step_dir(step), CHECKSUMS),
                                   file_checksums(self.step_dir(step)))
        except OSError as e:
          self._failed(step, e)
    if steps:
      self._prune()

  def problem(self, step: int) -> str | None:
    """Why `step` cannot be restored, by a cheap check (commit marker, metadata, the saved tree's
    metadata), or None. Damaged array bytes only show when restoring (`restore_newest`)."""
    path = self.step_dir(step)
    if not os.path.isdir(path):
      return f"{path} is missing"
    if jax.process_index() == 0 and not os.path.exists(os.path.join(path, COMMIT_MARKER)):
      return f"no commit marker ({COMMIT_MARKER}): the save never finished"
    problem = checksum_problem(path, full=False)
    if problem:
      return problem
    try:
      self.restore_meta(step)
      tree = self.manager.item_metadata(step)["state"]
      if tree is None or not jax.tree.leaves(getattr(tree, "tree", tree)):
        return "the saved state has no arrays"
    except Exception as e:  # pylint: disable=broad-except
      return reason(e)
    return None

  def _failed(self, step, error: BaseException):
    """A save that failed: its partial files moved aside; CheckpointError names the cause."""
    if step is not None and jax.process_index() == 0:
      for leftover in glob.glob(os.path.join(self.directory, f"{int(step)}.orbax-checkpoint-tmp*")):
        shutil.rmtree(leftover, ignore_errors=True)
      if os.path.isdir(self.step_dir(step)):
        self.move_aside(step)
    self.reload()
    kept = sorted(self.all_steps())
    cause = error.args[0] if isinstance(error, CheckpointError) else reason(error)
    raise CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed: {cause}; the earlier "
        f"checkpoints are intact ({', '.join(map(str, kept)) or 'none'})") from error

  def _prune(self):
    if self.keep <= 0:
      return
    for step in sorted(self.all_steps())[:-self.keep]:
      self.manager.delete(step)

  def reload(self):
    try:
      self.manager.reload()
    except Exception:  # pylint: disable=broad-except
      pass

  def move_aside(self, step: int) -> str | None:
    """Renames a damaged step directory to STEP.damaged (STEP.damaged.N if taken); returns the new
    path. Only the first process renames."""
    src = self.step_dir(step)
    if jax.process_index() != 0 or not os.path.isdir(src):
      return None
    dst, n = src + DAMAGED, 1
    while os.path.exists(dst):
      dst, n = f"{src}{DAMAGED}.{n}", n + 1
    os.rename(src, dst)
    self.reload()
    log.warning("moved the damaged checkpoint step %d aside to %s", step, dst)
    return dst

  def restore(self, abstract_state, step=None, data_iter=None):
    """Restores (state, meta) at `step` (default latest) and, if given, the iterator in place.

    No fallback: `restore_newest` tries older steps when one is damaged.
    """
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

  def restore_newest(self, abstract_state=None, data_iter=None, check: Callable | None = None,
                     steps=None, move_damaged: bool = False, what: str = "checkpoint"):
    """(step, state, meta) of the newest of `steps` (default all) that restores, or None if there
    are none.

    Args:
      abstract_state: the target (shapes and shardings); None: `local_target`.
      data_iter: a Grain iterator restored in place with the state.
      check: called with each step's metadata before its state is read; its errors (a config
        that does not match, say) propagate: they are not damage.
      steps: the candidate steps, newest first or in any order.
      move_damaged: move the damaged steps newer than the one restored aside (training).
      what: how warnings name these checkpoints.

    Raises:
      CheckpointError: there are candidates and none restores (each step and why listed).
    """
    steps = sorted(self.all_steps() if steps is None else steps, reverse=True)
    tried = self.skipped = []  # (step, why) of the damaged steps passed over, newest first
    for i, step in enumerate(steps):
      try:
        if os.path.isdir(self.step_dir(step)):
          if not os.path.exists(os.path.join(self.step_dir(step), COMMIT_MARKER)):
            raise CheckpointError(f"no commit marker ({COMMIT_MARKER}): the save never finished")
          problem = checksum_problem(self.step_dir(step))
          if problem:
            raise CheckpointError(problem)
        meta = self.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        tried.append((step, reason(e) if not isinstance(e, CheckpointError) else e.args[0]))
        self._warn(step, tried[-1][1], steps[i + 1:], what)
        continue
      if check is not None:
        check(meta)
      try:
        target = abstract_state if abstract_state is not None else self.local_target(step)
        state, meta = self.restore(target, step, data_iter=data_iter)
      except Exception as e:  # pylint: disable=broad-except
        tried.append((step, reason(e)))
        self._warn(step, tried[-1][1], steps[i + 1:], what)
        continue
      if move_damaged and tried:
        for bad, _ in tried:
          self.move_aside(bad)
        if jax.process_count() > 1:  # the others see the renames before their next save
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          multihost_utils.sync_global_devices("jaxvol_checkpoint_moved_aside")
        self.reload()
      return step, state, meta
    if tried:
      raise CheckpointError(f"no {what} under {self.directory} restores: " + "; ".join(
          f"step {s}: {r}" for s, r in tried) + "; nothing was changed (move them aside to start "
          "afresh)")
    return None

  def newest_sound(self, what: str = "checkpoint") -> int:
    """The newest step that passes the cheap check (`problem`), warning about newer ones: for
    readers of metadata only (shapes); restoring arrays goes through `restore_newest`.

    Raises:
      CheckpointError: no step passes (each named).
    """
    steps = sorted(self.all_steps(), reverse=True)
    tried = []
    for i, step in enumerate(steps):
      problem = self.problem(step)
      if problem is None:
        return step
      tried.append((step, problem))
      self._warn(step, problem, steps[i + 1:], what)
    raise CheckpointError(f"no {what} under {self.directory} is readable: " + "; ".join(
        f"step {s}: {r}" for s, r in tried))

  def _warn(self, step, why, rest, what):
    log.warning("%s step %d in %s does not restore (%s); %s", what, step, self.step_dir(step), why,
                f"trying step {rest[0]}" if rest else "no older one to try")

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
    self.settle()

  def close(self):
    """Settles the last save (raising CheckpointError if it failed) and closes the manager."""
    try:
      self.settle()
    finally:
      try:
        self.manager.close()
      except Exception:  # pylint: disable=broad-except
        pass


def parse_selection(value) -> str | int:
  """A checkpoint selection: "auto", "best", "latest" or a step (int, or a string of digits).

  Raises:
    ValueError: anything else.
  """
  if isinstance(value, bool):
    raise ConfigError(f"checkpoint selection must be auto, best, latest or a step, got {value!r}")
  if isinstance(value, int):
    if value < 0:
      return "latest"
    return value
  text = str(value).strip().lower()
  if text.isdigit():
    return int(text)
  if text in ("auto", "best", "latest"):
    return text
  raise ConfigError(f"checkpoint selection must be auto, best, latest or a step number, got "
                   f"{value!r}")


@dataclasses.dataclass
class Restored:
  """A checkpoint read by `restore_selected`."""
  state: Any
  meta: dict
  step: int
  why: str  # which checkpoint, in words ("best validation checkpoint (step 400)")
  directory: str


def restore_selected(workdir: str, selection="auto", check: Callable | None = None) -> Restored:
  """Restores the checkpoint a selection names onto this process's first device.

  "best": the step kept in WORKDIR/best_checkpoint by validation during training
  (jaxvol.train.loop); "latest": the newest of WORKDIR/checkpoints that restores (damaged newer
  ones are named in a warning and skipped); "auto": best when training validated and it restores,
  else latest; a step: that step in checkpoints/, or the best checkpoint if it holds it. Reading
  never moves or deletes anything.

  Args:
    workdir: the run's directory.
    selection: auto | best | latest | a step (parse_selection).
    check: called with a candidate's metadata before its state is read (check_same_model).

  Raises:
    FileNotFoundError: no checkpoint matches (the message lists what exists).
    CheckpointError: the chosen step, or every candidate, is damaged (one line, each named).
  """
  selection = parse_selection(selection)
  main = Checkpointer(workdir, with_data=False, async_save=False, create=False)
  best = Checkpointer(workdir, with_data=False, async_save=False, subdir=BEST, create=False)
  try:
    best_step, steps = best.latest_step(), main.all_steps()
    latest = max(steps) if steps else None
    plan = []  # (checkpointer, [steps], description of the step restored)
    if selection in ("best", "auto") and best_step is not None:
      plan.append((best, [best_step], "best validation checkpoint (step {})"))
    if selection == "best" and best_step is None:
      raise FileNotFoundError(f"{best.directory}: no best checkpoint (training kept one only "
                              "with config.train.validate_every > 0); use --checkpoint=latest"
                              + (f" (latest step {latest})" if latest is not None else ""))
    if selection in ("latest", "auto") and steps:
      plan.append((main, steps, "latest checkpoint (step {})" + (
          "; no validation ran during training, so no best checkpoint exists"
          if selection == "auto" and best_step is None else "")))
    if isinstance(selection, int):
      if selection in steps:
        plan.append((main, [selection], "checkpoint step {} (chosen by step)"))
      elif selection == best_step:
        plan.append((best, [selection], "checkpoint step {} (the best one)"))
      else:
        raise FileNotFoundError(f"no checkpoint for step {selection} in {main.directory} "
                                f"(available: {sorted(steps)}; best: {best_step})")
    if not plan:
      raise FileNotFoundError(f"no checkpoint found under {main.directory}: train first")
    failures = []
    for ckpt, candidates, why in plan:
      try:
        found = ckpt.restore_newest(None, check=check, steps=candidates,
                                    what="best checkpoint" if ckpt is best else "checkpoint")
      except CheckpointError as e:
        failures.append(e.args[0])
        continue
      why = why.format(found[0])
      if ckpt.skipped:
        why += "; newer damaged step(s) skipped: " + ", ".join(str(st) for st, _ in ckpt.skipped)
      if failures:
        why += " (the best checkpoint does not restore)"
      return Restored(found[1], found[2], int(found[0]), why, ckpt.directory)
    raise CheckpointError("; ".join(failures))
  finally:
    main.close()
    best.close()
