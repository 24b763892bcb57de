"""Apply a trained model to your own NIfTI files: no store, no target, the scan's own grid out.

  python -m jaxvol.predict --workdir RUN --input SCAN.nii.gz [SCAN2.nii.gz | FOLDER | LIST.csv]
      --output DIR [--samples N] [--seed S] [--checkpoint auto|best|latest|STEP] [--no-resample] [--spacing-tolerance 0.05]
      [--overwrite] [--config NAME_OR_PATH[:variant]]

For every input volume (or every subject of a datalist, one column per input modality of the
model) it:
  1. reads and checks every input first (jaxvol.data.nifti: clear errors naming the file; nothing
     is written when one is bad) and reorients it to RAS;
  2. resamples it (linear, voxel edges aligned) to the training voxel spacing saved in the
     checkpoint when its spacing differs by more than --spacing-tolerance (relative);
  3. normalises it with the presets the checkpoint records (jaxvol.data.inference rules: fixed
     or training-split scales, or fitted on the input itself; never on a target);
  4. samples with the config's sampler (blended windows when config.inference.window is set, or
     the volume split over config.mesh.spatial devices), through the same inference path as
     `--mode=evaluate` (jaxvol.eval.runner);
  5. maps the prediction to the target's original units, resamples it back onto the input's own
     grid and writes DIR/<name>_pred.nii.gz with the input's affine; with --samples N > 1 the
     mean of N samples (seeds fold_in(seed, sample)) and their voxelwise standard deviation
     (<name>_std.nii.gz).
DIR/predict.json records the checkpoint step, a hash of the config, the inputs, spacings, seeds
and seconds. Existing outputs are kept (and skipped on a rerun) unless --overwrite. The random key
of volume i is fold_in(PRNGKey(config.eval.seed or --seed), i), as in `--mode=evaluate`, so a
volume predicted here at the training spacing equals its evaluation.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from jaxvol.data import nifti
from jaxvol.data.nifti import VolumeError
from jaxvol.errors import UserError

log = logging.getLogger("jaxvol")
SUFFIXES = (".nii.gz", ".nii")


def _name(path: str) -> str:
  base = os.path.basename(path)
  for suffix in SUFFIXES:
    if base.endswith(suffix):
      return base[:-len(suffix)]
  return base


def list_inputs(paths: Sequence[str], modalities: Sequence[str]) -> list[dict[str, Any]]:
  """[{"name", "volumes": {modality: path}}] from files, folders or datalists.

  A file or a folder's NIfTI files are one subject each, for a model with one input modality; a
  datalist (CSV/JSON, jaxvol.data.store.read_datalist) names the file of every input modality.

  Raises:
    VolumeError: a missing path, an empty folder, a datalist without the model's modalities, or
      several modalities needed but plain files given.
  """
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  subjects = []
  for path in paths:
    if os.path.isdir(path):
      files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(SUFFIXES))
      if not files:
        raise VolumeError(f"{path}: folder holds no .nii or .nii.gz file")
    elif path.endswith(SUFFIXES):
      if not os.path.isfile(path):
        raise VolumeError(f"{path}: file not found")
      files = [path]
    elif path.endswith((".csv", ".json")):
      for s in store_lib.read_datalist(path):
        missing = [m for m in modalities if m not in s["volumes"]]
        if missing:
          raise VolumeError(f"{path}: subject {s['subject']!r} lacks the model's input "
                            f"modalities {missing}")
        subjects.append({"name": s["subject"], "volumes": {m: s["volumes"][m] for m in modalities}})
      continue
    else:
      raise VolumeError(f"{path}: not a NIfTI file (.nii, .nii.gz), a folder or a datalist "
                        "(.csv, .json)")
    if len(modalities) != 1:
      raise VolumeError(f"{path}: the model takes {len(modalities)} input modalities "
                        f"{list(modalities)}: give a datalist with one column per modality")
    subjects += [{"name": _name(f), "volumes": {modalities[0]: os.path.abspath(f)}} for f in files]
  names = [s["name"] for s in subjects]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise VolumeError(f"several inputs would write the same output name: {dupes}")
  return subjects


def ras_spacing(geometry: nifti.Geometry) -> np.ndarray:
  return np.linalg.norm(nifti.ras_affine(geometry)[:3, :3], axis=0)


def resample(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Linear resampling of a RAS array onto `shape` voxels covering the same extent (voxel edges
  aligned, as voxels of another size over the same field of view)."""
  if tuple(volume.shape) == tuple(shape):
    return volume
  factors = [n / o for n, o in zip(shape, volume.shape)]
  out = ndimage.zoom(np.asarray(volume, np.float32), factors, order=1, mode="nearest",
                     grid_mode=True)
  if out.shape != tuple(shape):  # zoom rounds; pad or cut the last voxel if it had to
    out = np.pad(out, [(0, max(0, n - o)) for n, o in zip(shape, out.shape)], mode="edge")
    out = out[tuple(slice(0, n) for n in shape)]
  return out


