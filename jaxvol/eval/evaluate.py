"""Checkpoint-based evaluation and sampling: predictions as NIfTI, metrics, previews.

`evaluate(config, workdir)` restores a checkpoint (latest or `config.eval.checkpoint_step`), runs
the method's sampler on every volume of the evaluation split (whole volume, or the held-out region
of a region split) and writes, under WORKDIR/eval/:
  summary.json   {"metrics": {name: {"model": mean, "input": mean, "train_mean": mean}}, ...};
                 "input" (the condition used as the prediction) only where input and target share
                 a scale; "train_mean" a floor that ignores the input (TrainingMeanFloor: the
                 voxelwise mean of the training targets, or their mean intensity), described in
                 summary["train_mean_floor"]
  metrics.csv    one row per volume
  nifti/         predictions on each input's own grid with its affine, in original intensities
  previews/      PNG tri-planar views: input | prediction | target | error
Inference reads no target: inputs are normalised, and predictions mapped back to original units,
with the presets the checkpoint's rules give (jaxvol.data.inference: fixed or fitted on the
training split, or taken from an input), so a volume gets the same prediction whether or not the
store holds its target; a store whose target preset was fitted on the target itself is refused.
Metrics are on the original intensity scale, inside the body mask of the target when
`config.eval.mask == "body"`; PSNR and SSIM use that target preset's range (hi - lo) as the data
range, so volumes are scored on one fixed scale. The input is scored as a baseline only where it
shares the target's units (`inference.shares_scale`); otherwise summary["input_baseline"] says
"not comparable". summary.json also names the split, regions, mask, data range, presets and each
metric's convention (summary["conventions"]; docs/metrics.md). With a region split,
predictions cover the held-out region and the rest of the input's grid is filled with the
preset's background value. `config.eval.max_box` (D, H, W) limits the box predicted and scored
per volume to at most that many voxels per axis, centred in the evaluation region (`eval_box`):
the prediction, its metrics, the training-mean floor and the NIfTI all cover that box, which
metrics.csv gives per volume ("box", [[start, stop], ...] voxels of the volume) and summary.json
records (summary["max_box"], summary["boxes"]). Every process computes; process 0 writes.
With `config.inference.window` set, samplers run in Gaussian-blended windows of that size spread
over this process's devices (jaxvol.ops.windows), so volumes larger than the training patch are
predicted as the network was trained. `sample(config, workdir)` writes predictions only (no
target needed) under WORKDIR/samples/.
Everything written is atomic: each file (temp file + rename), and each output folder as a whole
(`jaxvol.fileio.fresh_dir`: a run writes into a new folder beside WORKDIR/eval or WORKDIR/samples, which
replaces the previous folder once the run is complete), so no file of an earlier run (another
split's subjects, an older summary) is left among the new ones.

Volumes go through the one inference path, jaxvol.eval.runner: `store_volumes` turns a split into
the runner's volumes, and the method's sampler becomes its predictor. The sampler is chosen by
`runner.volume_sampler`: the volume split over config.mesh.spatial devices (and the DiT kernels
over config.mesh.model) when those are > 1 (jaxvol.train.sharded_sample.VolumeSampler), otherwise
one device or the windows spread over this process's devices; `make_sampler(method)` replaces
that choice (tests), and may return any object with `put_params(params)` and
`sampler(placed_params, cond, rng) -> numpy prediction` for a (1, D, H, W, C) numpy condition.
The sampler is compiled for each new volume shape before the volume is timed: metrics.csv's
`seconds` excludes compilation, `compile_seconds` holds it. With `config.eval.samples` N > 1 the
prediction is the mean of N samples (keys fold_in(volume key, k)) and nifti/ also holds their
voxelwise standard deviation (`{subject}_std.nii.gz`).
"""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import fileio
from jaxvol import methods
from jaxvol.errors import ConfigError
from jaxvol.data import inference as inference_lib
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import references as references_lib
from jaxvol.eval import runner
from jaxvol.train import checkpoint as ckpt_lib

log = logging.getLogger("jaxvol")
METRICS = metrics_lib.METRICS


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


LocalSampler = runner.LocalSampler


def make_volume_sampler(method, make_sampler=None, config=None):
  """The sampler of `method` (jaxvol.eval.runner.volume_sampler)."""
  return runner.volume_sampler(config, method, make_sampler)


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
      "split": config.data.train_split, "region": _plain(config.data.train_region),
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
                         "region": _plain(config.data.train_region),
                         "subjects": [p.name for p in pairs],
                         "boxes_shape": [list(p.input.shape) for p in pairs],
                         "criterion": "PSNR inside the target's body mask over the target "
                                      "preset's range, mean over the training pairs",
                         "data_range": data_range}
  if cache and jax.process_index() == 0:
    stored[key] = tuned
    fileio.write_text_atomic(cache, json.dumps(stored))
  return tuned


