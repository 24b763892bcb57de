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
Every reconstruction is a predictor of the one inference path (jaxvol.eval.runner), compiled for
each volume before it is timed. Writes under WORKDIR/pnp/: summary.json ({"metrics": {name:
{psnr, ssim, nmse}}, "seconds": {name: warm seconds per volume}, "compiled_bytes": {name: XLA's
compiled memory}, ...}), metrics.csv, nifti/{subject}_{name}.nii.gz on the input's grid in original intensities, and
previews/{subject}.png. Metrics on the original intensity scale inside the target's body mask,
PSNR/SSIM over the preset's range. metrics.csv gives each volume's reconstructed box ("box",
[[start, stop], ...] voxels), summary.json the limit ("max_box") and the boxes. The folder is
replaced as a whole when the run completes (jaxvol.fileio.fresh_dir): no file of an
earlier run stays among the new ones. Process 0 writes.
"""

from __future__ import annotations

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
from jaxvol.eval import volumes
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import runner
from jaxvol.eval import samplers
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


def prior_window(method, prior: str):
  """The prior's windows: the method's sliding window for `patch`, None for `whole`."""
  if prior not in ("patch", "whole"):
    raise ValueError(f"config.pnp.prior must be patch or whole, got {prior!r}")
  window = method.sliding_window() if prior == "patch" else None
  if prior == "patch" and window is None:
    raise ValueError("a patch prior needs config.inference.window (the training patch size)")
  return window


def solver_kwargs(p, solver: str) -> dict:
  """The keyword arguments config.pnp gives `solver` (jaxvol.inverse.solvers.SOLVERS)."""
  if solver not in solvers.SOLVERS:
    raise ValueError(f"unknown solver {solver!r}; available: {sorted(solvers.SOLVERS)}")
  kw = {"num_steps": p.num_steps}
  if solver == "diffpir":
    kw.update(noise_std=p.noise_std, lam=p.lam, zeta=p.zeta, min_rho=p.min_rho)
  else:
    kw.update(zeta=p.zeta, step=p.dps_step)
  return kw


def predictor_set(p, method, params, runs) -> dict:
  """The reconstructions as predictors of the one inference path: zero_filled, tv, and
  {name: (solver, prior)} for each of `runs` (prior "patch" or "whole", module docstring).

  Each takes a volume whose inputs are {"op", "y", "shape", "positions"} and is compiled for it
  before it is timed (samplers.CompiledPredictor); a solver's noise is fold 2 of the volume's key.
  """
  def solver_predictor(solver, prior_name):
    window, kw = prior_window(method, prior_name), solver_kwargs(p, solver)

    def build(vol):
      v = vol.inputs
      prior = priors.from_method(method, params, window, positions=v["positions"])
      fn = lambda y, k: solvers.SOLVERS[solver](prior, v["op"], y, v["shape"],
                                                jax.random.fold_in(k, 2), **kw)
      return fn, (v["y"],)
    return samplers.CompiledPredictor(build)

  built = {name: solver_predictor(*run) for name, run in runs.items()}  # checked first
  return {
      "zero_filled": samplers.CompiledPredictor(lambda vol: (
          lambda y, k: jnp.real(classical.zero_filled(vol.inputs["op"], y)), (vol.inputs["y"],))),
      "tv": samplers.CompiledPredictor(lambda vol: (
          lambda y, k: jnp.real(classical.tv_reconstruction(vol.inputs["op"], y, p.tv_lambda,
                                                            p.tv_iters)), (vol.inputs["y"],))),
      **built,
  }


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
  params, step = volumes.load_params(config, prior_dir)
  predictors = predictor_set(p, method, params, {p.solver: (p.solver, p.prior)})
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
  limit = volumes.max_box(config)
  base_key = jax.random.PRNGKey(p.seed)

  def each_volume():
    for idx, subj in enumerate(subjects):
      sid = subj["id"]
      box = volumes.eval_box(subj, config)
      x = store.read(sid, config.data.target, box).astype(np.float32)
      shape = _fit(x.shape, build_operator(p, x.shape))
      box = tuple((a, a + s) for (a, _), s in zip(box, shape))
      x = x[:shape[0], :shape[1], :shape[2]]
      op = build_operator(p, shape)
      positions = pipeline.position_grid(tuple(subj["shape"]), box, axes) \
          if method.position_channels else None
      # Volume idx's key is the runner's fold_in(base_key, idx): measurement noise from fold 1,
      # the solver's from fold 2.
      y = ops.simulate_measurement(op, jnp.asarray(x), p.noise_std,
                                   jax.random.fold_in(jax.random.fold_in(base_key, idx), 1))
      preset = store.preset(sid, config.data.target)
      full_shape, background = tuple(subj["shape"]), float(preset.inverse(-1.0))

      def place(raw, full_shape=full_shape, box=box, background=background):
        full = np.full(full_shape, background, np.float32)
        full[tuple(slice(a, b) for a, b in box)] = raw
        return full

      yield runner.Volume(
          name=sid, inputs={"op": op, "y": y, "shape": shape, "positions": positions},
          to_units=lambda r, preset=preset: preset.inverse(np.asarray(r)).astype(np.float32),
          place=place, geometry=store.geometry(sid, config.data.target),
          target=preset.inverse(x).astype(np.float32), data_range=float(preset.hi - preset.lo),
          row={"box": [list(b) for b in box], "operator": type(op).__name__})

  names = list(predictors)
  with fileio.fresh_dir(os.path.join(workdir, "pnp"), writes) as out_dir:
    rows = runner.run(each_volume(), predictors, base_key, out_dir, total=len(subjects),
                      mask="body" if config.eval.mask == "body" else None,
                      previews=bool(config.eval.previews))
    summary = {"checkpoint_step": step, "prior": p.prior, "solver": p.solver, "task": p.task,
               "operator": rows[0]["operator"],
               "acceleration": float(p.acceleration),
               "noise_std": float(p.noise_std), "split": config.eval.split, "n_volumes": len(rows),
               "simulated": "measurements simulated from the ground truth in network units",
               "metrics": runner.mean_metrics(rows, names, METRICS),
               "seconds": {n: runner.warm_seconds(rows, n) for n in names},
               "compiled_bytes": {n: max(r[f"{n}_bytes"] for r in rows) for n in names},
               "compile_seconds": float(sum(r["compile_seconds"] for r in rows)),
               "region": (None if config.data.eval_region is None else
                          {str(k): list(v) for k, v in config.data.eval_region.items()}),
               "conventions": {k: v for k, v in metrics_lib.conventions(
                   "target preset hi - lo", config.eval.mask).items() if k in METRICS},
               "max_box": None if limit is None else list(limit),
               "boxes": {r["subject"]: r["box"] for r in rows}}
    if writes:
      fileio.write_csv_atomic(os.path.join(out_dir, "metrics.csv"), rows)
      fileio.write_text_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2))
    return summary
