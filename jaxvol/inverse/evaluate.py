"""Plug-and-play reconstruction from a prior checkpoint (`--mode=evaluate` of configs/pnp_*.py).

For every volume of the evaluation split (its evaluation region, clipped to at most
config.eval.max_box voxels per axis around its centre), the measurement is simulated
from the ground truth in network units (the [-1, 1] intensity window, an affine map of the
magnitude image; measurements are simulated, no raw k-space is used), then reconstructed by
  zero_filled   the adjoint (MRI: real part of the zero-filled image; SR: nearest upsampling),
  tv            total-variation regularised least squares (jaxvol.inverse.classical),
  SOLVER        the plug-and-play solver (config.pnp.solver) with the diffusion prior restored
                from the checkpoint (config.pnp.prior: `patch` = shifted Gaussian-blended windows of
                config.inference.window, `whole` = one whole-volume pass).
Writes under WORKDIR/pnp/: summary.json ({"metrics": {name: {psnr, ssim, nmse}}, ...}),
metrics.csv, nifti/{subject}_{name}.nii.gz on the input's grid in original intensities, and
previews/{subject}.png. Metrics on the original intensity scale inside the target's body mask,
PSNR/SSIM over the preset's range. metrics.csv gives each volume's reconstructed box ("box",
[[start, stop], ...] voxels), summary.json the limit ("max_box") and the boxes. The folder is
replaced as a whole when the run completes (jaxvol.eval.evaluate.fresh_output_dir): no file of an
earlier run stays among the new ones. Process 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol import fileio
from jaxvol import methods
from jaxvol.data import inference as inference_lib
from jaxvol.data import nifti
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import preview
from jaxvol.inverse import classical
from jaxvol.inverse import operators as ops
from jaxvol.inverse import priors
from jaxvol.inverse import solvers

log = logging.getLogger("jaxvol")
METRICS = ("psnr", "ssim", "nmse")


def build_operator(p, shape):
  """The forward operator of config.pnp for a (D, H, W) volume."""
  if p.task == "mri":
    maker = {"equispaced": ops.equispaced_mask, "random": ops.random_mask}.get(p.mask)
    if maker is None:
      raise ValueError(f"unknown mask {p.mask!r}: use equispaced or random")
    kw = {"key": p.seed} if p.mask == "random" else {}
    mask = jnp.asarray(maker(shape, p.acceleration, p.center_fraction, **kw))
    if p.coils <= 1:
      return ops.SingleCoilMRI(mask)
    return ops.MultiCoilMRI(mask, ops.synthetic_coil_maps(shape, p.coils), cg_iters=p.cg_iters)
  if p.task == "sr":
    return ops.Downsample(tuple(p.sr_factor))
  if p.task == "denoise":
    return ops.Identity()
  raise ValueError(f"unknown pnp task {p.task!r}: use mri, sr or denoise")


def _fit(shape, op):
  """Crops a shape down to a multiple of the operator's block (SR needs whole blocks)."""
  if isinstance(op, ops.Downsample):
    return tuple(s - s % f for s, f in zip(shape, op.factor))
  return tuple(shape)