def predict_split(config, workdir: str, split: str, out_dir: str, with_metrics: bool,
                  make_sampler=None) -> dict:
  """Runs the method's sampler over a split through jaxvol.eval.runner and writes NIfTI (+
  metrics and previews if with_metrics) under out_dir."""
  pipeline.check_position_coverage(config.data.train_region, config.data.eval_region,
                                   pipeline.position_axes(config.data))
  method = methods.build(config, jax.devices()[0].platform)
  sampler = runner.volume_sampler(config, method, make_sampler)
  params, step, meta = load_params(config, workdir, with_meta=True)
  params = sampler.put_params(params)
  store = store_lib.Store(config.data.store)
  rules = inference_rules(config, store, meta, workdir)
  subjects = store.subjects(split)
  if not subjects:
    raise ValueError(f"split {split!r} of store {config.data.store} has no subjects")
  floor = TrainingMeanFloor(config, store) if with_metrics else None
  classical = tuned_references(config, store, rules, workdir) if with_metrics else {}
  samples = int(config.eval.get("samples", 1))
  rows = runner.run(
      store_volumes(config, store, subjects, rules, with_metrics, floor, classical),
      {runner.MODEL: runner.SamplerPredictor(sampler, params)},
      jax.random.PRNGKey(config.eval.seed), out_dir, total=len(subjects), samples=samples,
      mask="body" if config.eval.mask == "body" else None,
      previews=with_metrics and bool(config.eval.previews))
  return {"rows": rows, "step": step, "checkpoint": meta.get("checkpoint_choice"),
          "presets": inference_lib.describe(rules), "samples": samples, "references": classical,
          "input_comparable": inference_lib.shares_scale(rules, config.data.inputs[0],
                                                         config.data.target)}


def _plain(region):
  """A ConfigDict region as a JSON-friendly {axis: [lo, hi]} (or None)."""
  return None if region is None else {str(k): list(v) for k, v in region.items()}


def evaluate(config, workdir: str, make_sampler=None, out_name: str = "eval") -> dict:
  """Predicts and scores the evaluation split into WORKDIR/`out_name` (module docstring);
  `make_sampler` as there."""
  writes = jax.process_index() == 0
  with fileio.fresh_dir(os.path.join(workdir, out_name), writes) as out_dir:
    summary, rows = _evaluate_into(config, workdir, out_dir, make_sampler)
    full = summary.pop("_references_full", None)
    if writes:
      if full:  # the tuned references with their whole parameters (look-up tables)
        fileio.write_text_atomic(os.path.join(out_dir, "references.json"),
                                 json.dumps(full, indent=1))
      fileio.write_csv_atomic(os.path.join(out_dir, "metrics.csv"), rows)
      fileio.write_text_atomic(os.path.join(out_dir, "summary.json"),
                               json.dumps(summary, indent=2))
  return summary


