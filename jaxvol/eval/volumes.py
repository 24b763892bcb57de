"""What evaluation reads besides the model: the checkpoint's parameters and inference rules, the
box of each volume that is predicted and scored, the store's subjects as the runner's `Volume`s,
and what is scored beside the model (the floors: the input, the training targets' mean; and the
classical references, tuned on the training split's training region).

Used by jaxvol.eval.evaluate (evaluate, sample, validation), jaxvol.eval.generate,
jaxvol.eval.pnp, jaxvol.predict and the experiments. No target reaches a prediction: inputs are
normalised by the checkpoint's inference rules (jaxvol.data.inference), and the floors and
references read the training split only.
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import fileio
from jaxvol.data import inference as inference_lib
from jaxvol.data import pipeline
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import references as references_lib
from jaxvol.eval import runner
from jaxvol.train import checkpoint as ckpt_lib

log = logging.getLogger("jaxvol")


def checkpoint_selection(config):
  """The checkpoint config.eval names: checkpoint_step when >= 0 (older commands), else
  config.eval.checkpoint (auto | best | latest | a step)."""
  step = config.eval.get("checkpoint_step", -1)
  if step is not None and int(step) >= 0:
    return int(step)
  return ckpt_lib.parse_selection(config.eval.get("checkpoint", "auto"))


def load_params(config, workdir: str, with_meta: bool = False):
  """Restores (params, step) (and the checkpoint's metadata with `with_meta`) of the checkpoint
  `checkpoint_selection` names (the best validation step by default, else the latest; logged):
  EMA weights unless config.eval.use_ema is off. The metadata gets "checkpoint_choice", the line
  that says which checkpoint it is. A damaged checkpoint is skipped for the next older one
  (with a warning) unless a step was chosen (jaxvol.train.checkpoint.restore_selected)."""
  found = ckpt_lib.restore_selected(  # onto this process's first device, whatever mesh saved it
      workdir, checkpoint_selection(config),
      check=lambda meta: ckpt_lib.check_same_model(meta, config, workdir))
  state, meta, step, why = found.state, found.meta, found.step, found.why
  log.info("using the %s of %s", why, workdir)
  params = state["ema_params"] if config.eval.use_ema else state["params"]
  params = jax.tree.map(jnp.asarray, params)
  meta = dict(meta or {}, checkpoint_choice=why)
  return (params, int(step), meta) if with_meta else (params, int(step))


def inference_rules(config, store, meta: dict, where: str) -> dict:
  """The checkpoint's inference-preset rules (jaxvol.data.inference), or for checkpoints saved
  before they were recorded, the store's; checked so that no target volume sets a scale."""
  rules = (meta or {}).get("inference_presets")
  source = f"checkpoint {where}"
  if not rules:
    rules = inference_lib.rules_of(store, config.data.inputs, config.data.target)
    source = f"store {store.path}"
  inference_lib.check_rules(rules, config.data.inputs, config.data.target, source)
  return rules


def volume_inputs(store, subject_id: str, config, box, rules=None):
  """The condition (1, D, H, W, C) of a subject's box, each input on the scale `rules` give it
  (re-normalised from the store's own preset when the two differ: a store converted with other
  presets than the training store's)."""
  def one(m):
    x = store.read(subject_id, m, box)
    if rules is None:
      return x
    want, have = inference_lib.resolve(rules, m, store, subject_id), store.preset(subject_id, m)
    if want != have:
      log.warning("%s/%s: the store's preset %s differs from the checkpoint's %s; re-normalising "
                  "the input to the checkpoint's scale", subject_id, m, have, want)
      x = want.forward(have.inverse(x))
    return np.asarray(x, np.float32)
  chans = np.stack([one(m) for m in config.data.inputs], axis=-1)
  if config.data.get("position_channels", False):
    pos = pipeline.position_grid(store.shape(subject_id), box,
                                 pipeline.position_axes(config.data))
    chans = np.concatenate([chans, pos], axis=-1)
  return chans[None].astype(np.float32)


def max_box(config) -> tuple[int, int, int] | None:
  """config.eval.max_box as 3 ints (each at least SSIM's 11-voxel window), or None for () (the
  whole evaluation region)."""
  value = tuple(config.eval.get("max_box", ()) or ())
  if not value:
    return None
  if len(value) != 3 or any(int(v) != v for v in value):
    raise ValueError(f"eval.max_box must be () or 3 ints (D, H, W), got {value}")
  if min(value) < metrics_lib.SSIM_WIN_SIZE:
    raise ValueError(f"eval.max_box {value} has a side under {metrics_lib.SSIM_WIN_SIZE} voxels, "
                     "the window of the SSIM every evaluation reports")
  return tuple(int(v) for v in value)


def clip_box(box, limit):
  """`box` ((start, stop) per axis) cut to at most `limit` voxels per axis, centred in it (the
  extra voxel of an odd margin goes after the box); `box` itself when `limit` is None."""
  if limit is None:
    return tuple(box)
  out = []
  for (a, b), m in zip(box, limit):
    if b - a > m:
      a += (b - a - m) // 2
      b = a + m
    out.append((a, b))
  return tuple(out)


def eval_box(subject, config):
  """The voxel box of a subject that is predicted and scored: config.data.eval_region (or the
  whole volume), clipped to config.eval.max_box."""
  shape = tuple(subject["shape"])
  region = config.data.eval_region
  box = pipeline.region_box(shape, region) if region else tuple((0, s) for s in shape)
  return clip_box(box, max_box(config))


class TrainingMeanFloor:
  """A predictor that never looks at its input: the mean of the training targets.

  Where every training subject shares the evaluated volume's grid (and training used whole
  volumes), the prediction is their voxelwise mean, in original units; otherwise (a region split,
  or subjects on different grids) it is the mean intensity of the training targets inside their
  body masks (metrics.body_mask) over their training regions, the constant that scores best where
  metrics are computed (a mean that counts the background scores far below it). A model that
  does not beat this floor has not shown that it uses its input: with test subjects whose anatomy
  the training set already holds, the voxelwise mean can score well without denoising anything.
  """

  def __init__(self, config, store):
    self._target = config.data.target
    self._train = [s for s in store.subjects(config.data.train_split)
                   if self._target in s["volumes"]]
    self._store, self._region = store, config.data.train_region
    self._cache = {}

  def _raw(self, sid, box=None):
    return self._store.preset(sid, self._target).inverse(
        self._store.read(sid, self._target, box)).astype(np.float32)

  def available(self) -> bool:
    return bool(self._train)

  def __call__(self, subject, box) -> tuple[np.ndarray, str]:
    """(prediction over `box`, how it was formed) for an evaluated subject."""
    shape = tuple(subject["shape"])
    others = [s for s in self._train if s["id"] != subject["id"]]
    if not self._region and others and all(tuple(s["shape"]) == shape for s in others):
      key = ("voxelwise", tuple(s["id"] for s in others), box)
      if key not in self._cache:
        self._cache[key] = np.mean([self._raw(s["id"], box) for s in others], axis=0)
      return self._cache[key], f"voxelwise mean of {len(others)} training target(s)"
    if "scalar" not in self._cache:
      total, count = 0.0, 0
      for s in self._train:
        region = pipeline.region_box(tuple(s["shape"]), self._region) if self._region else None
        v = self._raw(s["id"], region)
        body = v[metrics_lib.body_mask(v)]  # the background would pull the floor to ~0
        total, count = total + float(body.sum(dtype=np.float64)), count + body.size
      self._cache["scalar"] = total / max(count, 1)
    box_shape = tuple(b - a for a, b in box)
    return (np.full(box_shape, self._cache["scalar"], np.float32),
            f"mean intensity inside the body of {len(self._train)} training target(s)")


def store_volumes(config, store, subjects, rules, with_metrics: bool, floor=None,
                  classical=None):
  """The runner's volumes (jaxvol.eval.runner.Volume) of a store's subjects: each subject's
  evaluation box (`eval_box`) as the condition, the target preset from the checkpoint's rules,
  and with `with_metrics` the target and the reference predictions (the input where it shares
  the target's scale and config.eval.input_baseline is on; the training-target mean `floor`;
  the tuned classical references `classical` ({name: jaxvol.eval.references.tune_one entry}),
  applied to the whole input volume and cut to the box)."""
  first_input = config.data.inputs[0]
  comparable = inference_lib.shares_scale(rules, first_input, config.data.target)
  for subject in subjects:
    sid = subject["id"]
    box = eval_box(subject, config)
    cond = volume_inputs(store, sid, config, box, rules)
    # The target's scale from the rules: the same with or without the target in the store.
    target_preset = inference_lib.resolve(rules, config.data.target, store, sid)
    shape, background = tuple(subject["shape"]), float(target_preset.inverse(-1.0))

    def place(raw, shape=shape, box=box, background=background):
      full = np.full(shape, background, np.float32)
      full[tuple(slice(a, b) for a, b in box)] = raw
      return full

    row = {"box": [list(b) for b in box]}
    target = data_range = preview_input = None
    references = {}
    if with_metrics and config.data.target not in subject["volumes"]:
      row["note"] = f"no {config.data.target!r} volume in the store: prediction only, not scored"
      log.warning("%s: %s", sid, row["note"])
    elif with_metrics:
      target = store.preset(sid, config.data.target).inverse(
          store.read(sid, config.data.target, box)).astype(np.float32)
      input_raw = inference_lib.resolve(rules, first_input, store, sid).inverse(
          cond[0, ..., 0]).astype(np.float32)
      if config.eval.input_baseline and comparable:
        references["input"] = input_raw
      if floor is not None and floor.available():
        references["train_mean"], row["train_mean_kind"] = floor(subject, box)
      if classical:
        whole = tuple((0, n) for n in shape)
        whole_input = inference_lib.resolve(rules, first_input, store, sid).inverse(
            volume_inputs(store, sid, config, whole, rules)[0, ..., 0]).astype(np.float32)
        cut = tuple(slice(a, b) for a, b in box)
        for name, tuned in classical.items():
          references[name] = references_lib.apply(tuned, whole_input)[cut]
      data_range = float(target_preset.hi - target_preset.lo)
      preview_input = (f"input ({first_input})", input_raw)
    yield runner.Volume(
        name=sid, inputs=cond,
        to_units=lambda x, p=target_preset: p.inverse(x).astype(np.float32), place=place,
        geometry=store.geometry(sid, first_input), target=target, data_range=data_range,
        references=references, preview_input=preview_input, row=row)


REFERENCES_CACHE = "references_tuned.json"


def reference_pairs(config, store, rules) -> list:
  """The classical references' tuning pairs (jaxvol.eval.references.Pair): each training-split
  subject holding the input and the target, over its training region cut to a centred box of at
  most config.eval.reference_tune_box voxels per axis, in original units; at most
  config.eval.reference_tune_subjects of them (in store order)."""
  first, target = config.data.inputs[0], config.data.target
  limit = tuple(int(v) for v in config.eval.get("reference_tune_box", ()) or ()) or None
  pairs = []
  for subject in store.subjects(config.data.train_split):
    if first not in subject["volumes"] or target not in subject["volumes"]:
      continue
    shape = tuple(subject["shape"])
    region = config.data.train_region
    box = pipeline.region_box(shape, region) if region else tuple((0, n) for n in shape)
    box = clip_box(box, limit)
    sid = subject["id"]
    x = inference_lib.resolve(rules, first, store, sid).inverse(
        volume_inputs(store, sid, config, box, rules)[0, ..., 0]).astype(np.float32)
    y = store.preset(sid, target).inverse(store.read(sid, target, box)).astype(np.float32)
    pairs.append(references_lib.Pair(sid, x, y))
    if len(pairs) >= int(config.eval.get("reference_tune_subjects", 4)):
      break
  return pairs


def tuned_references(config, store, rules, workdir: str | None) -> dict:
  """The classical references of config.eval.references, tuned on the training data
  (jaxvol.eval.references), from WORKDIR's cache when the same tuning was done before; {} when
  none are named or the store has no training pair."""
  if not config.data.inputs:
    return {}
  comparable = inference_lib.shares_scale(rules, config.data.inputs[0], config.data.target)
  names = references_lib.resolve_names(config.eval.get("references", ()), comparable)
  if not names:
    return {}
  train = [s for s in store.subjects(config.data.train_split)
           if config.data.target in s["volumes"]]
  if not train:
    return {}
  data_range = inference_lib.resolve(rules, config.data.target, store, train[0]["id"])
  data_range = float(data_range.hi - data_range.lo)
  key = references_lib.cache_key({
      "store": os.path.abspath(store.path), "manifest": references_lib.cache_key(store.manifest),
      "split": config.data.train_split, "region": plain_region(config.data.train_region),
      "input": config.data.inputs[0], "target": config.data.target, "names": names,
      "rules": inference_lib.describe(rules), "data_range": data_range,
      "box": list(config.eval.get("reference_tune_box", ()) or ()),
      "subjects": int(config.eval.get("reference_tune_subjects", 4)),
      "grids": references_lib.grid_version()})
  cache = os.path.join(workdir, REFERENCES_CACHE) if workdir else None
  stored = {}
  if cache and os.path.exists(cache):
    try:
      with open(cache, encoding="utf-8") as f:
        stored = json.load(f)
    except (OSError, json.JSONDecodeError):
      stored = {}
  if key in stored:
    return stored[key]
  pairs = reference_pairs(config, store, rules)
  if not pairs:
    return {}
  tuned = references_lib.tune(names, pairs, data_range)
  for entry in tuned.values():
    entry["tuned_on"] = {"split": config.data.train_split,
                         "region": plain_region(config.data.train_region),
                         "subjects": [p.name for p in pairs],
                         "boxes_shape": [list(p.input.shape) for p in pairs],
                         "criterion": "PSNR inside the target's body mask over the target "
                                      "preset's range, mean over the training pairs",
                         "data_range": data_range}
  if cache and jax.process_index() == 0:
    stored[key] = tuned
    fileio.write_text_atomic(cache, json.dumps(stored))
  return tuned


def plain_region(region):
  """A ConfigDict region as a JSON-friendly {axis: [lo, hi]} (or None)."""
  return None if region is None else {str(k): list(v) for k, v in region.items()}
