"""Ablation of sparse voxel-space diffusion: STM, parameterisation/loss, number of levels.

Usage::
  python experiments/sparse_ablation.py --out DIR [--task ct_denoise] [--steps N] [--crop S]
      [--width W] [--batch B] [--lr LR] [--val-crops V] [--variants a,b,...]

Every variant trains the task's sparse config with THE SAME budget, data stream, seed and U-Net
(only the listed switch changes) and samples the same held-out validation crops with its own
Heun-DDIM sampler over its own level set (EMA weights). PSNR/SSIM in network units, data range 2
(for CT: a 2000 HU window), over whole crops. Variants:
  full        the configs' default: the authors' U-Net layout, STM on, x0 prediction with
              velocity-space loss, f_steps = 5, Heun-DDIM (9 evaluations)
  no_stm      STM off
  eps         eps prediction, eps MSE
  v           v prediction, v MSE
  f10         f_steps = 10 (11 levels, 20 network evaluations)
  jaxvol_net  jaxvol's U-Net layout (config.model.layout = "jaxvol": scale-shift ResBlocks,
              mirrored decoder, SAME-padded STM encoder) instead of the authors' (the configs'
              default: additive time embedding, narrower decoder, zero-initialised output conv,
              STM with all its GroupNorms and unpadded convs)
  authors_sampler  the authors' sampler over their level set (sparse.sampler = "authors": 11
              evaluations, their no-op corrections and averaged 0 -> -1 ending) instead of
              Heun-DDIM (9)
Writes DIR/sparse_ablation.json (records {variant, stm, parameterization, f_steps, nfe, psnr,
ssim, train_seconds, steps, device, input_psnr, input_ssim, command}; input_* score the degraded
input itself on the same crops) and DIR/sparse_ablation.md (the results page, `report`, which
renders it from the JSON alone); the table is also printed.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys

import sparse_common as sc  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import experiment  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import fileio

VARIANTS = {
    "full": {},
    "no_stm": {"model.stm": False},
    "eps": {"diffusion.parameterization": "eps"},
    "v": {"diffusion.parameterization": "v"},
    "f10": {"sparse.f_steps": 10},
    "jaxvol_net": {"model.layout": "jaxvol"},
    "authors_sampler": {"sparse.sampler": "authors", "sparse.levels": "arange"},
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True)
  p.add_argument("--task", default="ct_denoise", choices=sorted(sc.TASK_CONFIGS))
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--crop", type=int, default=32)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--val-crops", type=int, default=4)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes")
  p.add_argument("--layout", choices=("authors", "jaxvol"), default=None,
                 help="U-Net layout (config.model.layout); default: the config's (authors)")
  p.add_argument("--source", default=None)
  return p.parse_args(argv)


def make_config(args, store: str, overrides: dict):
  c = sc.run_config(args, store)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def table(records: list[dict]) -> str:
  lines = ["| variant | network | sampler | STM | prediction / loss | levels | NFE | PSNR (dB) | SSIM "
           "| train s |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    loss = {"x0": "x0 / v-space", "eps": "eps / eps", "v": "v / v"}[r["parameterization"]]
    lines.append(f"| {r['variant']} | {r.get('layout', 'jaxvol')} | {r.get('sampler', 'jaxvol')} "
                 f"| {'on' if r['stm'] else 'off'} | {loss} | {r['f_steps'] + 1} "
                 f"| {r['nfe']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['train_seconds']:.0f} |")
  return "\n".join(lines)


def input_row(psnr: float, ssim: float) -> str:
  """The table row of the degraded input itself, scored on the same crops."""
  return f"| (degraded input) | | | | | | | {psnr:.2f} | {ssim:.4f} | |"


def command_line(argv=None) -> str:
  """The command that runs this script with `argv` (the process's own arguments when None)."""
  return " ".join(["python experiments/sparse_ablation.py",
                   shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


def report(records: list[dict], command: str | None = None, inputs: dict | None = None,
           inputs_source: str | None = None) -> str:
  """The results page of one ablation (OUT/sparse_ablation.json's records) as markdown.

  Older records name neither their command nor the input's scores: `command` and `inputs`
  ({"psnr", "ssim"} of the degraded input on the same crops, taken from `inputs_source`) stand in.
  """
  first = records[0]
  join = lambda key: ", ".join(str(v) for v in dict.fromkeys(r.get(key) for r in records))
  command = first.get("command") or command or "not recorded"
  if first.get("input_psnr") is not None:
    inputs, inputs_source = {"psnr": first["input_psnr"], "ssim": first["input_ssim"]}, None
  parts = [
      f"# Sparse diffusion ablation ({join('task')})",
      f"Command: `{command}`; machine: {join('device')}.",
      "Every variant trains the task's sparse config with the same budget "
      f"({join('steps')} steps, {join('crop')}^3 crops, U-Net width {join('width')}), data "
      "stream and seed, and samples the same held-out validation crops with its own sampler "
      "over its own level set (EMA weights); one switch changes per row. PSNR/SSIM in network "
      "units over whole crops, data range 2 (for CT a 2000 HU window); train s: training "
      "seconds (validation and compilation excluded).",
      table(records) + ("" if inputs is None else "\n" + input_row(inputs["psnr"],
                                                                    inputs["ssim"]))]
  if inputs is not None and inputs_source:
    parts.append(f"The degraded input's row is from {inputs_source}, which scored the same "
                 "validation crops (this record does not hold it).")
  return "\n\n".join(parts) + "\n"


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  out = sc.ensure_dir(pathlib.Path(args.out))
  store = experiment.task_store(out, args.task, args.source)
  names = [v for v in args.variants.split(",") if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  records, val, inp = [], None, None
  for name in names:
    c = make_config(args, store, VARIANTS[name])
    if val is None:
      val = sc.validation_crops(c, args.val_crops)
      inp = sc.crop_metrics(val["cond"][..., :1], val["target"])
    print(f"[{name}] {args.steps} steps ({sc.device_name()})", flush=True)
    run = sc.Run(c, str(out / "runs" / name))
    pts = run.curve(args.steps, args.steps, val)
    records.append({"variant": name, "stm": bool(c.model.stm), "layout": c.model.layout,
                    "sampler": c.sparse.sampler,
                    "parameterization": c.diffusion.parameterization,
                    "f_steps": int(len(run.method.timesteps) - 1), "nfe": run.method.nfe,
                    "psnr": pts[-1]["psnr"], "ssim": pts[-1]["ssim"],
                    "train_seconds": pts[-1]["train_seconds"], "steps": args.steps,
                    "task": args.task, "crop": args.crop, "width": args.width,
                    "device": sc.device_name(), "input_psnr": inp["psnr"],
                    "input_ssim": inp["ssim"], "command": command_line(argv)})
    sc.write_json(out / "sparse_ablation.json", records)
  fileio.write_text_atomic(str(out / "sparse_ablation.md"), report(records))
  print(table(records) + "\n" + input_row(inp["psnr"], inp["ssim"]))
  return records


if __name__ == "__main__":
  main()
