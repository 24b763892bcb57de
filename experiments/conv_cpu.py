"""How fast the CPU recipes train with each convolution implementation: XLA's 3D convolution
against the same convolution with its depth taps folded into channels (one 2D convolution;
jaxvol.models.layers.folded_conv, the CPU default).

  python experiments/conv_cpu.py --out DIR [--tasks pet_denoise,mri_t1_t2]
      [--methods ppdm,full3d,regression,autoencoder] [--steps 5]

For each task and method, the train step of its CPU recipe (the `cpu,heldout` config that
experiments/learned_vs_classical.py trains; `autoencoder` is latent diffusion's first stage) is
compiled under both implementations from the same state and batch (the task's store; the state
of `method.init`). Each timed round runs one step of each, alternating, so that both see the
same machine load; the table gives the median seconds per step, their ratio, the compile
seconds and XLA's compiled temporary bytes of each. Both steps' losses and gradient norms are
recorded: the implementations are the same sum in another float order, so they agree to float
rounding. Speed is a ratio measured in one run; absolute times are this CPU's.

Writes DIR/conv_cpu.json and DIR/conv_cpu.md (page: experiments/results_pages.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

import learned_vs_classical as lvc  # a sibling script (`python experiments/NAME.py` finds it)
from jaxvol import experiment
from jaxvol import fileio

TASKS = ("pet_denoise", "mri_t1_t2")
METHODS = ("ppdm", "full3d", "regression", "autoencoder")
IMPLEMENTATIONS = ("xla", "folded")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each per round)")
  p.add_argument("--source", default=None, help="the shared volumes (default ../shared/data)")
  args = p.parse_args(argv)
  args.tasks = experiment.str_list(args.tasks)
  args.methods = experiment.str_list(args.methods)
  if args.steps < 1:
    p.error("--steps must be at least 1")
  return args


def recipe(task: str, method: str, store: str):
  """The run config learned_vs_classical trains for (task, method), seed 0."""
  args = lvc.parse_args(["--out", "-", "--tasks", task])
  return lvc.recipe(task, method, store, 0, args)


def compiled_step(config, impl: str, workdir: str):
  """(compiled train step, the loop's setup, compile seconds, temp bytes) under `impl`."""
  from jaxvol.models import layers  # pylint: disable=g-import-not-at-top
  from jaxvol.parallel import cost as cost_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  with layers.using_conv(impl):
    parts = loop.build_everything(config, workdir, check=False)
    t0 = time.perf_counter()
    compiled, _ = loop.compile_step(parts, config)
    seconds = time.perf_counter() - t0
  return compiled, parts, seconds, int(cost_lib.compiled_cost(compiled)["temp_bytes"])


def measure(task: str, method: str, store: str, rounds: int, scratch: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jaxvol.train import state as state_lib  # pylint: disable=g-import-not-at-top
  config = recipe(task, method, store)
  steps, first = {}, {}
  for impl in IMPLEMENTATIONS:
    steps[impl] = compiled_step(config, impl, os.path.join(scratch, f"{task}_{method}_{impl}"))
  parts = steps["xla"][1]
  # One state and one batch for both: the method's own initialisation, a random batch of the
  # recipe's shapes (speed does not depend on the values).
  state0 = state_lib.create_state(parts.method, parts.optimizer, jax.random.PRNGKey(0),
                                  parts.example, parts.state_sharding)
  batch = {k: jnp.asarray(np.random.default_rng(0).random(v.shape).astype(v.dtype))
           for k, v in parts.example.items()}
  step_rng = jnp.zeros((2,), jnp.uint32)
  states = {impl: jax.tree.map(jnp.copy, state0) for impl in IMPLEMENTATIONS}
  times = {impl: [] for impl in IMPLEMENTATIONS}
  for r in range(rounds + 1):  # round 0 warms up (first-run allocations), untimed
    for impl in IMPLEMENTATIONS:
      t0 = time.perf_counter()
      states[impl], metrics = steps[impl][0](states[impl], batch, step_rng)
      jax.block_until_ready(states[impl])
      if r == 0:
        first[impl] = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
      else:
        times[impl].append(time.perf_counter() - t0)
  rec = {"task": task, "method": method, "rounds": rounds,
         "crop": list(config.data.crop_size), "batch": int(config.data.batch_size)}
  for impl in IMPLEMENTATIONS:
    rec[impl] = {"step_seconds": statistics.median(times[impl]), "compile_seconds": steps[impl][2],
                 "temp_bytes": steps[impl][3], **first[impl]}
  rec["speedup"] = rec["xla"]["step_seconds"] / rec["folded"]["step_seconds"]
  rec["loss_rel_diff"] = abs(rec["xla"]["loss"] - rec["folded"]["loss"]) / max(
      abs(rec["xla"]["loss"]), 1e-12)
  return rec


def report(data: dict) -> str:
  lines = ["# Convolutions on the CPU: XLA's 3D convolution against the folded 2D one", "",
           f"Command: `{data['command']}`; machine: {data['machine']}.", "",
           "Train steps of the CPU recipes (`cpu,heldout`, seed 0), the same state and batch under "
           "both implementations, timed alternately; median of the timed rounds. Temporary "
           "bytes: XLA's compiled memory analysis on this CPU. Loss: the first step's, relative "
           "difference between the two.", "",
           "| task | method | crop x batch | XLA 3D (s/step) | folded (s/step) | speed-up | "
           "compile XLA / folded (s) | temp XLA / folded (MiB) | loss rel. diff |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in data["records"]:
    x, f = r["xla"], r["folded"]
    lines.append(
        f"| {r['task']} | {r['method']} | {'x'.join(map(str, r['crop']))} x {r['batch']} | "
        f"{x['step_seconds']:.3f} | {f['step_seconds']:.3f} | {r['speedup']:.2f}x | "
        f"{x['compile_seconds']:.0f} / {f['compile_seconds']:.0f} | "
        f"{x['temp_bytes'] / 2**20:.0f} / {f['temp_bytes'] / 2**20:.0f} | "
        f"{r['loss_rel_diff']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = "python experiments/conv_cpu.py " + " ".join(
      a if a != args.out else "DIR" for a in (argv if argv is not None else sys.argv[1:]))
  import jax  # pylint: disable=g-import-not-at-top
  data = {"command": command, "records": [],
          "machine": f"{os.cpu_count()} CPU cores ({jax.devices()[0].platform}), jax {jax.__version__}"}
  for task in args.tasks:
    store = experiment.task_store(out, task, args.source)
    for method in args.methods:
      rec = measure(task, method, store, args.steps, str(out / "scratch"))
      data["records"].append(rec)
      print(f"{task} {method}: XLA {rec['xla']['step_seconds']:.3f} s/step, folded "
            f"{rec['folded']['step_seconds']:.3f} s/step ({rec['speedup']:.2f}x)", flush=True)
      fileio.write_json_atomic(str(out / "conv_cpu.json"), data)
      fileio.write_text_atomic(str(out / "conv_cpu.md"), report(data))
  print(report(data))
  return data


if __name__ == "__main__":
  main()
