"""Patch prior vs whole-volume prior in plug-and-play solvers: memory, time and quality.

The claim under test ("Investigating the Feasibility of Patch-based Inference for Generalized
Diffusion Priors in Inverse Problems for Medical Images", 2025): a diffusion prior evaluated on the
whole volume as overlapping, Gaussian-blended, randomly shifted patches reconstructs as well as the
same network applied to the whole volume at once, with a fraction of the memory, in every solver.

Protocol. One prior (configs/patch_prior_train.py, variant `--variant` plus `heldout`, trained
through the library's own loop on random patches of the stroke T1's left hemisphere unless
`--prior-workdir` already holds a checkpoint) is restored once. The test volume is a centred
`--size` box of the held-out slab of the right hemisphere (RAS x in [0.6, 1]); a `positions` prior encodes only
the axes whose evaluation coordinates training covers (RAS y and z; `check_positions` refuses any
other). For each task (MRI from simulated single-coil Cartesian k-space at R=4 or 8, equispaced
with a fully sampled centre; super-resolution x2 or x4 by block averaging) the measurement is
simulated from the magnitude image in network units with Gaussian noise sigma = --noise (the same
measurement for every reconstruction), then
  zero_filled   the adjoint (nearest upsampling for SR),
  tv            total-variation least squares (Chambolle-Pock, --tv-iters iterations),
  SOLVER x {patch, whole}   DiffPIR / DPS with --steps prior evaluations each.
Every reconstruction is a predictor of the library's one inference path (jaxvol.eval.runner):
`bytes` is XLA's compiled per-device memory of the whole reconstruction (temp + arguments +
outputs - aliased; jaxvol.parallel.cost.compiled_cost), `seconds` one run after
compilation, PSNR/SSIM on the original intensity scale inside the target's brain mask over the
preset's range. `--memory-sizes` adds compile-only memory records (nothing allocated) for cubic
volumes of those sides. Writes OUT/patch_prior.json (records {task, solver, prior, bytes,
seconds, psnr, ssim, size, steps}; `position_axes` the prior's encoded axes, [] for none;
`command`) and OUT/patch_prior.md (the results page, `report`, which renders it from the JSON
alone), and prints the table.

  python experiments/patch_prior.py --out runs/patch_prior_exp
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

import sparse_common as common  # pylint: disable=wrong-import-position
from jaxvol import config as config_lib  # pylint: disable=wrong-import-position
from jaxvol import experiment  # pylint: disable=wrong-import-position
from jaxvol import fileio  # pylint: disable=wrong-import-position
from jaxvol import methods  # pylint: disable=wrong-import-position
from jaxvol.data import pipeline  # pylint: disable=wrong-import-position
from jaxvol.data import store as store_lib  # pylint: disable=wrong-import-position
from jaxvol.eval import volumes  # pylint: disable=wrong-import-position
from jaxvol.eval import runner  # pylint: disable=wrong-import-position
from jaxvol.eval import pnp as pnp_eval  # pylint: disable=wrong-import-position
from jaxvol.inverse import operators as ops  # pylint: disable=wrong-import-position
from jaxvol.inverse import priors  # pylint: disable=wrong-import-position
from jaxvol.inverse import solvers  # pylint: disable=wrong-import-position
from jaxvol.parallel import cost as cost_lib  # pylint: disable=wrong-import-position

TASKS = {"mri_r4": ("mri", "r4"), "mri_r8": ("mri", "r8"), "sr_x2": ("sr", "x2"),
         "sr_x4": ("sr", "x4")}


def compiled_bytes(compiled) -> int:
  return cost_lib.compiled_cost(compiled)["bytes"]


def task_config(task: str, variant: str, store: str, prior_dir: str,
                overlap: float | None = None):
  kind, token = TASKS[task]
  # The prior's split: one hemisphere of the stroke T1 trained, the other reconstructed.
  c = config_lib.pnp_config(kind, config_lib.with_tokens(variant, token, config_lib.HELDOUT))
  c.data.store = store
  c.pnp.prior_workdir = prior_dir
  if overlap is not None:
    c.inference.overlap = overlap
  check_positions(c)
  return c


def check_positions(config) -> None:
  """Refuses position channels whose evaluation coordinates lie outside the training ones."""
  pipeline.check_position_coverage(config.data.train_region, config.data.eval_region,
                                   pipeline.position_axes(config.data))


def ensure_prior(variant: str, store: str, prior_dir: pathlib.Path, log=print) -> None:
  """Trains the prior through the library's loop (resuming) until its budget is spent.

  The DONE marker keeps a finished prior from being trained further by a later run.
  """
  c = experiment.packaged_config("patch_prior_train",
                                 config_lib.with_tokens(variant, config_lib.HELDOUT))
  c.data.store = store
  check_positions(c)
  # Data parallel over as many local devices as divide the batch.
  c.mesh.data = math.gcd(c.data.batch_size, jax.local_device_count())
  if not (prior_dir / "DONE").exists():
    log(f"training the prior ({variant}) into {prior_dir}")
    experiment.train(c, prior_dir)
    fileio.write_text_atomic(str(prior_dir / "DONE"), "trained\n")


def test_volume(config, size) -> tuple[np.ndarray, tuple, object, tuple]:
  """The centred `size` box of the eval region of the first subject, its box, preset, shape."""
  store = store_lib.Store(config.data.store)
  subj = store.subjects(config.eval.split)[0]
  shape = tuple(subj["shape"])
  region = pipeline.region_box(shape, config.data.eval_region)
  box = []
  for (lo, hi), s in zip(region, size):
    if hi - lo < s:
      raise ValueError(f"--size {size} does not fit the evaluation region {region}")
    start = lo + (hi - lo - s) // 2
    box.append((start, start + s))
  x = store.read(subj["id"], config.data.target, box).astype(np.float32)
  return x, tuple(box), store.preset(subj["id"], config.data.target), shape


def run_task(task, args, store, prior_dir, log=print) -> list[dict]:
  """zero-filled, TV and every solver x {patch, whole} prior on the test volume, through the
  library's one inference path (jaxvol.eval.runner): each reconstruction is a predictor compiled
  before it is timed, scored inside the target's body mask over the preset's range."""
  c = task_config(task, args.variant, store, prior_dir, args.overlap)
  p = c.pnp
  p.noise_std, p.num_steps, p.tv_iters = args.noise, args.steps, args.tv_iters
  method = methods.build(c, jax.devices()[0].platform)
  params, step = volumes.load_params(c, prior_dir)
  x, box, preset, full_shape = test_volume(c, args.size)
  shape = x.shape
  op = pnp_eval.build_operator(p, shape)
  key = jax.random.PRNGKey(args.seed)
  # The runner's key of volume 0; measurement noise from its fold 1, the solvers' from fold 2.
  y = ops.simulate_measurement(op, jnp.asarray(x), p.noise_std,
                               jax.random.fold_in(jax.random.fold_in(key, 0), 1))
  axes = pipeline.position_axes(c.data)
  positions = pipeline.position_grid(full_shape, box, axes) if method.position_channels else None
  volume = runner.Volume(name="test", inputs={"op": op, "y": y, "shape": shape,
                                              "positions": positions},
                         to_units=lambda r: preset.inverse(np.real(np.asarray(r))),
                         target=preset.inverse(x).astype(np.float32),
                         data_range=float(preset.hi - preset.lo))
  # The library's reconstructions (jaxvol.eval.pnp), each solver with the patch and the whole prior.
  names = {"zero_filled": ("zero_filled", "zero_filled"), "tv": ("tv", "tv")}
  names |= {f"{solver}_{prior}": (solver, prior) for prior in ("patch", "whole")
            for solver in args.solvers}
  runs = {n: run for n, run in names.items() if n not in ("zero_filled", "tv")}
  predictors = pnp_eval.predictor_set(p, method, params, runs)
  row, = runner.run([volume], {n: predictors[n] for n in names}, key, None, mask="body",
                    report=lambda line: None)
  base = {"task": task, "size": list(shape), "steps": args.steps, "checkpoint_step": step}
  records = []
  for n, (solver, prior_name) in names.items():
    r = {**base, "solver": solver, "prior": prior_name, "bytes": row[f"{n}_bytes"],
         "seconds": row[f"{n}_seconds"], "psnr": float(row[f"{n}_psnr"]),
         "ssim": float(row[f"{n}_ssim"])}
    log(f"  {task:7s} {solver:8s} {prior_name:11s} {r['bytes'] / 2**20:9.1f} MiB "
        f"{r['seconds']:8.1f} s  PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.4f}")
    records.append(r)
  return records


def memory_only(task, args, store, prior_dir, side: int, log=print) -> list[dict]:
  """Compile-only per-device memory of each solver x prior on a side^3 volume."""
  c = task_config(task, args.variant, store, prior_dir, args.overlap)
  p = c.pnp
  p.num_steps = args.steps
  method = methods.build(c, jax.devices()[0].platform)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                        volumes.load_params(c, prior_dir)[0])
  shape = (side,) * 3
  op = pnp_eval.build_operator(p, shape)
  y = jax.eval_shape(lambda: op.forward(jnp.zeros(shape, jnp.float32)))
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  positions = jax.ShapeDtypeStruct(shape + (3,), jnp.float32) if method.position_channels else None
  out = []
  for prior_name in ("patch", "whole"):
    for solver in args.solvers:
      kw = pnp_eval.solver_kwargs(p, solver)
      window = pnp_eval.prior_window(method, prior_name)

      def fn(pp, yy, k, pos, s=solver, window=window, kw=kw):
        pr = priors.from_method(method, pp, window, positions=pos)
        return solvers.SOLVERS[s](pr, op, yy, shape, k, **kw)

      compiled = jax.jit(fn).lower(params, y, key, positions).compile()
      r = {"task": task, "size": list(shape), "steps": args.steps, "solver": solver,
           "prior": prior_name, "bytes": compiled_bytes(compiled), "seconds": None,
           "psnr": None, "ssim": None, "compile_only": True}
      log(f"  {task:7s} {solver:8s} {prior_name:11s} {side}^3 {r['bytes'] / 2**20:9.1f} MiB")
      out.append(r)
  return out


def table(records) -> str:
  lines = ["| task | size | solver | prior | memory (MiB) | seconds | PSNR (dB) | SSIM |",
           "|---|---|---|---|---:|---:|---:|---:|"]
  for r in records:
    sec = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
    ps = "-" if r["psnr"] is None else f"{r['psnr']:.2f}"
    ss = "-" if r["ssim"] is None else f"{r['ssim']:.4f}"
    size = "x".join(str(s) for s in r["size"])
    lines.append(f"| {r['task']} | {size} | {r['solver']} | {r['prior']} | "
                 f"{r['bytes'] / 2**20:.1f} | {sec} | {ps} | {ss} |")
  return "\n".join(lines)


def verdicts(records) -> list[str]:
  """The issue's targets, checked per task and solver."""
  out = []
  runs = [r for r in records if not r.get("compile_only")]
  for task in sorted({r["task"] for r in runs}):
    rs = [r for r in runs if r["task"] == task]
    ref = max(r["psnr"] for r in rs if r["prior"] in ("zero_filled", "tv"))
    for solver in sorted({r["solver"] for r in rs if r["prior"] in ("patch", "whole")}):
      pat = next(r for r in rs if r["solver"] == solver and r["prior"] == "patch")
      who = next(r for r in rs if r["solver"] == solver and r["prior"] == "whole")
      saving = 1.0 - pat["bytes"] / who["bytes"]
      out.append(f"{task} {solver}: patch uses {100 * saving:.0f}% less memory (target >= 60%), "
                 f"PSNR patch - whole = {pat['psnr'] - who['psnr']:+.2f} dB (target >= -0.5), "
                 f"patch - best classical = {pat['psnr'] - ref:+.2f} dB, "
                 f"whole - best classical = {who['psnr'] - ref:+.2f} dB (targets > 0), "
                 f"time patch/whole = {pat['seconds'] / who['seconds']:.2f}")
  for side in sorted({r["size"][0] for r in records if r.get("compile_only")}):
    for solver in sorted({r["solver"] for r in records if r.get("compile_only")}):
      rs = {r["prior"]: r for r in records if r.get("compile_only") and r["size"][0] == side
            and r["solver"] == solver}
      if {"patch", "whole"} <= set(rs):
        out.append(f"{side}^3 {solver} (compile only): patch {rs['patch']['bytes'] / 2**20:.0f} MiB "
                   f"vs whole {rs['whole']['bytes'] / 2**20:.0f} MiB "
                   f"({100 * (1 - rs['patch']['bytes'] / rs['whole']['bytes']):.0f}% less)")
  return out


