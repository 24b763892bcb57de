"""Flow matching against Gaussian diffusion at equal network evaluations (NFE), on the CPU tasks.

Usage::

  python experiments/flow_nfe.py --out DIR [--tasks pet_denoise,mri_t1_t2] [--seeds 0]
      [--steps 2000] [--validate-every 500] [--patience 3] [--val-nfe 8] [--nfe 1,2,4,8,16]
      [--objectives diffusion,flow,diffusion-v] [--gen-steps 1000] [--gen-samples 8]
      [--gen-local-width W] [--source ../shared/data] [--report-only]

For every task and seed, the same full-resolution 3D U-Net (full3d, the task's `cpu,heldout`
recipe of experiments/learned_vs_classical.py: same crop, width, batch, learning rate, steps,
data stream and seed) is trained twice:
  diffusion  the DDPM of config.diffusion (1000 levels, the task's parameterisation), sampled
             with deterministic DDIM (eta 0): N steps = N network evaluations;
  flow       straight-line flow matching (jaxvol.diffusion.flow; t = 0 noise, t = 1 data,
             velocity head), sampled with Euler (N steps = N evaluations) and Heun (N/2 steps = N
             evaluations: it corrects every step).
`--objectives` adds the same DDPM with another parameterisation of the network's output
(diffusion-v, diffusion-x0): the recipe's eps prediction is known to degrade at few DDIM steps, so
a v- or x0-predicting DDPM is the fairer Gaussian arm at low NFE.
All train with validation every K steps at the same NFE (--val-nfe) on the task's validation set
(disjoint from training and test) and keep their best checkpoint by validation PSNR. That checkpoint
is then scored on the WHOLE held-out region of the test split at every NFE of --nfe, through the
library's one inference path (jaxvol.eval.evaluate, windows of the training crop), beside the tuned
classical references (training region only; jaxvol.eval.references) and the input.

Generation (`--tasks ct_gen`): PRDiT's `cpu` variant on the one-volume ct_gen store, both stages
trained --gen-steps steps each under each objective (PRDiT's trigonometric diffusion with its
Euler probability-flow sampler, N steps = N NFE; PRDiT-FM's flow matching with Euler and Heun), the
last checkpoints (the store has no validation volumes), then --gen-samples volumes drawn at each
NFE and scored by jaxvol.eval.generate's metrics against as many real crops: FD and MMD on
randomly initialised MedicalNet features (NOT an FID) and MS-SSIM diversity. One training volume:
these compare the two objectives' samplers on the same data, not generative models of a population.

Reported: PSNR/SSIM per NFE for each objective and sampler; the fewest NFE at which each reaches
(a) the best classical reference's PSNR and (b) within 0.25 dB of its own best; and training steps
to a given validation quality (the first validated step at which each objective reaches the lower
of the two objectives' best validation PSNRs). Everything resumes (training from checkpoints,
finished evaluations from DIR/flow_nfe.json, rewritten atomically after each).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import time

import numpy as np

import learned_vs_classical as lvc  # a sibling script (`python experiments/NAME.py` finds it)
from jaxvol import experiment

TASKS = ("pet_denoise", "mri_t1_t2", "demo", "ct_gen")
GEN_TASK = "ct_gen"
OBJECTIVES = ("diffusion", "flow")
# --objectives for the conditional tasks: also the DDPM with another parameterisation of its
# network's output than the recipe's (eps), e.g. diffusion-v, diffusion-x0.
PARAMETERIZATIONS = ("eps", "x0", "v")


def base_objective(name: str) -> str:
  """"diffusion" of "diffusion-v"; "flow" of "flow"."""
  return name.split("-", 1)[0]
SAMPLERS = {"diffusion": ("ddim",), "flow": ("euler", "heun")}
GEN_SAMPLERS = {"diffusion": ("euler",), "flow": ("euler", "heun")}
OWN_BEST_MARGIN_DB = 0.25
log = logging.getLogger("jaxvol")


def run_config(task: str, objective: str, store: str, seed: int, args: argparse.Namespace):
  """The task's full3d CPU recipe under `objective`, validated at --val-nfe evaluations."""
  c = lvc.recipe(task, "full3d", store, seed, args)
  c.diffusion.objective = base_objective(objective)
  if "-" in objective:
    c.diffusion.parameterization = objective.split("-", 1)[1]
  c.diffusion.eta = 0.0
  c.diffusion.sample_steps = args.val_nfe
  c.flow.solver, c.flow.sample_steps = "euler", args.val_nfe
  return c


