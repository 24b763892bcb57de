"""Checkpoint-based evaluation and sampling: predictions as NIfTI, metrics, previews.

`evaluate(config, workdir)` restores a checkpoint (latest or `config.eval.checkpoint_step`), runs
the method's sampler on every volume of the evaluation split (whole volume, or the held-out region
of a region split) and writes, under WORKDIR/eval/:
  summary.json   {"metrics": {name: {"model": mean, "input": mean, "train_mean": mean}}, ...};
                 "input" (the condition used as the prediction) only where input and target share
                 a scale; "train_mean" a floor that ignores the input (TrainingMeanFloor: the
                 voxelwise mean of the training targets, or their mean intensity; jaxvol.eval.volumes), in
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
per volume to at most that many voxels per axis, centred in the evaluation region (`volumes.eval_box`):
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

Volumes go through the one inference path, jaxvol.eval.runner: `volumes.store_volumes` turns a split into
the runner's volumes, and the method's sampler becomes its predictor. The sampler is chosen by
`jaxvol.eval.samplers.choose`: the volume split over config.mesh.spatial devices (and the DiT
kernels over config.mesh.model) when those are > 1 (`samplers.VolumeSampler`), otherwise one
device or the windows spread over this process's devices (`samplers.LocalSampler`). A sampler is
any object with `put_params(params)` and `sampler(placed_params, cond, rng) -> numpy prediction`
for a (1, D, H, W, C) numpy condition (tests stand one in by replacing `samplers.choose`).
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
from jaxvol.data import inference as inference_lib
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.errors import ConfigError
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import references as references_lib
from jaxvol.eval import runner
from jaxvol.eval import samplers
from jaxvol.eval import volumes

log = logging.getLogger("jaxvol")
METRICS = metrics_lib.METRICS


def predict_split(config, workdir: str, split: str, out_dir: str, with_metrics: bool) -> dict:
  """Runs the method's sampler over a split through jaxvol.eval.runner and writes NIfTI (+
  metrics and previews if with_metrics) under out_dir."""
  pipeline.check_position_coverage(config.data.train_region, config.data.eval_region,
                                   pipeline.position_axes(config.data))
  method = methods.build(config, jax.devices()[0].platform)
  sampler = samplers.choose(config, method)
  params, step, meta = volumes.load_params(config, workdir, with_meta=True)
  params = sampler.put_params(params)
  store = store_lib.Store(config.data.store)
  rules = volumes.inference_rules(config, store, meta, workdir)
  subjects = store.subjects(split)
  if not subjects:
    raise ValueError(f"split {split!r} of store {config.data.store} has no subjects")
  floor = volumes.TrainingMeanFloor(config, store) if with_metrics else None
  classical = volumes.tuned_references(config, store, rules, workdir) if with_metrics else {}
  samples = int(config.eval.get("samples", 1))
  rows = runner.run(
      volumes.store_volumes(config, store, subjects, rules, with_metrics, floor, classical),
      {runner.MODEL: samplers.SamplerPredictor.from_config(config, sampler, params)},
      jax.random.PRNGKey(config.eval.seed), out_dir, total=len(subjects), samples=samples,
      mask="body" if config.eval.mask == "body" else None,
      previews=with_metrics and bool(config.eval.previews))
  return {"rows": rows, "step": step, "checkpoint": meta.get("checkpoint_choice"),
          "presets": inference_lib.describe(rules), "samples": samples, "references": classical,
          "input_comparable": inference_lib.shares_scale(rules, config.data.inputs[0],
                                                         config.data.target)}


def evaluate(config, workdir: str, out_name: str = "eval") -> dict:
  """Predicts and scores the evaluation split into WORKDIR/`out_name` (module docstring)."""
  writes = jax.process_index() == 0
  with fileio.fresh_dir(os.path.join(workdir, out_name), writes) as out_dir:
    summary, rows = _evaluate_into(config, workdir, out_dir)
    full = summary.pop("_references_full", None)
    if writes:
      if full:  # the tuned references with their whole parameters (look-up tables)
        fileio.write_text_atomic(os.path.join(out_dir, "references.json"),
                                 json.dumps(full, indent=1))
      fileio.write_csv_atomic(os.path.join(out_dir, "metrics.csv"), rows)
      fileio.write_text_atomic(os.path.join(out_dir, "summary.json"),
                               json.dumps(summary, indent=2))
  return summary


def _evaluate_into(config, workdir: str, out_dir: str) -> tuple[dict, list]:
  """(summary, metrics rows) of evaluate; the predictions and previews written under out_dir."""
  result = predict_split(config, workdir, config.eval.split, out_dir, with_metrics=True)
  rows = result["rows"]
  scored = [r for r in rows if "data_range" in r]  # volumes whose target is in the store
  summary = {"method": config.method, "checkpoint_step": result["step"], "split": config.eval.split,
             "n_volumes": len(rows), "n_scored": len(scored), "mask": config.eval.mask,
             "region": volumes.plain_region(config.data.eval_region), "metrics": {},
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
        + (f", region {volumes.plain_region(config.data.train_region)}" if config.data.train_region else "")
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
  summary["train_region"] = volumes.plain_region(config.data.train_region)
  limit = volumes.max_box(config)
  summary["max_box"] = None if limit is None else list(limit)
  summary["boxes"] = {r["subject"]: r["box"] for r in rows}
  return summary, rows


def sample(config, workdir: str) -> dict:
  """Predictions only, under WORKDIR/samples/ (replaced as a whole, `fileio.fresh_dir`)."""
  with fileio.fresh_dir(os.path.join(workdir, "samples"), jax.process_index() == 0) as out_dir:
    return predict_split(config, workdir, config.eval.split, out_dir, with_metrics=False)


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
    raise ConfigError(f"the validation set (split {split!r}, region {volumes.plain_region(region)}) overlaps the "
                     f"training crops (split {config.data.train_split!r}, region "
                     f"{volumes.plain_region(config.data.train_region)}): set config.eval.val_split / val_region")
  return val


def _validation_set(config):
  """(validation config, store, the validation split's subjects with a target volume); a clear
  error when there is none."""
  val = validation_config(config)
  store = store_lib.Store(config.data.store)
  subjects = [s for s in store.subjects(val.eval.split) if val.data.target in s["volumes"]]
  if not subjects:
    raise ValueError(f"no validation volume: split {val.eval.split!r} of {store.path} has no "
                     f"subject with a {val.data.target!r} volume (set config.eval.val_split)")
  return val, store, subjects


def validator(config, workdir: str):
  """`validate(params, step) -> {metric: mean over volumes}` for the training loop
  (jaxvol.train.loop.Validation): the method's sampler over the validation set
  (`validation_config`) through the one inference path, nothing written, no references. The
  validation volumes are read once; the sampler compiles once per volume shape."""
  val, store, subjects = _validation_set(config)
  method = methods.build(val, jax.devices()[0].platform)
  sampler = samplers.choose(val, method)
  rules = inference_lib.rules_of(store, val.data.inputs, val.data.target)
  vols = list(volumes.store_volumes(val, store, subjects, rules, with_metrics=True))
  for v in vols:
    v.references = {}  # the model alone: the input baseline is not needed every K steps
  del workdir

  def validate(params, step):
    del step
    placed = sampler.put_params(params)
    model = samplers.SamplerPredictor.from_config(val, sampler, placed)
    rows = runner.run(vols, {runner.MODEL: model},
                      jax.random.PRNGKey(val.eval.seed), None, total=len(vols),
                      samples=int(val.eval.get("samples", 1)),
                      mask="body" if val.eval.mask == "body" else None, previews=False,
                      report=lambda line: None)
    return runner.mean_metrics(rows, (runner.MODEL,))[runner.MODEL]

  return validate


def reconstruction_validator(config, workdir: str):
  """`validate(params, step) -> {"recon_mse": ...}` for an unconditional flow-matching model
  (PRDiT-FM's stage-1 validation, Fredy-Zhang/PRDiT-FM train.py): one fixed training-size crop of
  each validation volume (the pipeline's crop with a seeded position; network units) is noised to x_t at t = config.flow.val_t and
  reconstructed in one evaluation as x_t + (1 - t) v (`method.reconstruct`); the score is the
  mean squared error against the crop, averaged over volumes (lower is better: set
  config.train.validate_metric = "recon_mse"). Volume i's noise is fold_in(PRNGKey(eval.seed), i),
  the same at every validation."""
  del workdir
  val, store, subjects = _validation_set(config)
  method = methods.build(val, jax.devices()[0].platform)
  if getattr(method, "reconstruct", None) is None or getattr(method, "flow", None) is None:
    raise ValueError(f"reconstruction validation is flow matching's (diffusion.objective = flow, "
                     f"method prdit); {config.method!r} with objective "
                     f"{config.diffusion.get('objective', 'diffusion')!r} has none")
  crop = pipeline.CropAndFlip(store, {"target": val.data.target}, tuple(config.data.crop_size),
                              flips=False, region=val.data.eval_region)
  crops = [jnp.asarray(crop({"subject": s["id"]}, np.random.default_rng(i))["target"][None])
           for i, s in enumerate(subjects)]
  run = jax.jit(lambda p, x, k: jnp.mean(jnp.square(method.reconstruct(p, x, k)[0] - x)))
  base_key = jax.random.PRNGKey(val.eval.seed)

  def validate(params, step):
    del step
    errors = [float(run(params, x, jax.random.fold_in(base_key, i))) for i, x in enumerate(crops)]
    return {"recon_mse": float(np.mean(errors))}

  return validate