def command_line(argv=None) -> str:
  """The command that runs this script with `argv` (the process's own arguments when None)."""
  return " ".join(["python experiments/patch_prior.py",
                   shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


def report(result: dict, command: str | None = None) -> str:
  """The results page of one run (OUT/patch_prior.json's content) as markdown.

  `command` names the command that made the record when the record does not (older records).
  """
  records = result["records"]
  runs = [r for r in records if not r.get("compile_only")]
  compiled = [r for r in records if r.get("compile_only")]
  command = result.get("command") or command or "not recorded"
  axes = ", ".join(result.get("position_axes") or ()) or "none"
  overlap = "the config's" if result.get("overlap") is None else f"{result['overlap']:g}"
  checkpoints = "; ".join(f"{task}: step {step}" for task, step in dict.fromkeys(
      (r["task"], r.get("checkpoint_step")) for r in runs))
  parts = [
      "# Patch prior vs whole-volume prior in plug-and-play solvers",
      f"Command: `{command}`; machine: {result.get('device', 'not recorded')}.",
      f"Prior: variant {result.get('variant')}, position channels: {axes}; checkpoint "
      f"{checkpoints or 'not recorded'}. Test box {'x'.join(map(str, result['size']))}; "
      f"measurements {result.get('measurements', 'simulated')}, noise sigma "
      f"{result['noise_std']:g}; {result['steps']} prior evaluations per diffusion "
      f"reconstruction; patch windows overlap {overlap}. Memory: XLA's compiled per-device "
      "memory of the whole reconstruction; seconds: one run after compilation; PSNR/SSIM on the "
      "original intensities inside the target's mask, over the preset's range."]
  if runs:
    parts += ["## Reconstructions", table(runs)]
  if compiled:
    parts += ["## Compile-only memory (nothing allocated)", table(compiled)]
  checks = verdicts(records)
  if checks:
    parts += ["## Targets", "\n".join(f"- {line}" for line in checks)]
  return "\n\n".join(parts) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--variant", default="cpu", help="the prior config's variant (cpu, smoke, ...)")
  ap.add_argument("--prior-workdir", default=None, help="default OUT/prior (trained if absent)")
  ap.add_argument("--tasks", default="mri_r4,sr_x2")
  ap.add_argument("--solvers", default="diffpir,dps")
  ap.add_argument("--size", type=int, nargs=3, default=(32, 48, 48))
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--noise", type=float, default=0.01, help="measurement noise, network units")
  ap.add_argument("--tv-iters", type=int, default=200)
  ap.add_argument("--memory-sizes", default="", help="e.g. 64,128: compile-only memory records")
  ap.add_argument("--overlap", type=float, default=None,
                  help="patch prior window overlap (default: the config's inference.overlap)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--source", default=None, help="folder of the shared real volumes")
  args = ap.parse_args(argv)
  args.solvers = [s for s in args.solvers.split(",") if s]
  for s in args.solvers:
    if s not in solvers.SOLVERS:
      raise SystemExit(f"unknown solver {s!r}; available: {sorted(solvers.SOLVERS)}")
  tasks = [t for t in args.tasks.split(",") if t]
  for t in tasks:
    if t not in TASKS:
      raise SystemExit(f"unknown task {t!r}; available: {sorted(TASKS)}")
  out = common.ensure_dir(pathlib.Path(args.out))
  store = experiment.task_store(out, "mri_t1_t2", args.source)
  prior_dir = pathlib.Path(args.prior_workdir or out / "prior")
  if args.prior_workdir is None:
    ensure_prior(args.variant, store, prior_dir)
  records = []
  for task in tasks:
    records += run_task(task, args, store, str(prior_dir))
  for side in [int(s) for s in args.memory_sizes.split(",") if s]:
    records += memory_only(tasks[0], args, store, str(prior_dir), side)
  checks = verdicts(records)
  axes = pipeline.position_axes(task_config(tasks[0], args.variant, store, str(prior_dir)).data)
  result = {
      "device": common.device_name(), "variant": args.variant, "position_axes": list(axes),
      "steps": args.steps,
      "noise_std": args.noise, "size": list(args.size), "overlap": args.overlap,
      "measurements": "simulated from the magnitude T1 in network units",
      "records": records, "checks": checks, "command": command_line(argv)}
  common.write_json(out / "patch_prior.json", result)
  fileio.write_text_atomic(str(out / "patch_prior.md"), report(result))
  print(table(records))
  print("\n".join(checks))
  return records


if __name__ == "__main__":
  main()
