"""Training and sampling speed-up of sparse-timestep diffusion over the dense 1000-step schedule.

Usage::
  python experiments/sparse_speedup.py --out DIR [--task ct_denoise] [--steps N] [--eval-every K]
      [--crop S] [--width W] [--batch B] [--lr LR] [--val-crops V] [--layout authors|jaxvol]

Two runs of THE SAME network, loss and optimiser on the same data stream (same seed):
  sparse  the task's sparse config (x0 prediction, velocity-space loss, STM): training draws t
          from the 6 levels {0, 199, ..., 999}; sampled with Heun-DDIM over them (9 evaluations).
  dense   the same config with all 1000 levels (f_steps = 999); sampled with DDIM-50 (x0 from the
          network, deterministic).
Every `--eval-every` steps both sample the same held-out validation crops (EMA weights) and record
PSNR (network units, data range 2; for CT a 2000 HU window) against steps and training seconds.

Speed-up to the dense model's final PSNR: the first validation point at which the sparse curve
reaches the dense run's final PSNR; steps_speedup = dense steps / sparse steps to get there,
time_speedup likewise with training seconds (null when the sparse run never gets there).
Sampling: network evaluations and warm seconds per validation batch for sparse Heun, dense
DDIM-50 and dense DDPM-1000 (ancestral, eta = 1), all with the dense-trained weights except
sparse Heun (its own), timed in this one run.

Writes DIR/sparse_speedup.json ({steps_speedup, time_speedup, sample_speedup_vs_ddim50,
nfe: {sparse_heun, ddim50, ddpm1000}, sample_seconds, curves: {sparse, dense}, setup, command}),
DIR/sparse_speedup.md (the results page, `report`, which renders it from the JSON alone) and
DIR/sparse_speedup.png (PSNR against steps, and against training seconds). The JSON's
sampler_matrix scores both trained models under every sampler (sparse Heun as the method uses it,
and with an extra final x0 evaluation at t = 0; the authors' sampler, `authors_sample`: DDIM with
their no-op corrections and the averaged 0 -> -1 ending, 11 evaluations; DDIM-50; and the one-step
x0 estimate at the top level), and the input itself, to tell whether a gap comes from training or
from sampling. Sampling seconds are also timed for the authors' sampler on the sparse-trained
network (11 evaluations, counted as 11).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sparse_common as sc  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import experiment  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import fileio  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.diffusion import sparse as sparse_lib  # noqa: E402  pylint: disable=wrong-import-position

SAMPLERS = ("sparse_heun", "sparse_heun_final_x0", "authors", "ddim50", "one_step")
# Network evaluations per volume of each sampler over the 6 levels {0, 199, ..., 999}.
SAMPLER_NFE = {"sparse_heun": 9, "sparse_heun_final_x0": 10, "authors": 11, "ddim50": 50,
               "one_step": 1}


def make_sampler(method, kind: str, key):
  """A jitted (params, cond) -> x0 sampler of one kind for a trained full-resolution method."""
  diff = method.diffusion
  levels = sparse_lib.sparse_timesteps(diff.num_steps, 5)

  def fn(p, y):
    z_T = jax.random.normal(key, y.shape[:4] + (1,), y.dtype)
    den = lambda z, t: method._apply(p, z, y, t)  # pylint: disable=protected-access
    if kind == "sparse_heun":
      return sparse_lib.heun_ddim_sample(diff, den, z_T, levels)
    if kind == "sparse_heun_final_x0":
      return sparse_lib.heun_ddim_sample(diff, den, z_T, levels, final_denoise=True)
    if kind == "authors":  # their loop: DDIM, no-op corrections, the averaged 0 -> -1 ending
      return sparse_lib.authors_sample(diff, den, z_T, levels)
    if kind == "ddim50":
      return diff.ddim_sample(den, z_T, 50, key)
    if kind == "one_step":  # the x0 estimate at the top level: a regression from the condition
      tv = jnp.full((y.shape[0],), diff.num_steps - 1, jnp.int32)
      return diff.split_output(den(z_T, tv), z_T, tv)[0]
    raise ValueError(kind)
  return jax.jit(fn)


def sampler_matrix(runs: dict, val: dict, key, batch: int = 4) -> dict:
  """PSNR of every trained model under every sampler (which limits: training or sampling?)."""
  out = {}
  for name, run in runs.items():
    params = run.params
    for kind in SAMPLERS:
      fn = make_sampler(run.method, kind, key)
      pred = np.concatenate([np.asarray(fn(params, jnp.asarray(val["cond"][i:i + batch])))
                             for i in range(0, len(val["cond"]), batch)])
      out[f"{name}/{kind}"] = dict(sc.crop_metrics(pred, val["target"]), nfe=SAMPLER_NFE[kind])
  out["input"] = sc.crop_metrics(val["cond"][..., :1], val["target"])
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--task", default="ct_denoise", choices=sorted(sc.TASK_CONFIGS))
  p.add_argument("--steps", type=int, default=600, help="training steps of each run")
  p.add_argument("--eval-every", type=int, default=50)
  p.add_argument("--crop", type=int, default=32)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--val-crops", type=int, default=4)
  p.add_argument("--ddpm-crops", type=int, default=1, help="crops in the DDPM-1000 timing batch")
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
  p.add_argument("--layout", choices=("authors", "jaxvol"), default=None,
                 help="U-Net layout (config.model.layout); default: the config's (authors)")
  p.add_argument("--source", default=None, help="folder of the shared volumes")
  return p.parse_args(argv)


def make_config(args, store: str, dense: bool):
  c = sc.run_config(args, store)
  if dense:
    c.sparse.f_steps = c.diffusion.num_steps - 1  # every level: the dense schedule
  return c


def reach(curve: list[dict], target: float) -> dict | None:
  for p in curve:
    if p["psnr"] >= target:
      return p
  return None


def plot(path: pathlib.Path, curves: dict, dense_final: float) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, pts in curves.items():
    axes[0].plot([p["step"] for p in pts], [p["psnr"] for p in pts], marker="o", label=name)
    axes[1].plot([p["train_seconds"] for p in pts], [p["psnr"] for p in pts], marker="o", label=name)
  for ax, xl in zip(axes, ("training steps", "training seconds")):
    ax.axhline(dense_final, color="gray", ls="--", lw=1, label="dense final")
    ax.set_xlabel(xl)
    ax.set_ylabel("validation PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  tmp.replace(path)


# Older records (before the authors' sampler was added) named the sampler that stops at t = 0
# "sparse_heun_nofinal" and the one with an extra x0 evaluation at t = 0 "sparse_heun".
OLD_SAMPLER_NAMES = {"sparse_heun_nofinal": "sparse_heun", "sparse_heun": "sparse_heun_final_x0"}
SAMPLER_LABELS = {"sparse_heun": "sparse Heun", "sparse_heun_final_x0": "sparse Heun + x0 at t=0",
                  "authors": "authors'", "ddim50": "DDIM-50", "one_step": "one step at t=999"}


def command_line(argv=None) -> str:
  """The command that runs this script with `argv` (the process's own arguments when None)."""
  return " ".join(["python experiments/sparse_speedup.py",
                   shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


def summary_table(result: dict) -> str:
  """The headline table main prints: final PSNRs, speed-ups, NFE and sampling seconds."""
  fmt = lambda v, s="{:.2f}": "not reached" if v is None else s.format(v)
  dense_steps = result["curves"]["dense"][-1]["step"]
  hit, nfe, seconds = result["sparse_reached_at"], result["nfe"], result["sample_seconds"]
  authors_s = "-" if seconds.get("authors") is None else f"{seconds['authors']:.3f}"
  return (f"| quantity | value |\n|---|---|\n"
          f"| dense final PSNR ({dense_steps} steps) | {result['dense_final_psnr']:.2f} dB |\n"
          f"| sparse final PSNR ({result['setup']['steps']} steps) | "
          f"{result['sparse_final_psnr']:.2f} dB |\n"
          f"| sparse steps to dense final | {fmt(hit and hit['step'], '{}')} |\n"
          f"| steps speed-up | {fmt(result['steps_speedup'])}x |\n"
          f"| time speed-up | {fmt(result['time_speedup'])}x |\n"
          f"| NFE sparse / authors / DDIM-50 / DDPM-1000 | {nfe['sparse_heun']} / "
          f"{nfe.get('authors', '-')} / 50 / 1000 |\n"
          f"| sample s sparse / authors / DDIM-50 / DDPM-1000 | {seconds['sparse_heun']:.3f} / "
          f"{authors_s} / {seconds['ddim50']:.3f} / {seconds['ddpm1000']:.3f} |\n"
          f"| sampling speed-up vs DDIM-50 | {result['sample_speedup_vs_ddim50']:.1f}x |")


def matrix_entries(matrix: dict) -> tuple[dict, bool]:
  """The sampler matrix under today's sampler names; True when the record used the old ones."""
  old = any(key.endswith("/sparse_heun_nofinal") for key in matrix)
  if not old:
    return matrix, False
  renamed = {}
  for key, value in matrix.items():
    model, _, kind = key.partition("/")
    renamed[f"{model}/{OLD_SAMPLER_NAMES.get(kind, kind)}" if kind else key] = value
  return renamed, True


def matrix_table(matrix: dict) -> str:
  """Validation PSNR (SSIM) of every trained model under every sampler the record has."""
  matrix, _ = matrix_entries(matrix)
  models = list(dict.fromkeys(k.split("/")[0] for k in matrix if "/" in k))
  kinds = [k for k in SAMPLERS if any(f"{m}/{k}" in matrix for m in models)]
  lines = ["| model \\ sampler (NFE) | " + " | ".join(
               f"{SAMPLER_LABELS[k]} ({SAMPLER_NFE[k]})" for k in kinds) + " |",
           "|---|" + "---|" * len(kinds)]
  for m in models:
    cells = [f"{matrix[f'{m}/{k}']['psnr']:.2f} ({matrix[f'{m}/{k}']['ssim']:.3f})"
             if f"{m}/{k}" in matrix else "-" for k in kinds]
    lines.append(f"| {m}-trained | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def curves_table(curves: dict) -> str:
  """Validation PSNR / SSIM and training seconds of both runs at every evaluated step."""
  names = list(curves)
  by_step = {name: {p["step"]: p for p in pts} for name, pts in curves.items()}
  steps = sorted({p["step"] for pts in curves.values() for p in pts})
  lines = ["| step | " + " | ".join(f"{n} PSNR (dB) | {n} SSIM | {n} train s" for n in names)
           + " |", "|---:|" + "---:|---:|---:|" * len(names)]
  for step in steps:
    cells = []
    for n in names:
      p = by_step[n].get(step)
      cells += (["-"] * 3 if p is None else
                [f"{p['psnr']:.2f}", f"{p['ssim']:.4f}", f"{p['train_seconds']:.1f}"])
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def report(result: dict, command: str | None = None) -> str:
  """The results page of one run (OUT/sparse_speedup.json's content) as markdown.

  `command` names the command that made the record when the record does not (older records).
  """
  setup = result["setup"]
  command = result.get("command") or command or "not recorded"
  matrix, old_names = matrix_entries(result["sampler_matrix"])
  inp = matrix.get("input")
  parts = [
      f"# Sparse voxel-space diffusion: training and sampling speed-up ({setup['task']})",
      f"Command: `{command}`; machine: {setup.get('device', 'not recorded')}.",
      "Two runs of the same network, loss and optimiser on the same data stream: sparse trains "
      "on the 6 levels {0, 199, ..., 999} and samples with Heun-DDIM over them; dense trains on "
      f"all 1000 levels and samples with DDIM-50. Each: {setup['steps']} steps, batch "
      f"{setup['batch']}, {setup['crop']}^3 crops, U-Net width {setup['width']}, lr "
      f"{setup['lr']:g}; every {setup['eval_every']} steps both sample the same "
      f"{setup['val_crops']} held-out validation crops with their EMA weights. PSNR/SSIM in "
      "network units over whole crops, data range 2 (for CT a 2000 HU window). Training seconds "
      "leave out validation and compilation; sampling seconds are warm, for a batch of "
      f"{setup['timing_batch']} crops, timed in the same run.",
      summary_table(result),
      f"Sampling speed-up vs DDPM-1000 (ancestral, 1000 evaluations): "
      f"{result['sample_speedup_vs_ddpm1000']:.0f}x. XLA's compiled FLOPs per train step (sparse "
      f"run): {setup.get('train_step_gflops', 0):.2f} GFLOPs.",
      "## Every trained model under every sampler",
      "Validation PSNR in dB (SSIM) on the same crops; NFE: network evaluations per volume.",
      matrix_table(matrix)]
  if inp is not None:
    parts.append(f"The input itself scores {inp['psnr']:.2f} dB (SSIM {inp['ssim']:.3f}) on "
                 "these crops.")
  if old_names:
    parts.append("This record names the samplers as the script did before the authors' sampler "
                 "was added: its `sparse_heun_nofinal` is the sparse Heun column here and its "
                 "`sparse_heun` the column with the extra x0 evaluation at t=0.")
  parts += ["## Validation curves", curves_table(result["curves"])]
  return "\n\n".join(parts) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = sc.ensure_dir(pathlib.Path(args.out))
  store = experiment.task_store(out, args.task, args.source)
  runs, curves = {}, {}
  for name, dense in (("sparse", False), ("dense", True)):
    c = make_config(args, store, dense)
    if name == "sparse":
      val = sc.validation_crops(c, args.val_crops)
    print(f"[{name}] training {args.steps} steps on {args.task} ({sc.device_name()})", flush=True)
    runs[name] = sc.Run(c, str(out / "runs" / name))
    curves[name] = runs[name].curve(args.steps, args.eval_every, val)
  dense_final = curves["dense"][-1]["psnr"]
  hit = reach(curves["sparse"], dense_final)
  dense_steps, dense_secs = curves["dense"][-1]["step"], curves["dense"][-1]["train_seconds"]

  # Sampling cost: the same validation crops, warm timings in this one run.
  sparse_run, dense_run = runs["sparse"], runs["dense"]
  dense_method = dense_run.method
  params_d, params_s = dense_run.params, sparse_run.params
  cond = jnp.asarray(val["cond"][:args.ddpm_crops])
  key = jax.random.PRNGKey(0)
  diff = dense_method.diffusion

  def ddim(steps, eta):
    def fn(p, y):
      z_T = jax.random.normal(key, y.shape[:4] + (1,), y.dtype)
      den = lambda z, t: dense_method._apply(p, z, y, t)  # pylint: disable=protected-access
      return diff.ddim_sample(den, z_T, steps, key, eta=eta)
    return jax.jit(fn)

  seconds = {
      "sparse_heun": sc.timed(jax.jit(sparse_run.method.sample), params_s, cond, key),
      "authors": sc.timed(make_sampler(sparse_run.method, "authors", key), params_s, cond),
      "ddim50": sc.timed(ddim(50, 0.0), params_d, cond),
      "ddpm1000": sc.timed(ddim(1000, 1.0), params_d, cond),
  }
  nfe = {"sparse_heun": sparse_run.method.nfe, "authors": SAMPLER_NFE["authors"], "ddim50": 50,
         "ddpm1000": 1000}
  matrix = sampler_matrix(runs, val, key)
  result = {
      "steps_speedup": (dense_steps / hit["step"]) if hit else None,
      "time_speedup": (dense_secs / hit["train_seconds"]) if hit else None,
      "sample_speedup_vs_ddim50": seconds["ddim50"] / seconds["sparse_heun"],
      "sample_speedup_vs_ddpm1000": seconds["ddpm1000"] / seconds["sparse_heun"],
      "nfe": nfe,
      "sample_seconds": seconds,
      "dense_final_psnr": dense_final,
      "sparse_final_psnr": curves["sparse"][-1]["psnr"],
      "sparse_reached_at": hit,
      "sampler_matrix": matrix,
      "curves": curves,
      "setup": {"task": args.task, "steps": args.steps, "eval_every": args.eval_every,
                "crop": args.crop, "width": args.width, "batch": args.batch, "lr": args.lr,
                "val_crops": args.val_crops, "timing_batch": args.ddpm_crops,
                "device": sc.device_name(),
                "train_step_gflops": sparse_run.cost.get("flops", 0) / 1e9},
      "command": command_line(argv),
  }
  sc.write_json(out / "sparse_speedup.json", result)
  plot(out / "sparse_speedup.png", curves, dense_final)
  fileio.write_text_atomic(str(out / "sparse_speedup.md"), report(result))
  print(f"\n{summary_table(result)}\ndevice: {sc.device_name()}")
  print("\nvalidation PSNR / SSIM of each trained model under each sampler:")
  for k, v in matrix.items():
    print(f"  {k:32s} {v['psnr']:6.2f} dB  {v['ssim']:.4f}  NFE {v.get('nfe', '-')}")
  return result


if __name__ == "__main__":
  main()
