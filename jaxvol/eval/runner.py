"""One inference path: volumes + predict functions -> predictions, NIfTI, metrics, previews, rows.

Every command that turns a list of volumes into predictions goes through `run`: `--mode=evaluate`
(jaxvol.eval.evaluate), `--mode=sample` of unconditional models (jaxvol.eval.generate: volumes
with no target), the plug-and-play evaluation (jaxvol.eval.pnp),
`jaxvol predict` (a user's NIfTI files) and the experiments (experiments/quality.py,
experiments/patch_prior.py, experiments/curves.py). Callers hand it functions, not models:

  volumes     `Volume`s (or a generator of them): what a predictor receives (`inputs`), how a
              prediction in network units maps to the target's original units (`to_units`) and
              onto the grid written to NIfTI (`place`: the box into the input's whole grid, or a
              resampling back to a user's voxel size), the geometry to write with, and, when the
              volume can be scored, its target (original units over the predicted box), the
              metrics' data range and reference predictions (the input as a prediction, the
              training-target mean) scored beside the model;
  predictors  {name: Predictor}: `predictor(volume, key)` returns the prediction (network units,
              (D, H, W) or (1, D, H, W, 1)); an optional `prepare(volume)` compiles what the call
              will run and may return facts about it (e.g. {"bytes": compiled memory}), so
              `{name}_seconds` times the call alone and `compile_seconds` the preparation.

Volume i is predicted with key fold_in(key, i) (i counts every volume, skipped ones too), so a
volume gets the same prediction whichever command runs it. With `samples` N > 1 each predictor is
called with fold_in(volume key, k) for k < N; the NIfTI holds the mean of the N predictions in
original units and `_std` files their voxelwise standard deviation.

Outputs (process 0 only; every process computes, as the sharded samplers need all of them):
`nifti_dir/{volume}_pred.nii.gz` for the predictor named "model" and `{volume}_{name}.nii.gz`
for others (with N > 1 also `{volume}_std.nii.gz` / `{volume}_{name}_std.nii.gz`),
`previews/{volume}.png` (input, predictions, target, |first prediction - target|) when a target
exists, and one row per volume: the volume's own
fields, `{name}_{metric}` for every predictor and reference (metrics.compute_all, inside the
target's body mask with mask="body"), `{name}_seconds`, `seconds` (their sum), `compile_seconds`,
and the files written. `mean_metrics` averages rows for a summary.

The sampler a method's predictor runs on is chosen in one place, `jaxvol.eval.samplers.choose`:
the volume split over config.mesh's spatial (and model) devices when those are > 1
(`samplers.VolumeSampler`), otherwise `samplers.LocalSampler` (one device, or the
config.inference windows spread over this process's devices, jaxvol.ops.windows);
`samplers.SamplerPredictor` makes a predictor of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxvol.data import nifti
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import preview

log = logging.getLogger("jaxvol")
MODEL = "model"


@dataclasses.dataclass
class Volume:
  """One volume to predict (module docstring).

  Attributes:
    name: the output name (subject id, or a user's file name without its suffix).
    inputs: what the predictors receive, e.g. the (1, D, H, W, C) condition in network units.
    to_units: network units -> the target's original units.
    place: the prediction in original units (over the predicted box) -> the array written to
      NIfTI; None writes it as it is.
    geometry: the NIfTI geometry written with (jaxvol.data.nifti.Geometry); None writes nothing.
    target: the target over the predicted box in original units, or None (not scored).
    data_range: PSNR/SSIM data range (required with a target).
    references: other predictions in original units, scored like the predictors ("input",
      "train_mean").
    preview_input: (label, original-unit array over the box) shown first in the preview.
    row: fields copied into the volume's row (box, notes, spacings...).
  """

  name: str
  inputs: Any
  to_units: Callable[[np.ndarray], np.ndarray]
  place: Callable[[np.ndarray], np.ndarray] | None = None
  geometry: Any = None
  target: np.ndarray | None = None
  data_range: float | None = None
  references: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  preview_input: tuple[str, np.ndarray] | None = None
  row: dict = dataclasses.field(default_factory=dict)


def output_stem(volume: str, name: str) -> str:
  """`{volume}_pred` for the model, `{volume}_{name}` for any other predictor."""
  return f"{volume}_pred" if name == MODEL else f"{volume}_{name}"


def std_stem(volume: str, name: str) -> str:
  """`{volume}_std` for the model, `{volume}_{name}_std` for any other predictor."""
  return f"{volume}_std" if name == MODEL else f"{volume}_{name}_std"


def _spatial(x) -> np.ndarray:
  """(D, H, W) float32 from (D, H, W) or (1, D, H, W, 1)."""
  x = np.asarray(x)
  if x.ndim == 5:
    x = x[0, ..., 0]
  if x.ndim != 3:
    raise ValueError(f"a predictor returned shape {x.shape}; expected (D, H, W) or "
                     "(1, D, H, W, 1)")
  return x.astype(np.float32)


def run(volumes: Iterable[Volume], predictors: Mapping[str, Any], key, out_dir: str | None,
        *, total: int | None = None, samples: int = 1, mask: str | None = "body",
        write: Sequence[str] | None = None, nifti_dir: str = "nifti", previews: bool = True,
        skip_existing: bool = False, writes: bool | None = None,
        report: Callable[[str], None] | None = None,
        stem: Callable[[str, str], str] = output_stem) -> list[dict]:
  """Predicts, writes and scores every volume (module docstring).

  Args:
    volumes: the volumes, in order (a generator reads each only when it is its turn).
    predictors: {name: predictor}; "model" names the method's prediction.
    key: the base PRNG key; volume i uses fold_in(key, i).
    out_dir: the folder written into (None: nothing written).
    total: the number of volumes (for progress and ETA) when `volumes` has no len().
    samples: predictions per volume and predictor (mean and std written with N > 1).
    mask: "body" scores inside the target's body mask (metrics.body_mask), None everywhere.
    write: predictor names written to NIfTI (default all).
    nifti_dir: sub-folder of out_dir for the NIfTI files ("" = out_dir itself).
    previews: write tri-planar previews of scored volumes.
    skip_existing: a volume whose NIfTI outputs all exist is not predicted again (row
      "skipped").
    writes: whether this process writes (default: process 0).
    report: progress lines ("[i/n] name: seconds ... ETA"); default logging.info.
    stem: (volume name, predictor name) -> the NIfTI file name without its suffix (default
      `output_stem`; --mode=sample names its files sample_{i:03d}).

  Returns:
    One row per volume.
  """
  if samples < 1:
    raise ValueError(f"samples must be >= 1, got {samples}")
  if not predictors:
    raise ValueError("no predictor given")
  writes = (jax.process_index() == 0) if writes is None else writes
  writes = writes and out_dir is not None
  report = report or log.info
  names = list(predictors)
  write = names if write is None else list(write)
  total = total if total is not None else (len(volumes) if hasattr(volumes, "__len__") else None)
  folder = os.path.join(out_dir, nifti_dir) if out_dir is not None else None
  if writes:
    os.makedirs(folder, exist_ok=True)
  rows, started, done = [], time.time(), 0
  for idx, vol in enumerate(volumes):
    count = f"[{idx + 1}/{total}]" if total else f"[{idx + 1}]"
    paths = {n: os.path.join(folder, stem(vol.name, n) + ".nii.gz")
             for n in write} if folder is not None and vol.geometry is not None else {}
    row = {"subject": vol.name, **vol.row}
    if skip_existing and paths and all(os.path.exists(p) for p in paths.values()):
      row["skipped"] = "outputs exist"
      row["outputs"] = paths
      rows.append(row)
      report(f"{count} {vol.name}: {next(iter(paths.values()))} exists, skipped")
      continue
    vkey = jax.random.fold_in(key, idx)
    preds, stds, compile_s = {}, {}, 0.0
    for name in names:
      fn = predictors[name]
      prepare = getattr(fn, "prepare", None)
      if prepare is not None:
        t0 = time.perf_counter()
        facts = prepare(vol) or {}
        compile_s += time.perf_counter() - t0
        row.update({f"{name}_{k}": v for k, v in facts.items()})
      keys = [vkey] if samples == 1 else [jax.random.fold_in(vkey, k) for k in range(samples)]
      t0 = time.perf_counter()
      draws = [vol.to_units(_spatial(fn(vol, k))) for k in keys]
      row[f"{name}_seconds"] = time.perf_counter() - t0
      preds[name] = np.mean(draws, axis=0).astype(np.float32)
      if samples > 1:
        stds[name] = np.std(draws, axis=0).astype(np.float32)
    row["seconds"] = float(sum(row[f"{n}_seconds"] for n in names))
    row["compile_seconds"] = compile_s
    if samples > 1:
      row["samples"] = samples
    if writes:
      for name, path in paths.items():
        place = vol.place or (lambda a: a)
        nifti.save_volume(path, place(preds[name]).astype(np.float32), geometry=vol.geometry)
        if name in stds:
          std_path = os.path.join(folder, std_stem(vol.name, name) + ".nii.gz")
          nifti.save_volume(std_path, np.maximum(place(stds[name]), 0).astype(np.float32),
                            geometry=vol.geometry)
          row[f"{name}_std_output"] = std_path
    if paths:
      row["outputs"] = paths
    if vol.target is not None:
      if vol.data_range is None:
        raise ValueError(f"{vol.name}: a scored volume needs a data range")
      target = np.asarray(vol.target, np.float32)
      where = metrics_lib.body_mask(target) if mask == "body" else None
      row["data_range"] = float(vol.data_range)
      for name, pred in {**preds, **vol.references}.items():
        for k, v in metrics_lib.compute_all(pred, target, where, float(vol.data_range)).items():
          row[f"{name}_{k}"] = v
      if previews and writes:
        os.makedirs(os.path.join(out_dir, "previews"), exist_ok=True)
        first = names[0]
        panels = ([vol.preview_input] if vol.preview_input is not None else [])
        panels += [("prediction" if n == MODEL else n, p) for n, p in preds.items()]
        panels.append(("target", target))
        preview.save_triplanar(os.path.join(out_dir, "previews", f"{vol.name}.png"), panels,
                               error_panel=(f"|{'prediction' if first == MODEL else first} - "
                                            "target|", np.abs(preds[first] - target)))
    rows.append(row)
    done += 1
    left = (total - idx - 1) if total else 0
    eta = (time.time() - started) / done * left
    scored = ", ".join(f"{k}={row[k]:.4g}" for k in (f"{names[0]}_psnr", f"{names[0]}_ssim")
                       if k in row)
    where_to = f" -> {next(iter(paths.values()))}" if paths and writes else ""
    report(f"{count} {vol.name}: {row['seconds']:.1f} s" + (f" (+{compile_s:.1f} s compile)"
                                                            if compile_s >= 0.05 else "")
           + (f", {scored}" if scored else "") + where_to + (f", ETA {eta:.0f} s" if left else ""))
  return rows


def mean_metrics(rows: Sequence[dict], names: Sequence[str],
                 metrics: Sequence[str] = metrics_lib.METRICS) -> dict[str, dict[str, float]]:
  """{name: {metric: mean over the rows that have it}} for the scored rows."""
  out = {}
  for name in names:
    entry = {}
    for k in metrics:
      values = [r[f"{name}_{k}"] for r in rows if f"{name}_{k}" in r]
      if values:
        entry[k] = float(np.mean(values))
    if entry:
      out[name] = entry
  return out


def warm_seconds(rows: Sequence[dict], name: str = MODEL) -> float | None:
  """Mean seconds per volume of one predictor, compilation excluded (None without rows)."""
  values = [r[f"{name}_seconds"] for r in rows if f"{name}_seconds" in r]
  return float(np.mean(values)) if values else None