def target_shape(geometry: nifti.Geometry, train_spacing, tolerance: float):
  """The RAS shape to predict on: the input's, or resampled to the training spacing."""
  shape = np.asarray(geometry.ras_shape)
  if train_spacing is None or tolerance < 0:
    return tuple(int(s) for s in shape)
  spacing = ras_spacing(geometry)
  train = np.asarray(train_spacing, np.float64)
  if np.all(np.abs(spacing / train - 1.0) <= tolerance):
    return tuple(int(s) for s in shape)
  new = np.maximum(1, np.round(shape * spacing / train)).astype(int)
  return tuple(int(s) for s in new)


def load_config(spec: str):
  """A config from "PATH.py[:variant]" or a packaged config's "NAME[:variant]"."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from jaxvol import configs  # pylint: disable=g-import-not-at-top
  try:
    resolved = configs.resolve(spec)
  except configs.UnknownConfigError as e:
    raise VolumeError(f"--config: {e}") from None
  path, _, variant = resolved.partition(":")
  module_spec = importlib.util.spec_from_file_location("jaxvol_predict_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def _load_config(workdir: str, step: int | None, config_arg: str | None):
  """(config, meta, step) from the checkpoint (its saved config unless --config is given)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jaxvol.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    found = ckpt_lib.restore_selected(workdir, "auto" if step is None else step)
  except FileNotFoundError as e:
    raise VolumeError(str(e)) from None
  meta, step, why = found.meta or {}, found.step, found.why
  del found  # the parameters are read again under the final config (volumes.load_params)

  if config_arg:
    config = load_config(config_arg)
  else:
    if "config" not in meta:
      raise VolumeError(f"{workdir}: the checkpoint holds no config; pass --config")
    config = ml_collections.ConfigDict(meta["config"])
  config.eval.checkpoint_step = -1
  config.eval.checkpoint = str(int(step))
  meta = dict(meta, checkpoint_choice=why)
  return config, meta, int(step)


