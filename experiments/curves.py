"""Learning curves on unseen anatomy: every method evaluated as training goes on.

Usage::

  python experiments/curves.py --out DIR [--tasks mri_t1_t2,pet_denoise,ct_denoise]
      [--methods ...] [--steps N] [--checkpoints K] [--crop S] [--width W] [--batch B] [--lr LR]
      [--samples N] [--mean-every M] [--max-box S] [--window-overlap O] [--source DIR]

Each (task, method) trains ONCE through the library's loop (jaxvol.train.loop, resuming from its
checkpoints) up to --steps, and is evaluated at K log-spaced steps (`schedule`) on the held-out
region of the task's `heldout` split through the library's one inference path
(jaxvol.eval.evaluate, in-loop windows of the training crop). Metrics in original units inside the
target's body mask, PSNR/SSIM over the target preset's range (metrics.conventions): PSNR, SSIM and
HFEN against training steps and training wall-clock seconds (the loop's own progress records,
WORKDIR/progress.jsonl: step time including data loading, compilation excluded). Diffusion methods
are also scored as the mean of N samples (config.eval.samples; keys fold_in(volume key, k)) at
every M-th evaluated step and the last: a lower-variance estimate of the same model.

Tasks and methods (every method of a task shares one U-Net, crop, batch, learning rate and step
budget; tasks, splits and configs as in experiments/quality.py):
  mri_t1_t2, pet_denoise  regression (full resolution), puzzle_regression (PPDM's network in the
      puzzled domain, r=2, one pass, no bridge: PPDM's memory and cost, isolating what the bridge
      adds), full3d, wdm, ppdm2, ppdm4.
  ct_denoise  sparse (x0 supervised in velocity space, STM on), sparse_nostm (STM off),
      regression (the same U-Net without STM, which modulates a time embedding a one-pass
      regressor does not have); the sparse config's `cpu,heldout` variant (its U-Net; RAS z in [0, 0.6) trained,
      [0.6, 1] of the new-noise realisation evaluated).
The input (where it shares the target's units) and the training-target mean are the floors.
Evaluation box: at most --max-box voxels per axis, centred in the held-out region
(config.eval.max_box), so that full3d's 50-step DDIM sampling at every checkpoint fits the budget.

Writes DIR/curves.json ({"records": [{task, method, factor, step, seconds, psnr, ssim, hfen,
samples, input_psnr, ..., sample_s}], "settings": ...}, rewritten atomically after every record),
DIR/curves_TASK.png (PSNR and SSIM against steps, PSNR against seconds, floors as horizontal lines,
mean-of-N as dashed lines) and DIR/curves.md (the table at the last step and the reading:
whether, and from which evaluated step, any diffusion method beats regression and the input).
A rerun skips records already in curves.json (same settings) and resumes training.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
import time
from typing import Sequence

import numpy as np

from jaxvol import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("mri_t1_t2", "pet_denoise", "ct_denoise")
# name -> (config.method, factor, diffusion?)
METHODS = {
    "regression": ("regression", 1, False),
    "puzzle_regression": ("puzzle_regression", 2, False),
    "full3d": ("full3d", 1, True),
    "wdm": ("wdm", 2, True),
    "ppdm2": ("ppdm", 2, True),
    "ppdm4": ("ppdm", 4, True),
    "sparse": ("sparse", 1, True),
    "sparse_nostm": ("sparse", 1, True),
}
TASK_METHODS = {
    "mri_t1_t2": ("regression", "puzzle_regression", "full3d", "wdm", "ppdm2", "ppdm4"),
    "pet_denoise": ("regression", "puzzle_regression", "full3d", "wdm", "ppdm2", "ppdm4"),
    "ct_denoise": ("sparse", "sparse_nostm", "regression"),
}
def _ct_split() -> str:
  from jaxvol import prepare  # pylint: disable=g-import-not-at-top
  from jaxvol.data import tasks  # pylint: disable=g-import-not-at-top
  return (f"one abdominal CT, simulated low dose ({prepare.default_dose('ct_denoise'):g}, the "
          "store's own), 3 noise realisations train, a new one is scored: "
          + tasks.describe_split(tasks.get("ct_denoise")))


SPLITS = {"ct_denoise": _ct_split()}
log = logging.getLogger("jaxvol")

import quality  # noqa: E402  pylint: disable=wrong-import-position  (a sibling script)


def schedule(steps: int, count: int, first: int | None = None) -> list[int]:
  """`count` log-spaced evaluation steps ending at `steps` (distinct, increasing, >= 1)."""
  if steps < 1 or count < 1:
    raise ValueError(f"steps and checkpoints must be >= 1, got {steps}, {count}")
  first = max(1, min(steps, first if first is not None else max(1, steps // 64)))
  points = np.geomspace(first, steps, count) if count > 1 else np.array([steps])
  return sorted({int(round(p)) for p in points} | {steps})


def split_of(task: str) -> str:
  return SPLITS.get(task) or quality.SPLITS[task]


def make_config(task: str, name: str, store: str, args: argparse.Namespace):
  """The task's config for one method with the shared budget (quality.make_config for the MRI
  and PET tasks; the sparse CT config's `cpu,heldout` variant for CT)."""
  from jaxvol import config as base  # pylint: disable=g-import-not-at-top
  method, factor, _ = METHODS[name]
  if task == "ct_denoise":
    c = base.sparse_config("ct_denoise", "cpu,heldout")
    c = base.set_method(c, method)
    if name == "sparse_nostm" or method == "regression":
      c.model.stm = False  # STM modulates the time embedding: a one-pass regressor has none
    c.data.store = store
    c.data.crop_size = (args.crop,) * 3
    c.data.batch_size = args.batch
    c.data.num_workers = 0
    c.model.base_width = args.width
    t = c.train
    t.steps, t.learning_rate = args.steps, args.lr
    t.warmup_steps = max(1, args.steps // 20)
    c.eval.previews = False
    c.eval.input_baseline = True  # low-dose and full-dose CT share HU: the input is a floor
    c.mesh.data = c.mesh.spatial = c.mesh.model = 1
  else:
    base_name = {"puzzle_regression": "ppdm2", "sparse": "full3d"}.get(name, name)
    c = quality.make_config(task, base_name, store, args)
    if method == "puzzle_regression":
      c.method = "puzzle_regression"
      c.ppdm.factor = (factor,) * 3
    c.eval.previews = False
  c.eval.max_box = (args.max_box,) * 3
  c.eval.references = args.references
  c.train.log_every = max(1, min(25, args.steps // 16))
  c.train.checkpoint_every = 10 ** 9  # a checkpoint at the end of each segment only
  c.train.keep_checkpoints = 2
  c.train.time_limit_minutes = 0.0
  c.inference.window = (args.crop,) * 3
  c.inference.overlap = args.window_overlap
  c.inference.batch = args.window_batch
  return c


def settings_of(args: argparse.Namespace) -> dict:
  return {k: getattr(args, k) for k in ("steps", "checkpoints", "crop", "width", "batch", "lr",
                                        "samples", "mean_every", "max_box", "window_overlap",
                                        "sample_steps", "ppdm_sample_steps")}


def _key(r: dict) -> tuple:
  return r["task"], r["name"], r["step"], r["samples"]


def seconds_at(workdir: str, step: int) -> float | None:
  """Training wall seconds at `step` from the loop's progress records."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  for r in loop.read_progress(workdir):
    if int(r["step"]) == step:
      return float(r["seconds"])
  return None


def evaluate_at(config, workdir: str, step: int, samples: int) -> dict:
  from jaxvol.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.eval.checkpoint_step = step
  c.eval.samples = samples
  return evaluate_lib.evaluate(c, workdir, out_name=f"eval_s{step}_n{samples}")


def record_of(task: str, name: str, step: int, samples: int, summary: dict,
              seconds: float | None) -> dict:
  method, factor, _ = METHODS[name]
  m = summary["metrics"]
  get = lambda k, who: m.get(k, {}).get(who)
  return {"task": task, "name": name, "method": method, "factor": factor, "step": step,
          "seconds": seconds, "samples": samples, "psnr": get("psnr", "model"),
          "ssim": get("ssim", "model"), "hfen": get("hfen", "model"),
          "input_psnr": get("psnr", "input"), "input_ssim": get("ssim", "input"),
          "input_hfen": get("hfen", "input"),
          "train_mean_psnr": get("psnr", "train_mean"), "train_mean_ssim": get("ssim", "train_mean"),
          "references": references_of(summary),
          "sample_s": summary["seconds_per_volume"], "n_volumes": summary["n_volumes"],
          "boxes": summary["boxes"], "region": summary["region"],
          "data_range": summary["data_range"], "split": split_of(task)}


def references_of(summary: dict) -> dict:
  from jaxvol.eval import references  # pylint: disable=g-import-not-at-top
  return references.from_summary(summary)


def run_method(task: str, name: str, store: str, out: pathlib.Path, args, records: list[dict],
               save) -> list[dict]:
  """Trains one method segment by segment and evaluates it at every scheduled step."""
  _, _, diffusion = METHODS[name]
  config = make_config(task, name, store, args)
  workdir = out / "runs" / task / name
  workdir.mkdir(parents=True, exist_ok=True)
  steps = schedule(args.steps, args.checkpoints)
  have = {_key(r) for r in records}
  for i, step in enumerate(steps):
    counts = [1]
    if diffusion and args.samples > 1 and (i % args.mean_every == 0 or step == steps[-1]):
      counts.append(args.samples)
    todo = [n for n in counts if (task, name, step, n) not in have]
    if not todo:
      continue
    c = config.copy_and_resolve_references()
    c.train.steps = step
    t0 = time.time()
    result = experiment.train(c, workdir)
    if result["step"] < step:
      raise SystemExit(f"{task}/{name}: training stopped at step {result['step']} of {step} "
                       f"({result.get('stopped')}); run again to resume from {workdir}")
    trained = time.time() - t0
    seconds = seconds_at(str(workdir), step)
    for n in todo:
      t0 = time.time()
      summary = evaluate_at(c, str(workdir), step, n)
      rec = record_of(task, name, step, n, summary, seconds)
      records = [r for r in records if _key(r) != _key(rec)] + [rec]
      save(records)
      print(f"-- {task}/{name} step {step} (x{n}): PSNR {rec['psnr']:.2f} dB, SSIM "
            f"{rec['ssim']:.4f}, HFEN {rec['hfen']:.4f} (train {trained:.0f} s, eval "
            f"{time.time() - t0:.0f} s)", flush=True)
  return records


def fill_input_floor(task: str, name: str, store: str, out: pathlib.Path, args,
                     records: list[dict], save) -> list[dict]:
  """Adds the input floor to the task's records that lack it (written before the task's config
  scored the input). The floor does not depend on the model (the same volumes, boxes, mask and
  range), so one evaluation of `name`'s last checkpoint gives it for every record."""
  lacking = [r for r in records if r["task"] == task and r.get("input_psnr") is None]
  steps = [r["step"] for r in records if r["task"] == task and r["name"] == name]
  config = make_config(task, name, store, args)
  if not lacking or not steps or not config.eval.input_baseline:
    return records
  metrics = evaluate_at(config, str(out / "runs" / task / name), max(steps), 1)["metrics"]
  if "input" not in metrics["psnr"]:
    return records  # not on the target's scale: no input floor
  for r in lacking:
    r.update({f"input_{k}": metrics[k]["input"] for k in ("psnr", "ssim", "hfen")})
  save(records)
  return records


def _label(name: str) -> str:
  return {"ppdm2": "PPDM r=2", "ppdm4": "PPDM r=4", "puzzle_regression": "regression (puzzled, r=2)",
          "sparse_nostm": "sparse (no STM)"}.get(name, name)


def plot(records: Sequence[dict], task: str, path: pathlib.Path) -> None:
  """PSNR and SSIM against steps, PSNR against training seconds; floors as horizontal lines."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in records if r["task"] == task]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
  names = list(dict.fromkeys(r["name"] for r in rows))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for j, name in enumerate(names):
    for n in sorted({r["samples"] for r in rows if r["name"] == name}):
      rs = sorted((r for r in rows if r["name"] == name and r["samples"] == n),
                  key=lambda r: r["step"])
      style = dict(color=colors[j % len(colors)], marker="o", ms=3,
                   ls="-" if n == 1 else "--",
                   label=_label(name) + ("" if n == 1 else f" (mean of {n})"))
      axes[0].plot([r["step"] for r in rs], [r["psnr"] for r in rs], **style)
      axes[1].plot([r["step"] for r in rs], [r["ssim"] for r in rs], **style)
      if all(r["seconds"] is not None for r in rs):
        axes[2].plot([r["seconds"] for r in rs], [r["psnr"] for r in rs], **style)
  floor = next((r for r in rows if r.get("input_psnr") is not None), None)
  mean = next((r for r in rows if r.get("train_mean_psnr") is not None), None)
  for ax, key in ((axes[0], "psnr"), (axes[1], "ssim"), (axes[2], "psnr")):
    if floor is not None:
      ax.axhline(floor[f"input_{key}"], color="k", ls=":", label="input")
    if mean is not None:
      ax.axhline(mean[f"train_mean_{key}"], color="gray", ls="-.", label="training-target mean")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
  axes[0].set(xlabel="training step", ylabel="PSNR (dB)")
  axes[1].set(xlabel="training step", ylabel="SSIM")
  axes[2].set(xlabel="training seconds (this machine)", ylabel="PSNR (dB)")
  axes[0].legend(fontsize=7, loc="lower right")
  fig.suptitle(f"{task}: {split_of(task)}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def reading(records: Sequence[dict], task: str) -> list[str]:
  """Per task: whether, and from which evaluated step, a diffusion method beats regression (at
  the same step) and the input; single-sample PSNR."""
  rows = [r for r in records if r["task"] == task and r["samples"] == 1]
  if not rows:
    return []
  reg = {r["step"]: r["psnr"] for r in rows if r["name"] == "regression"}
  floor = next((r["input_psnr"] for r in rows if r.get("input_psnr") is not None), None)
  out = []
  for name in dict.fromkeys(r["name"] for r in rows):
    if not METHODS[name][2]:
      continue
    rs = sorted((r for r in rows if r["name"] == name), key=lambda r: r["step"])
    beats_reg = [r["step"] for r in rs if r["step"] in reg and r["psnr"] > reg[r["step"]]]
    beats_in = [r["step"] for r in rs if floor is not None and r["psnr"] > floor]
    text = f"{task}: {_label(name)}: last {rs[-1]['psnr']:.2f} dB at step {rs[-1]['step']}; "
    text += (f"beats regression from step {beats_reg[0]} ({len(beats_reg)}/{len(rs)} steps)"
             if beats_reg else "never beats regression")
    if floor is not None:
      text += ("; beats the input from step " + str(beats_in[0]) if beats_in
               else f"; never beats the input ({floor:.2f} dB)")
    out.append(text)
  if reg:
    last = max(reg)
    out.append(f"{task}: regression {reg[last]:.2f} dB at step {last}"
               + (f"; input {floor:.2f} dB" if floor is not None else ""))
  return out


def markdown(records: Sequence[dict], args: argparse.Namespace) -> str:
  lines = ["# Learning curves on unseen anatomy", "",
           f"Budget per method: {args.steps} steps, batch {args.batch}, crop {args.crop}^3, lr "
           f"{args.lr:g}, U-Net width {args.width}; evaluated at steps "
           f"{schedule(args.steps, args.checkpoints)} on at most {args.max_box}^3 voxels centred "
           f"in the held-out region, in-loop windows of the crop (overlap {args.window_overlap:g}); "
           f"mean of {args.samples} samples every {args.mean_every} evaluated steps and at the "
           "last. Metrics in original units inside the target's body mask, PSNR/SSIM over the "
           "target preset's range.", "",
           "| task | method | step | seconds | PSNR (dB) | SSIM | HFEN | PSNR mean-of-N |",
           "|---|---|---|---|---|---|---|---|"]
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    floor = next((r for r in rows if r.get("input_psnr") is not None), None)
    if floor is not None:
      lines.append(f"| {task} | input | - | - | {floor['input_psnr']:.2f} | "
                   f"{floor['input_ssim']:.4f} | {floor['input_hfen']:.4f} | - |")
    mean = next((r for r in rows if r.get("train_mean_psnr") is not None), None)
    if mean is not None:
      lines.append(f"| {task} | training-target mean | - | - | {mean['train_mean_psnr']:.2f} | "
                   f"{mean['train_mean_ssim']:.4f} | - | - |")
    refs = next((r["references"] for r in rows if r.get("references")), {})
    for ref, entry in refs.items():
      from jaxvol.eval import references  # pylint: disable=g-import-not-at-top
      lines.append(f"| {task} | {references.table_label(ref, entry)} | - | - | "
                   f"{entry['psnr']:.2f} | {entry['ssim']:.4f} | {entry['hfen']:.4f} | - |")
    for name in dict.fromkeys(r["name"] for r in rows):
      ones = [r for r in rows if r["name"] == name and r["samples"] == 1]
      if not ones:
        continue
      last = max(ones, key=lambda r: r["step"])
      multi = [r for r in rows if r["name"] == name and r["samples"] > 1
               and r["step"] == last["step"]]
      sec = "-" if last["seconds"] is None else f"{last['seconds']:.0f}"
      lines.append(f"| {task} | {_label(name)} | {last['step']} | {sec} | {last['psnr']:.2f} | "
                   f"{last['ssim']:.4f} | {last['hfen']:.4f} | "
                   + (f"{multi[0]['psnr']:.2f} |" if multi else "- |"))
  lines += ["", "Reading (single-sample PSNR at each evaluated step):", ""]
  for task in dict.fromkeys(r["task"] for r in records):
    lines += [f"- {line}" for line in reading(records, task)]
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True)
  p.add_argument("--references", default="auto",
                 help="classical references scored beside every model (config.eval.references)")
  p.add_argument("--tasks", type=experiment.str_list, default=list(TASKS))
  p.add_argument("--methods", type=experiment.str_list, default=None,
                 help="default: every method of each task (TASK_METHODS)")
  p.add_argument("--steps", type=int, default=1600)
  p.add_argument("--checkpoints", type=int, default=7, help="evaluated steps (log-spaced)")
  p.add_argument("--crop", type=int, default=16)
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--samples", type=int, default=4, help="N of the mean-of-N estimate")
  p.add_argument("--mean-every", type=int, default=2,
                 help="mean-of-N at every M-th evaluated step (and the last)")
  p.add_argument("--max-box", type=int, default=32, help="evaluated box side (voxels, max)")
  p.add_argument("--window-overlap", type=float, default=0.0)
  p.add_argument("--window-batch", type=int, default=8)
  p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of full3d and wdm")
  p.add_argument("--ppdm-sample-steps", type=int, default=10)
  p.add_argument("--source", default=None, help="shared real volumes (default: prepare's)")
  p.add_argument("--compilation-cache", action=argparse.BooleanOptionalAction, default=True,
                 help="keep compiled programs in OUT/jax_cache (a process-wide JAX setting)")
  p.add_argument("--store", action="append", default=[],
                 help="TASK=STORE: use this store instead of preparing the task's")
  args = p.parse_args(argv)
  bad = [t for t in args.tasks if t not in TASKS]
  if bad:
    p.error(f"unknown tasks {bad}; choose from {list(TASKS)}")
  if args.methods is not None:
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
      p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
  if args.crop % 16:
    p.error("--crop must be a multiple of 16 (ppdm r=4 with a 3-level U-Net)")
  if args.max_box < 11:
    p.error("--max-box must be at least 11 (SSIM's window)")
  if args.mean_every < 1:
    p.error("--mean-every must be >= 1")
  # quality.make_config reads these.
  args.clip_x0, args.eval_fraction, args.wdm_lll_scale = None, 1.0, None
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout,
                      force=True)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger("jaxvol").setLevel(logging.WARNING)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  if args.compilation_cache:  # a rerun reuses compiled programs from disk
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  path = out / "curves.json"
  settings = settings_of(args)
  saved = json.loads(path.read_text()) if path.is_file() else {}
  records = saved.get("records", []) if saved.get("settings") == settings else []
  if saved and saved.get("settings") != settings:
    print(f"{path}: other settings; starting a new record list", flush=True)
  stores = dict(s.split("=", 1) for s in args.store)

  def save(recs):
    fileio.write_json_atomic(path, {"settings": settings, "machine": _machine(),
                                    "records": recs})

  for task in args.tasks:
    store = stores.get(task) or experiment.task_store(out, task, args.source)
    names = [m for m in (args.methods or TASK_METHODS[task]) if m in TASK_METHODS[task]]
    print(f"== {task}: {split_of(task)}; methods {names}", flush=True)
    for name in names:
      records = run_method(task, name, store, out, args, records, save)
    if names:
      records = fill_input_floor(task, names[-1], store, out, args, records, save)
    plot(records, task, out / f"curves_{task}.png")
  md = markdown([r for r in records if r["task"] in args.tasks], args)
  fileio.write_text_atomic(out / "curves.md", md)
  print(md)
  return records


def _machine() -> str:
  import os  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{jax.devices()[0].platform} backend, jax {jax.__version__}")


if __name__ == "__main__":
  main()
