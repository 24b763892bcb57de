"""The training loop: data, state, compiled step, logging, checkpoints, clean stops.

`train(config, workdir)` resumes automatically from the latest checkpoint in WORKDIR. SIGTERM and
Ctrl-C finish the current step, save a checkpoint (state + data iterator) and return, so a
preempted job resumes where it stopped. A non-finite loss raises before anything is saved.
A fresh run first copies the parameters its method asks for from other runs (a frozen earlier
stage, a warm start: jaxvol.train.transfer), and the optimizer never updates frozen ones.
Summaries: clu metrics for averaging, TensorBoard event files written with tensorboardX (no
TensorFlow needed), progress lines with steps/s and ETA; only process 0 writes.

On several hosts every process runs this same loop: each reads its block of the global batch
(`distributed.batch_shard`), so a step trains on the same rows whatever the number of hosts; all
take part in every checkpoint (Orbax writes each array once) and stop at the same step.

Progress records: at every progress line (the first step, every `train.log_every` steps and the
last step) process 0 appends one JSON object to WORKDIR/progress.jsonl, a line each, flushed:
{"step", "time" (unix seconds), "seconds" (training wall seconds since step 0, summed over the
resumed runs of this WORKDIR; setup and compilation excluded), "steps_per_s" (since the previous
record), "loss", "grad_norm" (averaged since the previous record)}. `train` also returns this
call's records as result["progress"], and `read_progress(workdir)` reads the file. A resumed run
first drops the records past the step it resumes from (written by a run that died after its last
checkpoint) and continues `seconds` from the last record it keeps. WORKDIR/train_step_cost.json
holds the compiled step's per-device bytes, FLOPs and "compile_seconds" (the ahead-of-time
compilation of this call).
"""

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics
from jax.experimental import multihost_utils
from clu import parameter_overview

from jaxvol import fileio
from jaxvol import methods
from jaxvol.data import inference as inference_lib
from jaxvol.data import nifti
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.parallel import cost as cost_lib
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import distributed
from jaxvol.train import lock as lock_lib
from jaxvol.train import state as state_lib
from jaxvol.train import step as step_lib
from jaxvol.train import transfer

log = logging.getLogger("jaxvol")

PROGRESS_FILE = "progress.jsonl"
VALIDATION_FILE = "validation.jsonl"
LOWER_IS_BETTER = ("nmse", "mae", "hfen", "recon_mse")


def modality_keys(config) -> dict:
  """Pipeline output keys -> store modalities: in0, in1, ... for the inputs, and the target."""
  keys = {f"in{i}": m for i, m in enumerate(config.data.inputs)}
  keys["target"] = config.data.target
  return keys


def assemble_batch(raw: dict, n_inputs: int) -> dict:
  """Stacks the input modalities (then the position channels, if any) into the condition.

  No inputs and no positions: an unconditional model, whose condition has 0 channels.
  """
  target = raw["target"]
  parts = [raw[f"in{i}"] for i in range(n_inputs)]
  if "position" in raw:
    parts.append(raw["position"])
  if not parts:
    return {"cond": np.zeros(target.shape[:-1] + (0,), target.dtype), "target": target}
  return {"cond": np.concatenate(parts, axis=-1), "target": target}


def presets_of(store) -> dict:
  return {s["id"]: {m: v["preset"] for m, v in s["volumes"].items()} for s in store.subjects()}


def training_spacing(store, config) -> list[float] | None:
  """The median RAS voxel size (mm) of the training split's volumes: what `jaxvol.predict`
  resamples a user's scan to. None when the split is empty."""
  mod = (list(config.data.inputs) or [config.data.target])[0]
  sizes = [np.linalg.norm(nifti.ras_affine(store.geometry(s["id"], mod))[:3, :3], axis=0)
           for s in store.subjects(config.data.train_split) if mod in s["volumes"]]
  return [float(v) for v in np.median(sizes, axis=0)] if sizes else None