def predict(workdir: str, inputs: Sequence[str], output: str, samples: int = 1,
            seed: int | None = None, step: int | None = None, tolerance: float = 0.05,
            overwrite: bool = False, config_arg: str | None = None) -> dict:
  """Predicts every input (module docstring); returns the predict.json record."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  from jaxvol.data import inference as inference_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import runner  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import samplers  # pylint: disable=g-import-not-at-top

  if samples < 1:
    raise ValueError(f"--samples must be >= 1, got {samples}")
  config, meta, step = _load_config(workdir, step, config_arg)
  mods = list(config.data.inputs)
  if not mods:
    raise VolumeError("this model is unconditional (no inputs): use --mode=sample to generate")
  subjects = list_inputs(inputs, mods)
  if not subjects:
    raise VolumeError("no input volume given")
  # Check every input before anything is written.
  loaded = []
  for s in subjects:
    arrays, geoms = {}, {}
    for m, path in s["volumes"].items():
      arrays[m], geoms[m] = nifti.load_volume(path)
    nifti.check_same_grid([(s["volumes"][m], geoms[m]) for m in mods])
    loaded.append((arrays, geoms[mods[0]]))
  rules = (meta or {}).get("inference_presets")
  if not rules:
    raise VolumeError(f"{workdir}: the checkpoint records no inference presets (saved before "
                      "they were); evaluate it on a store with --mode=sample instead, or retrain")
  inference_lib.check_rules(rules, mods, config.data.target, f"checkpoint {workdir}")
  train_spacing = meta.get("spacing")
  if train_spacing is None and tolerance >= 0:
    log.warning("the checkpoint records no training spacing: inputs are not resampled")

  os.makedirs(output, exist_ok=True)
  method = methods.build(config, jax.devices()[0].platform)
  # As --mode=evaluate: the volume split over config.mesh when > 1 (samplers.choose).
  sampler = samplers.choose(config, method)
  params, _ = volumes.load_params(config, workdir)
  params = sampler.put_params(params)
  seed = int(config.eval.seed if seed is None else seed)
  axes = pipeline.position_axes(config.data)
  if config.data.get("position_channels", False):
    pipeline.check_position_coverage(config.data.train_region, None, axes)
  record = {"workdir": os.path.abspath(workdir), "checkpoint_step": step,
            "checkpoint": meta.get("checkpoint_choice"),
            "config_sha256": hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True,
                                                       default=str).encode()).hexdigest(),
            "train_spacing": train_spacing, "spacing_tolerance": tolerance, "samples": samples,
            "seed": seed, "presets": inference_lib.describe(rules), "volumes": []}

  def each_volume():
    for s, (arrays, geometry) in zip(subjects, loaded):
      shape = target_shape(geometry, train_spacing, tolerance)
      raw = {m: resample(a, shape) for m, a in arrays.items()}
      chans = [inference_lib.resolve_raw(rules, m, raw).forward(raw[m]) for m in mods]
      if config.data.get("position_channels", False):
        chans += list(np.moveaxis(pipeline.position_grid(shape, None, axes), -1, 0))
      target_preset = inference_lib.resolve_raw(rules, config.data.target, raw)
      yield runner.Volume(
          name=s["name"], inputs=np.stack(chans, axis=-1)[None].astype(np.float32),
          to_units=lambda x, p=target_preset: p.inverse(x).astype(np.float32),
          place=lambda x, shape=geometry.ras_shape: resample(x, shape), geometry=geometry,
          row={"inputs": s["volumes"], "spacing": [float(v) for v in ras_spacing(geometry)],
               "shape": list(geometry.ras_shape),
               "resampled_to": None if shape == tuple(geometry.ras_shape) else list(shape),
               "target_preset": target_preset.to_dict()})

  started = time.time()
  model = samplers.SamplerPredictor.from_config(config, sampler, params)
  rows = runner.run(each_volume(), {runner.MODEL: model},
                    jax.random.PRNGKey(seed), output, total=len(subjects), samples=samples,
                    mask=None, nifti_dir="", previews=False, skip_existing=not overwrite,
                    writes=True, report=lambda line: print(line, flush=True))
  for row in rows:
    entry = {"name": row.pop("subject"), **row}
    entry["output"] = entry.pop("outputs", {}).get(runner.MODEL)
    if "model_std_output" in entry:
      entry["std"] = entry.pop("model_std_output")
    if "skipped" in entry:
      entry["skipped"] = "output exists (pass --overwrite to replace it)"
    record["volumes"].append(entry)
  record["seconds"] = time.time() - started
  fileio.write_text_atomic(os.path.join(output, "predict.json"), json.dumps(record, indent=2))
  print(f"wrote {len(record['volumes'])} prediction(s) and predict.json to {output} (the "
        f"{record['checkpoint'] or 'checkpoint step %d' % record['checkpoint_step']} of "
        f"{workdir})", flush=True)
  return record


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="jaxvol predict", description=__doc__.split("\n", 1)[0])
  ap.add_argument("--workdir", required=True, help="the training run (its checkpoints)")
  ap.add_argument("--input", required=True, nargs="+",
                  help="NIfTI files, folders of them, or a datalist (CSV/JSON)")
  ap.add_argument("--output", required=True, help="folder for <name>_pred.nii.gz and predict.json")
  ap.add_argument("--samples", type=int, default=1,
                  help="samples per volume: their mean, and with N > 1 a _std.nii.gz map")
  ap.add_argument("--seed", type=int, default=None, help="default: the config's eval.seed")
  ap.add_argument("--checkpoint", default=None,
                  help="auto (default: the best validation checkpoint when training validated, "
                       "else the latest) | best | latest | a step number")
  ap.add_argument("--step", type=int, default=None, help="a checkpoint step (same as "
                  "--checkpoint=STEP)")
  ap.add_argument("--spacing-tolerance", type=float, default=0.05,
                  help="resample when a voxel size differs from training's by more than this "
                       "fraction")
  ap.add_argument("--no-resample", action="store_true", help="never resample")
  ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
  ap.add_argument("--config", default=None,
                  help="config NAME_OR_PATH[:variant] (default: the one saved in the checkpoint)")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
  try:
    predict(args.workdir, args.input, args.output, samples=args.samples, seed=args.seed,
            step=args.step if args.step is not None else args.checkpoint,
            tolerance=-1.0 if args.no_resample else args.spacing_tolerance,
            overwrite=args.overwrite, config_arg=args.config)
  except (UserError, VolumeError, ValueError, FileNotFoundError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