def sampler_config(c, objective: str, sampler: str, nfe: int):
  """c sampling with `sampler` at `nfe` network evaluations; None where it cannot (Heun, odd)."""
  c = c.copy_and_resolve_references()
  if base_objective(objective) == "diffusion":
    c.diffusion.sample_steps = nfe
    return c
  return _flow_sampler(c, sampler, nfe)


def _flow_sampler(c, sampler: str, nfe: int):
  """c (a copy) solving the flow ODE with `sampler` in `nfe` evaluations (Euler: nfe steps, Heun:
  nfe / 2); None for Heun at an odd NFE."""
  if sampler == "heun" and nfe % 2:
    return None
  c.flow.solver, c.flow.sample_steps = sampler, nfe if sampler == "euler" else nfe // 2
  return c


def train_one(task: str, objective: str, seed: int, store: str, out: pathlib.Path,
              args: argparse.Namespace):
  """Trains (or resumes) one run; (config, workdir, training record)."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  c = run_config(task, objective, store, seed, args)
  workdir = out / "runs" / task / objective / f"seed{seed}"
  workdir.mkdir(parents=True, exist_ok=True)
  result = experiment.train(c, workdir, validate=evaluate.validator(c, str(workdir)))
  progress = loop.read_progress(str(workdir))
  return c, workdir, {"steps": result["step"], "stopped": result.get("stopped"),
                      "parameterization": c.diffusion.parameterization
                      if base_objective(objective) == "diffusion"
                      else "velocity",
                      "train_seconds": progress[-1]["seconds"] if progress else None,
                      "validation": loop.read_validation(str(workdir))}


def score(c, workdir: pathlib.Path, name: str, task_dir: pathlib.Path, references: bool) -> dict:
  """evaluate() of the selected checkpoint into WORKDIR/name; the summary's metrics."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  c = c.copy_and_resolve_references()
  c.eval.references = "auto" if references else ""
  t0 = time.time()
  with (lvc.task_references(task_dir, workdir) if references else contextlib.nullcontext()):
    summary = evaluate.evaluate(c, str(workdir), out_name=name)
  m = summary["metrics"]
  return {"metrics": {k: m[k] for k in ("psnr", "ssim", "hfen")},
          "best_step": summary["checkpoint_step"], "checkpoint": summary["checkpoint"],
          "region": summary["region"], "split": summary["split"], "mask": summary["mask"],
          "data_range": summary["data_range"], "best_reference": summary.get("best_reference"),
          "references": {n: e["params"] for n, e in summary.get("references", {}).items()},
          "seconds_per_volume": summary["seconds_per_volume"], "wall_seconds": time.time() - t0}