def run_meta(config, store_path: str) -> dict:
  """The checkpoint metadata: config, every subject's preset, and how each input's and the
  target's preset is known at inference (jaxvol.data.inference rules), so that a store without
  targets, or a user's own store, is normalised and mapped back as training was."""
  store = store_lib.Store(store_path)
  return {"config": json.loads(config.to_json_best_effort()), "presets": presets_of(store),
          "spacing": training_spacing(store, config),
          "inference_presets": inference_lib.rules_of(store, config.data.inputs,
                                                      config.data.target),
          "store": os.path.abspath(store_path)}




def check_target_range(config, store_path: str) -> float | None:
  """Warns when the training targets, normalised, leave the sampler's x0 clamp.

  PET and MRI presets do not clip (jaxvol.data.presets), so a clamp at 1 would cut hot lesions
  and bright tissue; the configs widen it (jaxvol.config.clamp_for_preset). Reads only the
  manifest's per-volume statistics. Returns the largest |normalised target| (None when the
  method does not clamp).
  """
  bound = float(config.diffusion.clip_x0)
  if not methods.method_class(config).CLAMPS_X0 or bound <= 0:
    return None
  store = store_lib.Store(store_path)
  peak = 0.0
  for s in store.subjects(config.data.train_split):
    vol = s["volumes"].get(config.data.target)
    if vol is None:
      continue
    preset = store.preset(s["id"], config.data.target)
    lo, hi = preset.forward(np.array([vol["stats"]["min"], vol["stats"]["max"]], np.float64))
    peak = max(peak, abs(float(lo)), abs(float(hi)))
  if peak > bound:
    log.warning("training targets reach %.3g in network units but the sampler clamps x0 to "
                "[-%g, %g] (config.diffusion.clip_x0): the brightest voxels cannot be predicted; "
                "widen the clamp or clip in the preset", peak, bound, bound)
  return peak


def check_residual(config, store_path: str) -> None:
  """Refuses residual learning (config.model.residual adds the first input to the network's
  clean-image estimate) on a store that normalises that input unlike the target: the sum would
  mix two intensity scales. Compares the two presets of every training subject."""
  if not methods.base.residual_of(config):
    return
  store = store_lib.Store(store_path)
  first, target = config.data.inputs[0], config.data.target
  for s in store.subjects(config.data.train_split):
    if first not in s["volumes"] or target not in s["volumes"]:
      continue
    a, b = store.preset(s["id"], first), store.preset(s["id"], target)
    if a != b:
      raise ValueError(
          f"config.model.residual adds the input {first!r} to the prediction, but "
          f"{store.path} normalises it unlike the target {target!r} (subject {s['id']}: {a} vs "
          f"{b}); residual learning needs one intensity preset for both (the target converted "
          f"with ref={first} and no scale of its own): set model.residual=False")


def warn_inference_presets(config, store_path: str) -> None:
  """Says at training start when evaluation will refuse this store's presets (not for an
  unconditional model: it generates, and nothing predicts a target's scale)."""
  if not config.data.inputs:
    return
  store = store_lib.Store(store_path)
  try:
    inference_lib.check_rules(inference_lib.rules_of(store, config.data.inputs,
                                                     config.data.target),
                              config.data.inputs, config.data.target, store.path)
  except ValueError as e:
    log.warning("evaluation of this run will be refused: %s", e)


def read_progress(workdir: str, name: str = PROGRESS_FILE) -> list[dict]:
  """The progress records of WORKDIR/progress.jsonl (or of another record file of the loop,
  `name`: VALIDATION_FILE), oldest first; [] when there is none.

  A last line cut short (a process killed while writing it) is left out.
  """
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # no newline after it: the write was interrupted
        break
      raise ValueError(f"{path}, line {i + 1}: not a JSON progress record: {line[:80]!r}")
  return records


def _resume_progress(workdir: str, step: int, write: bool) -> float:
  """Training seconds at `step` from the records so far; with `write`, drops later records.

  Records past `step` come from a run that died after its last checkpoint: the steps they
  describe are trained again, so they leave the file (rewritten atomically) and the clock
  continues from the last record at or before `step`.
  """
  kept = [r for r in read_progress(workdir) if r["step"] <= step]
  path = os.path.join(workdir, PROGRESS_FILE)
  if write and os.path.exists(path):  # (also ends the file with a whole line before appending)
    fileio.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
  return float(kept[-1]["seconds"]) if kept else 0.0