def _evaluate_into(config, workdir: str, out_dir: str, make_sampler) -> tuple[dict, list]:
  """(summary, metrics rows) of evaluate; the predictions and previews written under out_dir."""
  result = predict_split(config, workdir, config.eval.split, out_dir, with_metrics=True,
                         make_sampler=make_sampler)
  rows = result["rows"]
  scored = [r for r in rows if "data_range" in r]  # volumes whose target is in the store
  summary = {"method": config.method, "checkpoint_step": result["step"], "split": config.eval.split,
             "n_volumes": len(rows), "n_scored": len(scored), "mask": config.eval.mask,
             "region": _plain(config.data.eval_region), "metrics": {},
             "samples": result["samples"],
             "seconds_per_volume": float(np.mean([r["seconds"] for r in rows])),
             "compile_seconds": float(sum(r["compile_seconds"] for r in rows))}
  if len(scored) < len(rows):
    summary["unscored"] = [r["subject"] for r in rows if "data_range" not in r]
    summary["note"] = (f"{len(rows) - len(scored)} volume(s) have no {config.data.target!r} "
                       "volume in the store: predicted, not scored; metrics average the rest")
  classical = result["references"]
  names = ("model", "input", "train_mean", *classical)
  means = runner.mean_metrics(scored, names)
  for k in METRICS if scored else ():
    summary["metrics"][k] = {name: means[name][k] for name in names
                             if k in means.get(name, {})
                             and all(f"{name}_{k}" in r for r in scored)}
  summary["checkpoint"] = result["checkpoint"]
  if classical:
    summary["references"] = references_lib.public(classical)
    summary["_references_full"] = classical
    scored_refs = [n for n in classical if n in summary["metrics"].get("psnr", {})]
    if scored_refs:
      best = max(scored_refs, key=lambda n: summary["metrics"]["psnr"][n])
      summary["best_reference"] = best
      summary["model_minus_best_reference_psnr"] = (
          summary["metrics"]["psnr"]["model"] - summary["metrics"]["psnr"][best])
  if scored and all("train_mean_kind" in r for r in scored):
    summary["train_mean_floor"] = (
        "metrics[*].train_mean scores a predictor that ignores its input: "
        + "; ".join(sorted({r["train_mean_kind"] for r in scored}))
        + f" ({config.data.train_split!r} split"
        + (f", region {_plain(config.data.train_region)}" if config.data.train_region else "")
        + ")")
  if config.eval.input_baseline and not result["input_comparable"]:
    summary["input_baseline"] = (
        f"not comparable: {config.data.inputs[0]!r} is not on {config.data.target!r}'s scale "
        "(different units or presets), so the input is not scored as a prediction")
  summary["data_range"] = [r["data_range"] for r in scored]
  summary["presets"] = result["presets"]
  summary["conventions"] = metrics_lib.conventions(
      "target preset hi - lo (summary['data_range'])", config.eval.mask)
  summary["train_split"] = config.data.train_split
  summary["train_region"] = _plain(config.data.train_region)
  limit = max_box(config)
  summary["max_box"] = None if limit is None else list(limit)
  summary["boxes"] = {r["subject"]: r["box"] for r in rows}
  return summary, rows


def sample(config, workdir: str, make_sampler=None) -> dict:
  """Predictions only, under WORKDIR/samples/ (replaced as a whole, `fileio.fresh_dir`);
  `make_sampler` as in the module docstring."""
  with fileio.fresh_dir(os.path.join(workdir, "samples"), jax.process_index() == 0) as out_dir:
    return predict_split(config, workdir, config.eval.split, out_dir, with_metrics=False,
                         make_sampler=make_sampler)


def validation_config(config):
  """config with the evaluation set replaced by the validation set (config.eval.val_split, and
  config.eval.val_region or else config.data.eval_region); refused when those voxels are
  training crops (the same split and an overlapping region)."""
  val = config.copy_and_resolve_references()
  region = config.eval.get("val_region") or config.data.eval_region
  split = config.eval.get("val_split", "val")
  with val.unlocked():
    val.data.eval_region = region
    val.eval.split = split
  if split == config.data.train_split and pipeline.regions_overlap(config.data.train_region,
                                                                  region):
    raise ConfigError(f"the validation set (split {split!r}, region {_plain(region)}) overlaps the "
                     f"training crops (split {config.data.train_split!r}, region "
                     f"{_plain(config.data.train_region)}): set config.eval.val_split / val_region")
  return val


def validator(config, workdir: str):
  """`validate(params, step) -> {metric: mean over volumes}` for the training loop
  (jaxvol.train.loop.Validation): the method's sampler over the validation set
  (`validation_config`) through the one inference path, nothing written, no references. The
  validation volumes are read once; the sampler compiles once per volume shape."""
  val = validation_config(config)
  store = store_lib.Store(config.data.store)
  subjects = [s for s in store.subjects(val.eval.split) if val.data.target in s["volumes"]]
  if not subjects:
    raise ValueError(f"no validation volume: split {val.eval.split!r} of {store.path} has no "
                     f"subject with a {val.data.target!r} volume (set config.eval.val_split)")
  method = methods.build(val, jax.devices()[0].platform)
  sampler = runner.volume_sampler(val, method)
  rules = inference_lib.rules_of(store, val.data.inputs, val.data.target)
  volumes = list(store_volumes(val, store, subjects, rules, with_metrics=True))
  for v in volumes:
    v.references = {}  # the model alone: the input baseline is not needed every K steps
  del workdir

  def validate(params, step):
    del step
    placed = sampler.put_params(params)
    rows = runner.run(volumes, {runner.MODEL: runner.SamplerPredictor(sampler, placed)},
                      jax.random.PRNGKey(val.eval.seed), None, total=len(volumes),
                      samples=int(val.eval.get("samples", 1)),
                      mask="body" if val.eval.mask == "body" else None, previews=False,
                      report=lambda line: None)
    return runner.mean_metrics(rows, (runner.MODEL,))[runner.MODEL]

  return validate