def gen_config(objective: str, stage: int, store: str, seed: int, args: argparse.Namespace,
               stage1: str = ""):
  """PRDiT's `cpu` variant (stage 1 or 2) under `objective`, --gen-steps steps."""
  variant = ",".join(["cpu"] + (["stage1"] if stage == 1 else [])
                     + (["flow"] if objective == "flow" else []))
  c = experiment.packaged_config("prdit_ct_gen", variant)
  c.seed, c.data.store, c.data.num_workers = seed, store, 0
  c.train.steps, c.train.time_limit_minutes = args.gen_steps, 0.0
  c.train.checkpoint_every = max(1, args.gen_steps // 2)
  c.prdit.stage1_workdir = stage1
  if args.gen_local_width >= 0:
    c.prdit.local_width = args.gen_local_width
  c.sample.num, c.sample.metrics = args.gen_samples, True
  return c


def gen_variant(args: argparse.Namespace) -> str:
  """The name of a generation run's non-default network ("" for the `cpu` variant's)."""
  return f"local_width={args.gen_local_width}" if args.gen_local_width >= 0 else ""


RECON_TIMES = (0.1, 0.5, 0.9)


def reconstruction_errors(c, workdir: pathlib.Path, crops: int = 4) -> dict:
  """Flow only: PRDiT-FM's one-evaluation estimate x_t + (1 - t) v of `crops` seeded training
  crops at each t of RECON_TIMES, its MSE (network units), beside the crops' variance (the MSE of
  predicting their mean, which any useful estimate beats)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  method = methods.build(c, jax.devices()[0].platform)
  params, _ = volumes.load_params(c, str(workdir))
  store = store_lib.Store(c.data.store)
  crop = pipeline.CropAndFlip(store, {"target": c.data.target}, tuple(c.data.crop_size),
                              flips=False, region=c.data.train_region or None)
  subject = store.subjects(c.data.train_split)[0]["id"]
  xs = [jnp.asarray(crop({"subject": subject}, np.random.default_rng(i))["target"][None])
        for i in range(crops)]
  run = jax.jit(lambda p, x, k, t: jnp.mean(jnp.square(method.reconstruct(p, x, k, t)[0] - x)),
                static_argnums=3)
  out = {"crops": crops, "data_variance": float(np.mean([float(jnp.var(x)) for x in xs]))}
  for t in RECON_TIMES:
    out[f"mse_t{t}"] = float(np.mean([float(run(params, x, jax.random.PRNGKey(i), t))
                                      for i, x in enumerate(xs)]))
  return out


def gen_sampler_config(c, objective: str, sampler: str, nfe: int):
  """c drawing with `sampler` at `nfe` network evaluations; None where it cannot (Heun at an odd
  NFE; PRDiT's diffusion at an NFE that does not divide its T levels, the authors' grid)."""
  c = c.copy_and_resolve_references()
  if objective == "diffusion":
    if c.prdit.num_steps % nfe:
      return None
    c.prdit.sampler, c.prdit.sample_steps = "euler", nfe
    return c
  return _flow_sampler(c, sampler, nfe)


def train_gen(objective: str, seed: int, store: str, out: pathlib.Path, args: argparse.Namespace):
  """Both PRDiT stages under `objective` (resumed from their checkpoints); (stage-2 config,
  stage-2 workdir, training record)."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  variant = gen_variant(args)
  root = out / "runs" / GEN_TASK / (objective + (f"-{variant}" if variant else "")) / f"seed{seed}"
  record = {"train_seconds": 0.0, "parameterization": "velocity" if objective == "flow"
            else "x0 and eps (PRDiT's two heads)"}
  c = None
  for stage in (1, 2):
    workdir = root / f"stage{stage}"
    workdir.mkdir(parents=True, exist_ok=True)
    c = gen_config(objective, stage, store, seed, args, str(root / "stage1") if stage == 2 else "")
    result = experiment.train(c, workdir)
    progress = loop.read_progress(str(workdir))
    record[f"stage{stage}_steps"] = result["step"]
    record[f"stage{stage}_final_loss"] = progress[-1].get("loss") if progress else None
    record["train_seconds"] += progress[-1]["seconds"] if progress else 0.0
  record["steps"] = record["stage2_steps"]
  if objective == "flow":
    record["reconstruction"] = reconstruction_errors(c, root / "stage2")
  return c, root / "stage2", record


def draw(c, workdir: pathlib.Path) -> dict:
  from jaxvol.eval import generate  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  result = generate.generate(c, str(workdir))
  m = result["metrics"]
  keep = ("fid", "fid_label", "mmd", "mmd_label", "ms_ssim_diversity", "ms_ssim_diversity_real",
          "n_real", "n_fake", "feature_network", "protocol", "real", "note", "checkpoint_step")
  return {"gen": {k: m.get(k) for k in keep},
          "best_step": m.get("checkpoint_step"),
          "seconds_per_volume": result["samples"]["seconds_per_volume"],
          "wall_seconds": time.time() - t0}


def gen_markdown(rows: list[dict], runs: dict) -> list[str]:
  first = rows[0]["gen"]
  nfes = sorted({r["nfe"] for r in rows})
  seeds = sorted({r["seed"] for r in rows})
  steps = sorted({r["settings"]["gen_steps"] for r in rows})
  lines = [f"## {GEN_TASK} (PRDiT `cpu`, generation)", "",
           f"Each objective: both stages trained {', '.join(map(str, steps))} steps, the last "
           f"checkpoint; {first['n_fake']} draws per NFE against {first['real']}; features: "
           f"{first['feature_network']} (protocol {first['protocol']!r}). "
           + (f"{first['note'][0].upper()}{first['note'][1:]}." if first.get("note") else "")
           + f" Seeds {seeds}; lower FD/MMD is closer to the real "
           "crops; MS-SSIM diversity near the real crops' is better."
           + (" [local_width=W]: the local denoiser's width W (0: the raw 12^3 window, the "
              "paper's layout) instead of the `cpu` variant's 64."
              if any(r.get("variant") for r in rows) else ""), "",
           "| objective [network], sampler | quantity | " + " | ".join(f"NFE {n}" for n in nfes)
           + " |", "|---|---|" + "---:|" * len(nfes)]
  variants = list(dict.fromkeys(r.get("variant", "") for r in rows))
  for obj in OBJECTIVES:
    for variant in variants:
      for smp in GEN_SAMPLERS[obj]:
        rs = [r for r in rows if r["objective"] == obj and r["sampler"] == smp
              and r.get("variant", "") == variant]
        if not rs:
          continue
        name = obj + (f" [{variant}]" if variant else "")
        for key, label, spec in (("fid", first["fid_label"], ".3f"),
                                 ("mmd", first["mmd_label"], ".3f"),
                                 ("ms_ssim_diversity", "MS-SSIM diversity", ".3f")):
          cells = []
          for n in nfes:
            at = [r["gen"][key] for r in rs if r["nfe"] == n and r["gen"].get(key) is not None]
            cells.append(lvc._mean_std(at, spec) if at else "-")
          lines.append(f"| {name}, {smp} | {label} | " + " | ".join(cells) + " |")
  real = [r["gen"]["ms_ssim_diversity_real"] for r in rows
          if r["gen"].get("ms_ssim_diversity_real") is not None]
  if real:
    lines += ["", f"MS-SSIM among the real crops: {real[0]:.3f}."]
  lines += ["", "Training, and for flow PRDiT-FM's one-evaluation estimate x_t + (1 - t) v of 4 "
            "training crops (MSE in network units; predicting the crops' mean scores their "
            "variance, the last column):", "",
            "| objective [network] | seed | stage-1 loss (last log) | stage-2 loss (last log) | "
            "training min (both stages) | " + " | ".join(f"estimate MSE at t = {t}"
                                                         for t in RECON_TIMES)
            + " | crops' variance |", "|---|---|---:|---:|---:|" + "---:|" * (len(RECON_TIMES) + 1)]
  for key, tr in runs.items():
    if not key.startswith(GEN_TASK + "/"):
      continue
    name, seed = key[len(GEN_TASK) + 1:].rsplit("/", 1)
    loss = lambda k, tr=tr: "-" if tr.get(k) is None else f"{tr[k]:.4f}"
    rec = tr.get("reconstruction") or {}
    cells = [f"{rec[f'mse_t{t}']:.4f}" if f"mse_t{t}" in rec else "-" for t in RECON_TIMES]
    lines.append(f"| {name} ({tr['parameterization']}) | {seed} | {loss('stage1_final_loss')} | "
                 f"{loss('stage2_final_loss')} | {tr['train_seconds'] / 60:.1f} | "
                 + " | ".join(cells) + f" | {rec['data_variance']:.4f} |" if rec else
                 f"| {name} ({tr['parameterization']}) | {seed} | {loss('stage1_final_loss')} | "
                 f"{loss('stage2_final_loss')} | {tr['train_seconds'] / 60:.1f} | "
                 + " | ".join(cells) + " | - |")
  lines += ["", "The two objectives' losses are on different scales (flow: velocity MSE; "
            "diffusion: x0 + eps MSE) and are not comparable.", ""]
  for variant in variants:
    st = next(r["settings"] for r in rows if r.get("variant", "") == variant)
    extra = f" --gen-local-width {st['gen_local_width']}" if variant else ""
    lines.append(f"Command{f' [{variant}]' if variant else ''}: `python experiments/flow_nfe.py "
                 f"--out DIR --tasks {GEN_TASK} --seeds {','.join(str(s) for s in seeds)} "
                 f"--gen-steps {st['gen_steps']} --gen-samples {st['gen_samples']}{extra} --nfe "
                 f"{','.join(str(n) for n in nfes)}`")
  lines.append("")
  return lines


def settings_of(args: argparse.Namespace, task: str) -> dict:
  """The settings a task's records depend on (a rerun with others trains and scores anew)."""
  keys = (("gen_steps", "gen_samples", "gen_local_width") if task == GEN_TASK
          else ("steps", "validate_every", "patience", "val_nfe"))
  return {k: getattr(args, k) for k in keys}


def _key(r: dict) -> tuple:
  return r["task"], r["objective"], r.get("variant", ""), r["sampler"], r["nfe"], r["seed"]


def run_key(task: str, objective: str, variant: str, seed: int) -> str:
  """The key of a training run in the record's "runs"."""
  return f"{task}/{objective}" + (f" [{variant}]" if variant else "") + f"/{seed}"


def first_nfe(rows: list[dict], level: float) -> int | None:
  """The fewest NFE whose PSNR reaches `level` (rows of one objective, sampler and seed)."""
  hits = [r["nfe"] for r in rows if r["metrics"]["psnr"]["model"] >= level]
  return min(hits) if hits else None


def steps_to(validation: list[dict], level: float) -> int | None:
  hits = [v["step"] for v in validation if v.get("psnr", -np.inf) >= level]
  return min(hits) if hits else None


def markdown(records: list[dict], runs: dict, machine: str = "") -> str:
  """The page: one block per task, from the records alone (their settings included)."""
  lines = ["# Flow matching against Gaussian diffusion at equal NFE", "",
           "Conditional tasks: the same full3d U-Net, recipe, data stream and seed per task, trained once per "
           "objective; each objective's checkpoint chosen by validation PSNR at a fixed number "
           "of network evaluations (validation set disjoint from training and test), "
           "then scored on the WHOLE held-out region of the test split at each NFE. DDIM (eta 0): "
           "N steps = N NFE; Euler: N steps = N NFE; Heun: N/2 steps = N NFE. Metrics in original "
           "units inside the target's body mask, PSNR/SSIM over the target preset's range; "
           "classical references tuned on the training region only. Mean ± std over the seeds "
           "listed.", ""]
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    if task == GEN_TASK:
      lines += gen_markdown(rows, runs)
      continue
    first = rows[0]
    st = first["settings"]
    seeds = sorted({r["seed"] for r in rows})
    lines += [f"## {task}", "", f"Scored: split {first['split']!r}, region {first['region']}, "
              f"mask {first['mask']}, data range {first['data_range']}; seeds {seeds}.", ""]
    ref_rows = [r for r in rows if r.get("references")]
    best_ref, best_ref_psnr = None, None
    if ref_rows:
      m = ref_rows[0]["metrics"]
      names = [n for n in m["psnr"] if n not in ("model",)]
      refs = [n for n in names if n not in ("input", "train_mean")]
      best_ref = max(refs, key=lambda n: m["psnr"][n]) if refs else None
      best_ref_psnr = m["psnr"][best_ref] if best_ref else None
      lines += ["| reference (no training) | PSNR (dB) | SSIM |", "|---|---:|---:|"]
      for n in names:
        label = lvc.prediction_label(n, ref_rows[0]["references"])
        lines.append(f"| {label}{' **(best)**' if n == best_ref else ''} | "
                     f"{m['psnr'][n]:.2f} | {m['ssim'][n]:.4f} |")
      lines.append("")
    nfes = sorted({r["nfe"] for r in rows})
    lines += ["PSNR (dB) / SSIM of the validation-selected checkpoint per NFE:", "",
              "| objective, sampler | selected step | " + " | ".join(f"NFE {n}" for n in nfes)
              + " |", "|---|---|" + "---:|" * len(nfes)]
    summary = []
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    for obj in objectives:
      for smp in SAMPLERS[base_objective(obj)]:
        rs = [r for r in rows if r["objective"] == obj and r["sampler"] == smp]
        if not rs:
          continue
        cells = []
        for n in nfes:
          at = [r for r in rs if r["nfe"] == n]
          cells.append("-" if not at else
                       f"{lvc._mean_std([r['metrics']['psnr']['model'] for r in at])} / "
                       f"{lvc._mean_std([r['metrics']['ssim']['model'] for r in at], '.3f')}")
        steps = ", ".join(str(s) for s in sorted({r["best_step"] for r in rs}))
        param = runs.get(run_key(task, obj, "", rs[0]['seed']), {}).get("parameterization", "?")
        lines.append(f"| {obj} ({param} head), {smp} | {steps} | " + " | ".join(cells) + " |")
        for seed in seeds:
          own = [r for r in rs if r["seed"] == seed]
          if not own:
            continue
          best = max(r["metrics"]["psnr"]["model"] for r in own)
          summary.append((obj, smp, seed, first_nfe(own, best - OWN_BEST_MARGIN_DB), best,
                          first_nfe(own, best_ref_psnr) if best_ref_psnr is not None else None))
    lines += ["", f"Fewest NFE to a quality (per seed): within {OWN_BEST_MARGIN_DB} dB of the "
              "sampler's own best, and reaching the best classical reference"
              + (f" ({best_ref}, {best_ref_psnr:.2f} dB)" if best_ref else "") + ":", "",
              "| objective, sampler | seed | best PSNR over NFE | NFE to own best - "
              f"{OWN_BEST_MARGIN_DB} dB | NFE to the best reference |", "|---|---|---:|---:|---:|"]
    for obj, smp, seed, n_own, best, n_ref in summary:
      lines.append(f"| {obj}, {smp} | {seed} | {best:.2f} | {n_own} | "
                   f"{'not reached' if n_ref is None else n_ref} |")
    lines += ["", f"Training steps to a validation quality (validation PSNR at {st['val_nfe']} "
              "NFE, validated every "
              f"{st['validate_every']} steps; level = the lowest of the objectives' best; training "
              "minutes as the loop measured them, on a machine other jobs may have shared):", "",
              "| seed | level (dB) | " + " | ".join(f"{o}: steps" for o in objectives)
              + " | " + " | ".join(f"{o}: best val (step)" for o in objectives)
              + " | " + " | ".join(f"{o}: training min" for o in objectives) + " |",
              "|---|---:|" + "---:|" * (3 * len(objectives))]
    for seed in seeds:
      tr = {o: runs.get(run_key(task, o, "", seed)) for o in objectives}
      if not all(tr.values()):
        continue
      bests = {o: max(tr[o]["validation"], key=lambda v: v.get("psnr", -np.inf))
               for o in objectives}
      level = min(b["psnr"] for b in bests.values())
      lines.append(f"| {seed} | {level:.2f} | "
                   + " | ".join(str(steps_to(tr[o]["validation"], level)) for o in objectives)
                   + " | " + " | ".join(f"{bests[o]['psnr']:.2f} ({bests[o]['step']})"
                                        for o in objectives)
                   + " | " + " | ".join(f"{tr[o]['train_seconds'] / 60:.1f}" if
                                        tr[o]["train_seconds"] else "-" for o in objectives)
                   + " |")
    lines += ["", f"Command: `python experiments/flow_nfe.py --out DIR --tasks {task} "
              f"--seeds {','.join(str(s) for s in seeds)} --steps {st['steps']} --validate-every "
              f"{st['validate_every']} --patience {st['patience']} --val-nfe {st['val_nfe']} --nfe "
              f"{','.join(str(n) for n in nfes)} --objectives {','.join(objectives)}`", ""]
  # Every block's command goes to the page's head line, with the machine.
  commands = [line.split(": ", 1)[1] for line in lines if line.startswith("Command")]
  body = [line for line in lines if not line.startswith("Command")]
  head = "Commands: " + "; ".join(commands) + f"; machine: {machine or 'not recorded'}."
  return "\n".join(body[:2] + [head, ""] + body[2:])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tasks", default="pet_denoise,mri_t1_t2")
  p.add_argument("--seeds", default="0")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--validate-every", type=int, default=500)
  p.add_argument("--patience", type=int, default=3)
  p.add_argument("--val-nfe", type=int, default=8)
  p.add_argument("--nfe", default="1,2,4,8,16")
  p.add_argument("--objectives", default=",".join(OBJECTIVES),
                 help="conditional tasks: diffusion (the recipe's eps), flow, and diffusion-P "
                      f"for a parameterisation P of {PARAMETERIZATIONS}")
  p.add_argument("--gen-steps", type=int, default=1000, help="ct_gen: steps per PRDiT stage")
  p.add_argument("--gen-samples", type=int, default=8, help="ct_gen: draws per NFE")
  p.add_argument("--gen-local-width", type=int, default=-1,
                 help="ct_gen: PRDiT's local denoiser width (0: the raw window, the paper's "
                      "layout; -1: the cpu variant's); its runs and rows are kept apart")
  p.add_argument("--source", default=None, help="the shared volumes (default ../shared/data)")
  p.add_argument("--report-only", action="store_true")
  args = p.parse_args(argv)
  args.tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in args.tasks if t not in TASKS]
  if unknown:
    p.error(f"unknown task(s) {unknown}; known: {TASKS}")
  args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  args.nfe = sorted(int(n) for n in args.nfe.split(",") if n.strip())
  args.objectives = [o for o in args.objectives.split(",") if o]
  bad = [o for o in args.objectives if o not in OBJECTIVES
         and not (base_objective(o) == "diffusion" and o.split("-", 1)[-1] in PARAMETERIZATIONS)]
  if bad or not args.objectives:
    p.error(f"unknown objective(s) {bad}: use {', '.join(OBJECTIVES)} or diffusion-P with P in "
            f"{PARAMETERIZATIONS}")
  if not args.nfe or min(args.nfe) < 1 or args.val_nfe < 1:
    p.error("--nfe and --val-nfe take positive integers")
  # the fields learned_vs_classical.recipe reads
  args.lr, args.schedule, args.set, args.tag = 0.0, "constant", [], ""
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  for noisy in ("absl", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "flow_nfe.json"
  saved = json.loads(path.read_text()) if path.exists() else {}
  records, runs = saved.get("records", []), saved.get("runs", {})
  machine = saved.get("machine") or f"{experiment.device_name()}, {os.cpu_count()} cores"

  def save():
    fileio.write_json_atomic(str(path), {"records": records, "runs": runs, "machine": machine})
    fileio.write_text_atomic(str(out / "flow_nfe.md"), markdown(records, runs, machine))

  if args.report_only:
    save()
    return records
  for task in args.tasks:
    settings = settings_of(args, task)
    store = experiment.task_store(out, task, args.source)
    task_dir = out / "runs" / task
    if task == GEN_TASK:
      for seed in args.seeds:
        for obj in OBJECTIVES:
          variant = gen_variant(args)
          c, workdir, run = train_gen(obj, seed, store, out, args)
          runs[run_key(task, obj, variant, seed)] = {**run, "settings": settings}
          save()
          for smp in GEN_SAMPLERS[obj]:
            for nfe in args.nfe:
              key = (task, obj, variant, smp, nfe, seed)
              cs = gen_sampler_config(c, obj, smp, nfe)
              if cs is None or any(_key(r) == key and r["settings"] == settings
                                   for r in records):
                continue
              rec = {"task": task, "objective": obj, "variant": variant, "sampler": smp,
                     "nfe": nfe, "seed": seed, "settings": settings, **draw(cs, workdir)}
              records = [r for r in records if _key(r) != key] + [rec]
              save()
              print(f"-- {task}/{obj}/{smp}/NFE {nfe}/seed {seed}: FD {rec['gen']['fid']:.3f}",
                    flush=True)
      continue
    for seed in args.seeds:
      for obj in args.objectives:
        c, workdir, run = train_one(task, obj, seed, store, out, args)
        runs[run_key(task, obj, "", seed)] = {**run, "settings": settings}
        save()
        with_refs = not any(r["task"] == task and r.get("references") for r in records)
        for smp in SAMPLERS[base_objective(obj)]:
          for nfe in args.nfe:
            key = (task, obj, "", smp, nfe, seed)
            done = [r for r in records if _key(r) == key and r["settings"] == settings]
            if done:
              continue
            cs = sampler_config(c, obj, smp, nfe)
            if cs is None:
              continue
            rec = {"task": task, "objective": obj, "sampler": smp, "nfe": nfe, "seed": seed,
                   "settings": settings,
                   **score(cs, workdir, f"eval_{smp}{nfe}", task_dir, with_refs)}
            with_refs = False
            records = [r for r in records if _key(r) != key] + [rec]
            save()
            print(f"-- {task}/{obj}/{smp}/NFE {nfe}/seed {seed}: "
                  f"{rec['metrics']['psnr']['model']:.2f} dB (step {rec['best_step']})",
                  flush=True)
  save()
  return records


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