def _append_progress(workdir: str, record: dict, name: str = PROGRESS_FILE) -> None:
  with open(os.path.join(workdir, name), "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()


def read_validation(workdir: str) -> list[dict]:
  """The validation records of WORKDIR/validation.jsonl (`Validation`), oldest first."""
  return read_progress(workdir, VALIDATION_FILE)


class Validation:
  """Scores the model on the validation set every config.train.validate_every steps and keeps
  the best step's checkpoint.

  `validate(params, step) -> {metric: value}` is handed in (jaxvol.eval.evaluate.validator: the
  one inference path over config.eval.val_split / val_region); it receives the EMA parameters
  (or the raw ones with config.eval.use_ema off) as host arrays. Each validation appends
  {"step", "seconds", metric: value..., "best_step", "best"} to WORKDIR/validation.jsonl; when
  config.train.validate_metric improves (higher PSNR/SSIM, lower NMSE/MAE/HFEN) the state is
  saved to WORKDIR/best_checkpoint (one step kept, written synchronously; evaluate, sample and
  predict use it by default: jaxvol.train.checkpoint.restore_selected). With config.train.patience
  P > 0, training stops after P validations in a row without improvement. A stop by a signal
  saves its checkpoint without validating (a preemption's grace period is short). A resumed run drops
  the records past its step and recovers the best score and the patience count from the rest.
  """

  def __init__(self, config, workdir: str, validate, start: int, is_main: bool):
    self.every = int(config.train.get("validate_every", 0))
    self.patience = int(config.train.get("patience", 0))
    self.metric = str(config.train.get("validate_metric", "psnr"))
    self.sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
    self.workdir, self.validate, self.is_main = workdir, validate, is_main
    self.use_ema = bool(config.eval.use_ema)
    kept = [r for r in read_validation(workdir) if r["step"] <= start]
    path = os.path.join(workdir, VALIDATION_FILE)
    if is_main and os.path.exists(path):
      fileio.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    self.best, self.best_step, self.since_best = None, None, 0
    for r in kept:
      self._count(r["step"], r[self.metric])
    self.ckpt = None  # WORKDIR/best_checkpoint, opened at the first save

  @property
  def active(self) -> bool:
    return self.every > 0 and self.validate is not None

  def due(self, step: int, done: bool) -> bool:
    return self.active and (step % self.every == 0 or done)

  def _count(self, step: int, value: float) -> bool:
    better = self.best is None or self.sign * value > self.sign * self.best
    if better:
      self.best, self.best_step, self.since_best = value, step, 0
    else:
      self.since_best += 1
    return better

  def __call__(self, step: int, state, meta: dict, writer) -> str | None:
    """Validates at `step`; returns why training should stop (a plateau) or None."""
    t0 = time.time()
    params = _host_tree(state["ema_params"] if self.use_ema else state["params"])
    scores = {k: float(v) for k, v in self.validate(params, step).items()}
    if self.metric not in scores:
      raise KeyError(f"validation returned {sorted(scores)}, not config.train.validate_metric "
                     f"{self.metric!r}")
    better = self._count(step, scores[self.metric])
    if better:
      if self.ckpt is None:
        self.ckpt = ckpt_lib.Checkpointer(self.workdir, keep=1, async_save=False,
                                          with_data=False, subdir=ckpt_lib.BEST)
      self.ckpt.save(step, state, meta, force=True)
      self.ckpt.wait()
    record = {"step": step, "seconds": time.time() - t0, **scores, "best_step": self.best_step,
              "best": self.best}
    if self.is_main:
      _append_progress(self.workdir, record, VALIDATION_FILE)
      log.info("validation at step %d: %s%s (best %.4g at step %d, %.1f s)", step,
               "  ".join(f"{k} {v:.4g}" for k, v in scores.items()),
               " new best, checkpoint kept" if better else "", self.best, self.best_step,
               record["seconds"])
    writer.scalars(step, {f"val/{k}": v for k, v in scores.items()})
    if self.patience > 0 and self.since_best >= self.patience:
      return (f"validation plateau: no better {self.metric} in {self.since_best} validations "
              f"(best {self.best:.4g} at step {self.best_step})")
    return None

  def close(self):
    if self.ckpt is not None:
      self.ckpt.close()


def _host_tree(tree):
  """A train-state subtree as host numpy arrays (gathered over processes on several hosts)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class _StopFlag:
  """Turns SIGTERM/SIGINT into a flag the loop polls between steps."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class SummaryWriter:
  """TensorBoard scalars via tensorboardX on process 0; a no-op elsewhere."""

  def __init__(self, logdir: str):
    self._w = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter as _W  # pylint: disable=g-import-not-at-top
      self._w = _W(logdir)

  def scalars(self, step: int, values: dict):
    if self._w is not None:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), step)

  def close(self):
    if self._w is not None:
      self._w.flush()
      self._w.close()


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything a train step needs but data and values (`build_everything`).

  Attributes:
    mesh: the ("data", "spatial", "model") device mesh.
    method: the method (jaxvol.methods), its network built for this platform's compute dtype.
    optimizer: the optax optimizer, with the frozen / learning-rate groups of `transfer`.
    example: the abstract batch ({"cond", "target"} ShapeDtypeStructs of the global batch).
    abstract_state: the train state's ShapeDtypeStructs, carrying `state_sharding`.
    state_sharding: the train state's shardings, with config.mesh.state_sharding applied.
    state_sharding_mode: the mode in effect ("replicated" when data x spatial is one device).
    param_notes: parameter axes that fell back to replication.
    transfer: the parameter-transfer plan (jaxvol.train.transfer.Plan).
    compute_params_sharding: the method's own parameter layout, where the network uses them
      (samplers take it whatever the train state's layout).
  """

  mesh: jax.sharding.Mesh
  method: Any
  optimizer: Any
  example: dict
  abstract_state: Any
  state_sharding: Any
  state_sharding_mode: str
  param_notes: list
  transfer: Any
  compute_params_sharding: Any


def resolve_whole_crop(config) -> None:
  """With `config.data.crops == "whole"` (the PPDM configs' `fullvolume` token), sets
  config.data.crop_size to the training split's whole training region padded to the method's
  spatial multiple (jaxvol.data.pipeline.whole_crop_size), read from the store's manifest; a no-op
  for crops of a configured size or when there is no store to read (`jaxvol plan` without data)."""
  if config.data.get("crops", "random") != "whole":
    return
  if not config.data.store or not os.path.isfile(os.path.join(config.data.store, "manifest.json")):
    return
  mult = methods.build(config, jax.devices()[0].platform).spatial_multiple()
  size = pipeline.whole_crop_size(config.data.store, config.data.train_split,
                                  config.data.train_region, mult)
  if tuple(config.data.crop_size) != tuple(size):
    log.info("whole-region training: crop_size %s (the training region padded to %s)", size, mult)
  config.data.crop_size = size


def build_everything(config, workdir: str, check: bool = True) -> TrainSetup:
  """Mesh, method, optimizer, abstract state and shardings: everything but data and values.

  Args:
    config: the run's config.
    workdir: the run's directory (unused here; the same signature as the other entry points).
    check: raise when the mesh cannot split the batch and crop evenly (jaxvol.train.plan warns
      instead).

  Returns:
    A TrainSetup.

  Raises:
    ValueError: an unknown config.mesh.state_sharding, or (with `check`) a batch or crop the mesh
      cannot split.
  """
  del workdir
  mesh = mesh_lib.make_mesh(config.mesh)
  if check:
    mesh_lib.check_batch(mesh, config.data.batch_size, config.data.crop_size)
  method = methods.build(config, jax.devices()[0].platform)
  mult = method.spatial_multiple()
  if any(int(c) % m for c, m in zip(config.data.crop_size, mult)):
    raise ValueError(f"crop_size {tuple(config.data.crop_size)} must be a multiple of {mult} "
                     f"for method {config.method}")
  example = method.abstract_batch(config.data.batch_size, config.data.crop_size)
  # Frozen stages and warm starts (PRDiT) decide the optimizer's per-parameter labels; from
  # shapes and checkpoint metadata only, so planning allocates nothing.
  plan = transfer.plan(config, method, method.param_shapes(example))
  optimizer = state_lib.make_optimizer(config.train, plan.labels, plan.lr_scales)
  shapes = state_lib.state_shapes(method, optimizer, example)
  # Replicated, except what the method names for sharding (the residual DiT's kernels over
  # "model"); config.mesh.state_sharding then spreads the EMA copy and the optimizer moments
  # ("zero1"), or the parameters too ("fsdp"), of the rest over the "data" and "spatial" devices.
  compute_sharding, notes = sharding_lib.param_shardings(mesh, shapes["params"],
                                                         method.param_axes(example))
  mode = state_sharding_mode(config)
  params_sharding, moments_sharding = sharding_lib.state_layouts(
      mesh, shapes["params"], compute_sharding, mode,
      int(config.mesh.get("state_sharding_min_size", sharding_lib.DEFAULT_MIN_SIZE)))
  if sharding_lib.state_axes_size(mesh) == 1:
    mode = "replicated"  # nothing to split over: exactly the replicated state and step
  state_sharding = sharding_lib.state_shardings(mesh, shapes, params_sharding,
                                                moments_sharding=moments_sharding)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, state_sharding)
  return TrainSetup(mesh=mesh, method=method, optimizer=optimizer, example=example,
                    abstract_state=abstract, state_sharding=state_sharding,
                    state_sharding_mode=mode, param_notes=notes, transfer=plan,
                    compute_params_sharding=compute_sharding)


def state_sharding_mode(config) -> str:
  """config.mesh.state_sharding ("replicated" for configs written before the field existed)."""
  return str(config.mesh.get("state_sharding", "replicated"))


def compile_step(parts, config, batch_sharding=None):
  """Compiles the train step ahead of time from abstract inputs; returns (compiled, cost).

  `batch_sharding` overrides the mesh's batch layout (jaxvol.train.plan, for crops the mesh does
  not divide). Traced with the logical axis rules active, so the models' constraints apply.
  """
  method = parts.method
  if parts.state_sharding_mode != "replicated":
    # ZeRO / FSDP: the network sees its parameters, and gives their gradients, in the method's own
    # layout; the state keeps the split one (jaxvol.parallel.sharding.GatheredMethod).
    method = sharding_lib.GatheredMethod(method, parts.compute_params_sharding)
  step_fn = step_lib.make_train_step(method, parts.optimizer, config.train.ema_decay,
                                     frozen=getattr(parts.transfer, "frozen", None))
  mesh = parts.mesh
  bsh = batch_sharding or mesh_lib.batch_sharding(mesh)
  jitted = step_lib.jit_train_step(step_fn, parts.state_sharding, bsh, mesh_lib.replicated(mesh))
  abatch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh) for k, v in parts.example.items()}
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=mesh_lib.replicated(mesh))
  with sharding_lib.activated(mesh):
    compiled = jitted.lower(parts.abstract_state, abatch, rng).compile()
  return compiled, cost_lib.compiled_cost(compiled)


def train(config, workdir: str, validate=None, force: bool = False) -> dict:
  """Trains until config.train.steps (or a signal / time limit / validation plateau).

  The workdir is locked while training runs (jaxvol.train.lock): a second run on it refuses.

  Args:
    config: the run's config.
    workdir: checkpoints, records and summaries go here; an existing run resumes.
    validate: `validate(params, step) -> {metric: value}` for `Validation` (None: no validation
      even with config.train.validate_every > 0).
    force: take over a workdir lock held by a live run or another host.

  Returns:
    {"step", the last logged metrics..., "stopped": why it stopped early ("signal 15", "time limit
    of 10.0 min", ...) or None, "signal": the signal number or None, "progress": this call's
    progress records (module docstring), oldest first}.
  """
  os.makedirs(workdir, exist_ok=True)
  with lock_lib.WorkdirLock(workdir, force=force, enabled=jax.process_index() == 0):
    return _train(config, workdir, validate)


def _train(config, workdir: str, validate) -> dict:
  """`train` under the workdir lock."""
  resolve_whole_crop(config)
  pipeline.check_position_coverage(config.data.train_region, config.data.eval_region,
                                   pipeline.position_axes(config.data))
  parts = build_everything(config, workdir)
  transfer.check_complete(parts.transfer)  # before any data worker or checkpoint starts
  mesh = parts.mesh
  is_main = jax.process_index() == 0
  bsh = mesh_lib.batch_sharding(mesh)
  global_shapes = {k: v.shape for k, v in parts.example.items()}

  # This host reads the rows of the global batch that its devices hold, so step k trains on the
  # same global batch, row for row, on any number of hosts.
  shard, num_shards = distributed.batch_shard(bsh, global_shapes["target"])
  data_iter = pipeline.make_train_iterator(
      config.data.store, config.data.train_split, modality_keys(config), tuple(config.data.crop_size),
      config.data.batch_size, seed=config.seed, num_workers=config.data.num_workers,
      flips=config.data.flips, region=config.data.train_region,
      positions=pipeline.position_axes(config.data), process_index=shard,
      process_count=num_shards, crops=config.data.get("crops", "random"))
  meta = run_meta(config, config.data.store)
  check_residual(config, config.data.store)
  warn_inference_presets(config, config.data.store)
  check_target_range(config, config.data.store)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  try:
    # The newest checkpoint that restores; damaged newer ones are moved aside (STEP.damaged).
    found = ckpt.restore_newest(
        parts.abstract_state, data_iter=data_iter, move_damaged=True,
        check=lambda meta: ckpt_lib.check_same_model(meta, config, ckpt.directory))
  except BaseException:
    ckpt.close()
    data_iter = None  # stops Grain worker processes
    raise
  if found is not None:
    start, state, _ = found
    log.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    state = state_lib.create_state(parts.method, parts.optimizer,
                                   jax.random.PRNGKey(config.seed), parts.example,
                                   parts.state_sharding)
    state = transfer.load(parts.transfer, state)
    start = 0
    # The statistics are computations on global arrays, in which every host takes part (clu's
    # "global" mode); only process 0 logs them.
    overview = parameter_overview.get_parameter_overview(
        state["params"], include_stats="global" if jax.process_count() > 1 else True)
    if is_main:
      table = os.path.join(workdir, "parameters.txt")
      fileio.write_text_atomic(table, overview + "\n")
      count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
      log.info("%s parameters; the table of every array is in %s", f"{count:,}", table)
  if is_main and parts.transfer.labels is not None:
    log.info("parameter groups: %s",
             transfer.describe(parts.transfer, parts.abstract_state["params"]))

  t_compile = time.time()
  compiled, cost = compile_step(parts, config)
  cost["compile_seconds"] = time.time() - t_compile
  if is_main:
    log.info("train step compiled in %.1f s: %.1f MiB per device (temp %.1f MiB), %.2f GFLOPs "
             "per step, mesh %s, state %s", cost["compile_seconds"], cost.get("bytes", 0) / 2**20,
             cost.get("temp_bytes", 0) / 2**20, cost["flops"] / 1e9, dict(mesh.shape),
             parts.state_sharding_mode)
    fileio.write_json_atomic(os.path.join(workdir, "train_step_cost.json"), cost)

  if int(config.train.get("validate_every", 0)) > 0 and validate is None:
    log.warning("config.train.validate_every is set but no validation function was given: "
                "no validation, no best checkpoint")
  validation = Validation(config, workdir, validate, start, is_main)
  rng = jax.device_put(jax.random.PRNGKey(config.seed + 1), mesh_lib.replicated(mesh))
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  total = int(config.train.steps)
  time_limit = float(config.train.time_limit_minutes) * 60.0
  history, last, progress = [], {}, []
  stopped = {"stopped": None, "signal": None}  # why training ended before config.train.steps
  seconds_before = _resume_progress(workdir, start, write=is_main)  # earlier runs' training time
  t_start = t_log = time.time()
  paused = 0.0  # seconds spent validating
  steps_at_log = start
  step = start

  def save(step_now, force=False, iterator=data_iter):
    bad = [h for h in jax.device_get(history) if h["finite"] < 1.0]
    if bad:
      raise FloatingPointError(
          f"non-finite loss or gradient before step {step_now} (loss={bad[0]['loss']}); "
          f"training stopped, the last checkpoint ({ckpt.latest_step()}) is kept unchanged")
    ckpt.save(step_now, state, meta, iterator, force=force)

  try:
    with _StopFlag() as stop:
      while step < total:
        raw = assemble_batch(next(data_iter), len(config.data.inputs))
        batch = {k: jax.make_array_from_process_local_data(bsh, raw[k], global_shapes[k])
                 for k in ("cond", "target")}
        state, metrics = compiled(state, batch, rng)
        if history:
          # At most two steps in flight: the host does not run ahead of the device, so a signal
          # or the time limit acts within a step, not after a long queue of dispatched steps.
          jax.block_until_ready(history[-1]["loss"])
        history.append(metrics)
        step += 1
        stopping = agree(stop.signal is not None or (
            time_limit > 0 and time.time() - t_start > time_limit))
        done = step == total or stopping
        if step % config.train.log_every == 0 or done or step == start + 1:
          # (the first step too: progress and an ETA within seconds of the start)
          fetched = jax.device_get(history)
          last = average_metrics(fetched)
          if last["finite"] < 1.0:
            save(step)  # raises with a clear message; nothing is written
          now = time.time()
          rate = (step - steps_at_log) / max(now - t_log, 1e-9)
          eta = (total - step) / max(rate, 1e-9)
          if is_main:
            log.info("step %d/%d  loss %.4f  grad_norm %.3f  %.2f steps/s  ETA %s", step, total,
                     last["loss"], last["grad_norm"], rate, _fmt_time(eta))
          writer.scalars(step, {f"train/{k}": v for k, v in last.items()} | {"train/steps_per_s": rate})
          progress.append({"step": step, "time": now,
                           "seconds": seconds_before + now - t_start - paused,
                           "steps_per_s": rate, "loss": last["loss"],
                           "grad_norm": last["grad_norm"]})
          if is_main:
            _append_progress(workdir, progress[-1])
          t_log, steps_at_log, history = now, step, []
        plateau = None
        # A signal (a preemption's notice) saves before anything else: validating first could
        # outlast the grace period. The resumed run validates on its schedule.
        signalled = stopping and agree(stop.signal is not None)
        if validation.due(step, done) and not signalled:
          t_val = time.time()
          plateau = validation(step, state, meta, writer)
          # Validation is not training: the step rate and the training seconds leave it out.
          paused += time.time() - t_val
          t_log += time.time() - t_val
          if plateau is not None and not stopping:
            stopping = done = True
        if step % config.train.checkpoint_every == 0 or done:
          save(step, force=True)
          history = []
        if stopping:
          why = f"signal {stop.signal}" if stop.signal is not None else (
              plateau if plateau is not None else
              f"time limit of {time_limit / 60:.1f} min" if time_limit > 0 else "another host's stop")
          log.info("%s at step %d: checkpoint saved, exiting", why, step)
          stopped = {"stopped": why, "signal": stop.signal}
          break
  finally:
    try:
      ckpt.close()  # waits for the last save and verifies it (CheckpointError if it failed)
    finally:
      validation.close()
      writer.close()
      del data_iter  # stops Grain worker processes before interpreter shutdown
  return {"step": step, **last, **stopped, "progress": progress,
          "best_step": validation.best_step, "best": validation.best}


def agree(flag: bool) -> bool:
  """True on every host if it is true on any: hosts must stop (and save) at the same step."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def average_metrics(history: list[dict]) -> dict:
  """Averages a logging window of per-step metrics with clu's mergeable Average metric."""
  totals = {}
  for h in history:
    for k, v in h.items():
      m = clu_metrics.Average.from_model_output(jnp.asarray(v, jnp.float32))
      totals[k] = m if k not in totals else totals[k].merge(m)
  return {k: float(m.compute()) for k, m in totals.items()}


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