def reconstruct(config, workdir: str) -> dict:
  """Reconstructs every volume of the evaluation split (module docstring); returns the summary
  that WORKDIR/pnp/summary.json holds."""
  p = config.pnp
  prior_dir = p.prior_workdir or workdir
  axes = pipeline.position_axes(config.data)
  pipeline.check_position_coverage(config.data.train_region, config.data.eval_region, axes)
  method = methods.build(config, jax.devices()[0].platform)
  params, step = evaluate_lib.load_params(config, prior_dir)
  if p.prior not in ("patch", "whole"):
    raise ValueError(f"config.pnp.prior must be patch or whole, got {p.prior!r}")
  window = method.sliding_window() if p.prior == "patch" else None
  if p.prior == "patch" and window is None:
    raise ValueError("a patch prior needs config.inference.window (the training patch size)")
  if p.solver not in solvers.SOLVERS:
    raise ValueError(f"unknown solver {p.solver!r}; available: {sorted(solvers.SOLVERS)}")
  store = store_lib.Store(config.data.store)
  # The measurements are simulated from the normalised target, and reconstructions mapped back
  # with its preset: that preset must not come from the evaluated volume itself.
  inference_lib.check_rules(inference_lib.rules_of(store, (), config.data.target), (),
                            config.data.target, store.path)
  subjects = store.subjects(config.eval.split)
  lacking = [s["id"] for s in subjects if config.data.target not in s["volumes"]]
  if lacking:  # measurements are simulated from the target: nothing to reconstruct without it
    log.warning("skipping %d subject(s) without a %r volume: %s", len(lacking),
                config.data.target, lacking)
    subjects = [s for s in subjects if config.data.target in s["volumes"]]
  if not subjects:
    raise ValueError(f"split {config.eval.split!r} of store {config.data.store} has no subjects")
  writes = jax.process_index() == 0
  with evaluate_lib.fresh_output_dir(os.path.join(workdir, "pnp"), writes) as out_dir:
    if writes:
      for sub in ("nifti", "previews") if config.eval.previews else ("nifti",):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    limit = evaluate_lib.max_box(config)
    rows = []
    for idx, subj in enumerate(subjects):
      sid = subj["id"]
      box = evaluate_lib.eval_box(subj, config)
      x = store.read(sid, config.data.target, box).astype(np.float32)
      probe = build_operator(p, x.shape)
      shape = _fit(x.shape, probe)
      box = tuple((a, a + s) for (a, _), s in zip(box, shape))
      x = jnp.asarray(x[:shape[0], :shape[1], :shape[2]])
      op = build_operator(p, shape)
      positions = pipeline.position_grid(tuple(subj["shape"]), box, axes) \
          if method.position_channels else None
      prior = priors.from_method(method, params, window, positions=positions)
      key = jax.random.fold_in(jax.random.PRNGKey(p.seed), idx)
      y = ops.simulate_measurement(op, x, p.noise_std, jax.random.fold_in(key, 1))
      recs, seconds = {}, {}
      t0 = time.time()
      recs["zero_filled"] = jnp.real(classical.zero_filled(op, y))
      seconds["zero_filled"] = time.time() - t0
      t0 = time.time()
      recs["tv"] = jnp.real(classical.tv_reconstruction(op, y, p.tv_lambda, p.tv_iters))
      seconds["tv"] = time.time() - t0
      kw = {"num_steps": p.num_steps}
      if p.solver == "diffpir":
        kw.update(noise_std=p.noise_std, lam=p.lam, zeta=p.zeta, min_rho=p.min_rho)
      else:
        kw.update(zeta=p.zeta, step=p.dps_step)
      solve = jax.jit(lambda k: solvers.SOLVERS[p.solver](prior, op, y, shape, k, **kw))
      t0 = time.time()
      recs[p.solver] = jax.block_until_ready(solve(jax.random.fold_in(key, 2)))
      seconds[p.solver] = time.time() - t0
      preset = store.preset(sid, config.data.target)
      target_raw = preset.inverse(np.asarray(x)).astype(np.float32)
      mask = metrics_lib.body_mask(target_raw) if config.eval.mask == "body" else None
      data_range = float(preset.hi - preset.lo)
      geometry = store.geometry(sid, config.data.target)
      row = {"subject": sid, "box": [list(b) for b in box]}
      panels = [("target", target_raw)]
      for name, rec in recs.items():
        raw = preset.inverse(np.asarray(rec)).astype(np.float32)
        m = metrics_lib.compute_all(raw, target_raw, mask, data_range)
        for k in METRICS:
          row[f"{name}_{k}"] = m[k]
        row[f"{name}_seconds"] = seconds[name]
        panels.append((name, raw))
        if writes:
          full = np.full(tuple(subj["shape"]), preset.inverse(-1.0), np.float32)
          full[tuple(slice(a, b) for a, b in box)] = raw
          nifti.save_volume(os.path.join(out_dir, "nifti", f"{sid}_{name}.nii.gz"), full,
                            geometry=geometry)
      if writes and config.eval.previews:
        preview.save_triplanar(os.path.join(out_dir, "previews", f"{sid}.png"), panels)
      log.info("%s: %s", sid, ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                        if isinstance(v, (int, float))))
      rows.append(row)
    names = list(recs)
    summary = {"checkpoint_step": step, "prior": p.prior, "solver": p.solver, "task": p.task,
               "operator": type(op).__name__, "acceleration": float(p.acceleration),
               "noise_std": float(p.noise_std), "split": config.eval.split, "n_volumes": len(rows),
               "simulated": "measurements simulated from the ground truth in network units",
               "metrics": {n: {k: float(np.mean([r[f"{n}_{k}"] for r in rows])) for k in METRICS}
                           for n in names},
               "seconds": {n: float(np.mean([r[f"{n}_seconds"] for r in rows])) for n in names},
               "region": (None if config.data.eval_region is None else
                          {str(k): list(v) for k, v in config.data.eval_region.items()}),
               "conventions": {k: v for k, v in metrics_lib.conventions(
                   "target preset hi - lo", "body").items() if k in METRICS},
               "max_box": None if limit is None else list(limit),
               "boxes": {r["subject"]: r["box"] for r in rows}}
    if writes:
      fileio.write_csv_atomic(os.path.join(out_dir, "metrics.csv"), rows)
      fileio.write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary
