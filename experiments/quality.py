"""Quality and speed of PPDM against the baselines, every method trained with the same budget.

Usage::

  python experiments/quality.py --out DIR [--tasks mri_t1_t2,pet_denoise]
      [--methods full3d,ppdm2,ppdm4,wdm,regression] [--steps N] [--crop S] [--width W]
      [--batch B] [--lr LR] [--sample-steps K] [--ppdm-sample-steps K] [--eval-fraction F]
      [--window-overlap O] [--window-batch B] [--clip-x0 C] [--no-whole-volume]

Tasks (data built by tools/prepare_data.py into DIR/data/TASK unless already there):
  mri_t1_t2    stroke T1 -> T2, ONE subject split by region: training crops come from RAS x in
               [0, 0.5) (one hemisphere), evaluation is on x in [0.6, 1] ([0.5, 0.6) validates).
  pet_denoise  low-count (10% dose) -> full-count PET; train: noise realisations of the SPM PET
               template and of a T1-derived FDG-like PET, crops from RAS z in [0, 0.6); test: new
               noise realisations of the same two anatomies, evaluated on z in [0.6, 1] only, so
               the evaluated anatomy is never trained on (configs/ppdm_pet_denoise.py).

Methods, each configured from the repository's configs (configs/{full3d,ppdm,wdm,regression}_
mri_t1_t2.py, configs/ppdm_pet_denoise.py with `method` switched for the baselines), loaded by path
with their `heldout` variant (the region splits above) and then overridden so that every method
gets THE SAME BUDGET: the same number of steps, batch, crop, learning rate and U-Net (base width W,
channel multipliers (1, 2, 4), one res block per level, GroupNorm 8, no attention):
  full3d       full-resolution conditional DDPM, DDIM sampling (--sample-steps, 50 by default).
  ppdm2/ppdm4  PPDM with puzzle factor 2 / 4, bridge sampling (--ppdm-sample-steps, 10).
  wdm          wavelet (Haar) diffusion, factor 2, DDIM sampling like full3d.
  regression   the same U-Net as a one-pass L1 regressor.
The parameterisation (eps/x0), DDIM's x0 clipping (off in the configs) and everything not listed
above stay as in the configs. `--clip-x0 C` evaluates full3d and wdm again with DDIM's x0 estimate
clipped to [-C, C] (the usual DDPM practice; an eps-network trained briefly otherwise amplifies
its error by 1/sqrt(abar) ~ 160 at the first step): a separate record (variant "x0 clip C") that
reuses the same checkpoints; the targets are checked against each baseline's best variant. The
learning rate (5e-4 by default, as in the ppdm_pet_denoise `demo` variant) replaces the configs'
1e-4, which is meant for runs 10-100x longer than this CPU budget; warm-up is 5% of the steps.

Scale (defaults: 400 steps, batch 2, crop 16^3, width 8): the whole default run takes about
40-45 minutes on 2 CPU cores. XLA's CPU 3D convolutions run at only 3-6 GFLOP/s here, so the
configs' network (width 32, 2 res blocks, 64^3 crops), or even width 16 at 32^3 crops (56 GFLOPs
per full-resolution train step, about 12 s per step measured), would allow only a few dozen
steps; at width 8 and 16^3 a full3d or regression step takes about 0.45 s, PPDM r=2 0.1 s,
r=4 0.03 s, WDM 0.1 s.

Evaluation box: full3d sampling costs 50 network passes over the volume (about 4.5 s per pass
over 62x80x70 voxels here), so evaluation uses a CENTRED SUB-BOX: along every axis that the task's
own eval region leaves whole, only the central `--eval-fraction` (0.5 by default) is kept. MRI:
the held-out slab x in [0.6, 1] (50 voxels) times the central half in y and z (80x70); PET:
the held-out z in [0.6, 1] of each test volume times the central half in x and y.
Every record also scores two floors: the input itself where it shares the target's units
(`jaxvol.data.inference.shares_scale`; otherwise "not comparable"), and the training-target mean
(`jaxvol.eval.volumes.TrainingMeanFloor`), a predictor that ignores its input.
`--eval-fraction 1` evaluates the whole held-out region / whole test volumes.

Two evaluations of the same checkpoint (final step, EMA weights), both through the library's one
inference path (`jaxvol.eval.evaluate`, jaxvol.eval.runner): metrics on the original intensity
scale inside the target's body mask with the PSNR/SSIM range fixed to the target's intensity
preset (hi - lo), the input-as-prediction floor where comparable, the training-target mean:
  windowed (psnr, ssim; the headline numbers)  config.inference.window = the TRAINING CROP, so
      every sampler step evaluates the network on Gaussian-blended windows of the crop size
      (overlap --window-overlap, --window-batch windows per call; jaxvol.ops.windows), with one
      noise field for the whole volume (outputs in RUN/eval_windowed/).
  whole-volume (psnr_whole, ssim_whole)  the sampler run once on the whole box (RUN/eval/).
Why both: the networks are trained on 16^3 crops, and GroupNorm statistics (and the share of
background) of a whole 62x80x70 box differ so much from those of a crop that whole-volume
predictions of crop-trained models are badly off. (Results in docs/results/quality_cpu.* up to
the note in docs/results.md were measured with an earlier stopgap that sampled each window independently
and fused the finished samples; this script now uses the library's in-loop windows.)

Timing (seconds, on whatever machine runs this; compare them as ratios within one run):
  train_step_s  median seconds per step over the training loop's own progress records
                (jaxvol.train.loop, WORKDIR/progress.jsonl), excluding the first window (which
                pays for data-pipeline warm-up); the step is compiled ahead of time before the
                loop, so no window includes compilation. Data loading is included.
  sample_s      seconds per evaluation volume of the windowed sampler, compilation excluded
                (the runner compiles for each volume shape before timing it).
  sample_whole_s  the same for whole-box sampling.

Outputs: DIR/quality.json (a list of records {task, method, factor, psnr, ssim, train_step_s,
sample_s, steps, split, ...}, rewritten atomically after each record), DIR/quality.md (the table,
also printed) and DIR/runs/TASK/NAME_s{steps}_c{crop}_w{width}_lr{lr}/ (checkpoints; eval/ and
eval_windowed/, each with NIfTI predictions, previews and a summary.json). A rerun skips records
already in quality.json with the same budget, and training resumes from the latest checkpoint of
its workdir.

Targets (from the PPDM claims): PPDM r=2 within 0.5 dB PSNR of full3d, and above WDM. Checked per
task on the windowed numbers and reported as met or not; nothing is tuned on the test data.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import statistics
import sys
import time
from typing import Sequence

from jaxvol import config as base_config_lib
from jaxvol import experiment
from jaxvol import fileio
from jaxvol.data import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("mri_t1_t2", "pet_denoise")
# name -> (config.method, factor)
METHODS = {
    "full3d": ("full3d", 1),
    "ppdm2": ("ppdm", 2),
    "ppdm4": ("ppdm", 4),
    "wdm": ("wdm", 2),
    "regression": ("regression", 1),
}
SPLITS = {  # the regions come from the task registry (jaxvol.data.tasks), written once there
    "mri_t1_t2": "one subject (stroke T1/T2, 1 mm): " + tasks.describe_split(tasks.get("mri_t1_t2")),
    "pet_denoise": ("train: 3 noise realisations of each of 2 anatomies (SPM PET template, T1-"
                    "derived FDG-like PET; 10% dose -> full count); test: 1 new noise realisation "
                    "of each anatomy (anatomy never trained on): "
                    + tasks.describe_split(tasks.get("pet_denoise"))),
}
PSNR_MARGIN_DB = 0.5

log = logging.getLogger("jaxvol")


def config_name(task: str, method: str) -> str:
  """The packaged config a (task, method) starts from."""
  if task == "mri_t1_t2":
    return f"{method}_mri_t1_t2"
  if task == "pet_denoise":
    return "ppdm_pet_denoise"
  raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_config(task: str, name: str, store: str, args: argparse.Namespace):
  """The repository config of (task, method), overridden to the shared budget."""
  method, factor = METHODS[name]
  # The repository's stores hold one subject (MRI) or one anatomy (PET): the held-out split.
  c = base_config_lib.set_method(
      experiment.packaged_config(config_name(task, method), base_config_lib.HELDOUT), method)
  c.data.store = store
  c.data.crop_size = (args.crop,) * 3
  c.data.batch_size = args.batch
  c.data.num_workers = 0
  m = c.model
  m.base_width = args.width
  m.channel_mults = (1, 2, 4)
  m.num_res_blocks = 1
  m.attention_levels = ()
  m.groups = 8
  m.dropout = 0.0
  if method == "ppdm":
    c.ppdm.factor = (factor,) * 3
  c.ppdm.sample_steps = args.ppdm_sample_steps
  c.diffusion.sample_steps = args.sample_steps
  if args.clip_x0 is not None:
    c.diffusion.clip_x0 = args.clip_x0
  if getattr(args, "wdm_lll_scale", None) is not None:
    c.wdm.lll_scale = args.wdm_lll_scale
  t = c.train
  t.steps = args.steps
  t.learning_rate = args.lr
  t.warmup_steps = max(1, args.steps // 20)
  t.log_every = max(1, min(25, args.steps // 4))
  t.checkpoint_every = max(1, args.steps // 4)
  t.keep_checkpoints = 2
  t.time_limit_minutes = 0.0
  c.data.eval_region = eval_region(c.data.eval_region, args.eval_fraction)
  c.inference.window = ()  # whole-box sampling; `windowed_config` adds the windows
  c.eval.checkpoint_step = args.steps
  c.eval.previews = True
  c.eval.input_baseline = task == "pet_denoise"
  c.eval.references = getattr(args, "references", "auto")
  c.mesh.data = 1
  c.mesh.spatial = 1
  c.mesh.model = 1
  return c


def eval_region(region: dict | None, fraction: float) -> dict | None:
  """`region` with the centred `fraction` of every axis it leaves whole (see the docstring).

  Args:
    region: {axis: (lo, hi)} fractions (string or int keys) or None (whole volume).
    fraction: in (0, 1]; 1 returns `region` unchanged.

  Returns:
    {str(axis): (lo, hi)} for all three axes, or `region` itself when fraction is 1.
  """
  if fraction >= 1.0:
    return region
  out = {str(k): tuple(float(f) for f in v) for k, v in (region or {}).items()}
  lo, hi = 0.5 - fraction / 2.0, 0.5 + fraction / 2.0
  for axis in ("0", "1", "2"):
    out.setdefault(axis, (lo, hi))
  return dict(sorted(out.items()))


def plain_region(region) -> dict | None:
  """A config's region as plain JSON ({str(axis): [lo, hi]}) or None."""
  return None if not region else {str(k): [float(f) for f in v] for k, v in region.items()}


def workdir_for(out: pathlib.Path, task: str, name: str, args: argparse.Namespace) -> pathlib.Path:
  return out / "runs" / task / f"{name}_s{args.steps}_c{args.crop}_w{args.width}_lr{args.lr:g}"


def median_step_seconds(points: Sequence[tuple[float, int]]) -> float | None:
  """Median seconds per step over logging windows, the first window excluded.

  Args:
    points: (wall time, step) at the end of each logging window, in order.

  Returns:
    The median of (t_i - t_{i-1}) / (s_i - s_{i-1}) over consecutive windows, or None with fewer
    than two points.
  """
  rates = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(points, points[1:]) if s1 > s0]
  return statistics.median(rates) if rates else None


def windowed_config(config, args: argparse.Namespace):
  """`config` sampling in the library's in-loop windows: windows of the training crop, overlap
  --window-overlap, --window-batch windows per network call (jaxvol.ops.windows)."""
  c = config.copy_and_resolve_references()
  c.inference.window = (args.crop,) * 3
  c.inference.overlap = args.window_overlap
  c.inference.batch = args.window_batch
  return c


def progress_points(progress: Sequence[dict]) -> list[tuple[float, int]]:
  """(training seconds, step) of the loop's own progress records (jaxvol.train.loop)."""
  return [(float(r["seconds"]), int(r["step"])) for r in progress]


write_json_atomic = fileio.write_json_atomic
write_text_atomic = fileio.write_text_atomic


def _key(rec: dict) -> tuple:
  return rec["task"], rec["method"], rec["factor"], rec.get("variant", "")


def upsert(records: list[dict], rec: dict) -> list[dict]:
  """Records with `rec` replacing any earlier one of the same (task, method, factor, variant)."""
  return [r for r in records if _key(r) != _key(rec)] + [rec]


def find(records: Sequence[dict], task: str, method: str, factor: int,
         variant: str = "") -> dict | None:
  for r in records:
    if _key(r) == (task, method, factor, variant):
      return r
  return None


def best(records: Sequence[dict], task: str, method: str, factor: int) -> dict | None:
  """The record of highest PSNR among the variants of one (task, method, factor)."""
  rows = [r for r in records if _key(r)[:3] == (task, method, factor)]
  return max(rows, key=lambda r: r["psnr"]) if rows else None


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _label(rec: dict) -> str:
  label = f"ppdm r={rec['factor']}" if rec["method"] == "ppdm" else rec["method"]
  return f"{label} ({rec['variant']})" if rec.get("variant") else label


def table(records: Sequence[dict]) -> str:
  """Markdown table: one row per record, plus the input-as-prediction floor where recorded."""
  lines = ["| task | method | PSNR (dB) | SSIM | PSNR whole-volume | SSIM whole-volume "
           "| train step (s) | sample (s/volume) | steps |",
           "|---|---|---|---|---|---|---|---|---|"]
  for task in dict.fromkeys(r["task"] for r in records):
    rows = [r for r in records if r["task"] == task]
    floor = next((r for r in rows if r.get("input_psnr") is not None), None)
    if floor is not None:
      lines.append(f"| {task} | input (no model) | {floor['input_psnr']:.2f} | "
                   f"{floor['input_ssim']:.4f} | - | - | - | - | - |")
    else:
      lines.append(f"| {task} | input (no model) | not comparable | - | - | - | - | - | - |")
    mean = next((r for r in rows if r.get("train_mean_psnr") is not None), None)
    if mean is not None:
      lines.append(f"| {task} | training-target mean (ignores the input) | "
                   f"{mean['train_mean_psnr']:.2f} | {mean['train_mean_ssim']:.4f} "
                   "| - | - | - | - | - |")
    refs = next((r["references"] for r in rows if r.get("references")), {})
    for ref, entry in refs.items():
      from jaxvol.eval import references  # pylint: disable=g-import-not-at-top
      lines.append(f"| {task} | {references.table_label(ref, entry)} | {entry['psnr']:.2f} | "
                   f"{entry['ssim']:.4f} | - | - | - | - | - |")
    for r in rows:
      lines.append(f"| {task} | {_label(r)} | {_fmt(r['psnr'], '.2f')} | {_fmt(r['ssim'], '.4f')} "
                   f"| {_fmt(r.get('psnr_whole'), '.2f')} | {_fmt(r.get('ssim_whole'), '.4f')} "
                   f"| {_fmt(r['train_step_s'], '.3f')} | {_fmt(r['sample_s'], '.2f')} "
                   f"| {r['steps']} |")
  return "\n".join(lines)


def targets(records: Sequence[dict]) -> list[str]:
  """Verdicts on 'PPDM r=2 within 0.5 dB PSNR of full3d' and 'PPDM r=2 above WDM', per task.

  Against each baseline's best variant (e.g. with or without x0 clipping): the stronger baseline.
  """
  out = []
  for task in dict.fromkeys(r["task"] for r in records):
    ppdm = find(records, task, "ppdm", 2)
    full, wdm = best(records, task, "full3d", 1), best(records, task, "wdm", 2)
    if ppdm is None:
      continue
    if full is not None:
      gap = ppdm["psnr"] - full["psnr"]
      ok = gap >= -PSNR_MARGIN_DB
      out.append(f"{task}: ppdm r=2 vs {_label(full)}: {gap:+.2f} dB -> within "
                 f"{PSNR_MARGIN_DB} dB: {'MET' if ok else 'NOT MET'}")
    if wdm is not None:
      gap = ppdm["psnr"] - wdm["psnr"]
      out.append(f"{task}: ppdm r=2 vs {_label(wdm)}: {gap:+.2f} dB -> above wdm: "
                 f"{'MET' if gap > 0 else 'NOT MET'}")
  return out


def markdown(records: Sequence[dict], args: argparse.Namespace) -> str:
  budget = (f"Same budget for every method: {args.steps} steps, batch {args.batch}, crop "
            f"{args.crop}^3, lr {args.lr:g}, U-Net base width {args.width}, channel multipliers "
            f"(1, 2, 4), 1 res block per level, no attention; DDIM {args.sample_steps} steps "
            f"(full3d, wdm), bridge {args.ppdm_sample_steps} steps (ppdm).")
  splits = "\n".join(f"- {t}: {SPLITS[t]}" for t in dict.fromkeys(r["task"] for r in records))
  if args.eval_fraction < 1.0:
    splits += (f"\n- evaluation on a centred sub-box: the central {args.eval_fraction:g} of every "
               "axis the split leaves whole (MRI: y and z of the held-out hemisphere; PET: all "
               "three axes of each test volume)")
  evaluation = (
      f"PSNR/SSIM: windowed sampling ({args.crop}^3 windows = the training crop, overlap "
      f"{args.window_overlap:g}, Gaussian fusion); 'whole-volume': jaxvol.eval.evaluate, the "
      "sampler run once on the whole box (the library today), which crop-trained networks do "
      "not transfer to (GroupNorm statistics of a 16^3 crop differ from a whole box).")
  timing = ("Train step: median seconds per step over logging windows (first excluded). Sample: "
            "warm (pre-compiled) windowed sampling, mean seconds per evaluation volume. Times are "
            "from one CPU machine; compare them as ratios.")
  verdicts = "\n".join(f"- {v}" for v in targets(records)) or "- (not enough methods to check)"
  return (f"# Quality at equal training budget\n\n{budget}\n\nData splits:\n{splits}\n\n"
          f"{table(records)}\n\n{evaluation}\n\n{timing}\n\nTargets (windowed PSNR):\n"
          f"{verdicts}\n")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--references", default="auto",
                 help="classical references scored beside every model (config.eval.references)")
  p.add_argument("--tasks", type=experiment.str_list, default=list(TASKS))
  p.add_argument("--methods", type=experiment.str_list, default=list(METHODS))
  p.add_argument("--steps", type=int, default=400, help="training steps, the same for every method")
  p.add_argument("--crop", type=int, default=16, help="training crop side")
  p.add_argument("--width", type=int, default=8, help="U-Net base width")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of full3d and wdm")
  p.add_argument("--ppdm-sample-steps", type=int, default=10, help="bridge steps of ppdm")
  p.add_argument("--clip-x0", type=float, default=None,
                 help="full3d/wdm: clip DDIM's x0 estimate to [-C, C] (default: as in the config)")
  p.add_argument("--eval-fraction", type=float, default=0.5,
                 help="centred fraction kept along axes the eval region leaves whole (1: all)")
  p.add_argument("--window-overlap", type=float, default=0.0,
                 help="overlap fraction of the evaluation windows (0: tiles, last one shifted)")
  p.add_argument("--window-batch", type=int, default=8,
                 help="windows per network call (config.inference.batch)")
  p.add_argument("--whole-volume", action=argparse.BooleanOptionalAction, default=True,
                 help="also run jaxvol.eval.evaluate on the whole box (the library's sampler)")
  p.add_argument("--wdm-lll-scale", type=float, default=None,
                 help="wdm: divide the LLL band by this (config.wdm.lll_scale; default: the "
                      "config's 3, as wdm-3d; 1: unscaled bands)")
  p.add_argument("--source", default=None, help="shared real volumes (default: prepare_data's)")
  args = p.parse_args(argv)
  bad = [t for t in args.tasks if t not in TASKS]
  if bad:
    p.error(f"unknown tasks {bad}; choose from {list(TASKS)}")
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
  if args.steps < 1 or args.crop < 1 or args.width < 1 or args.batch < 1:
    p.error("--steps, --crop, --width and --batch must be positive")
  if not 0.0 < args.eval_fraction <= 1.0:
    p.error("--eval-fraction must be in (0, 1]")
  if not 0.0 <= args.window_overlap < 1.0:
    p.error("--window-overlap must be in [0, 1)")
  if args.crop % 16:
    p.error("--crop must be a multiple of 16 (ppdm r=4 with a 3-level U-Net)")
  return args


def variant_of(method: str, args: argparse.Namespace) -> str:
  """'' for the configs' sampler; 'x0 clip C' for full3d/wdm with --clip-x0 C > 0."""
  if method in ("full3d", "wdm") and args.clip_x0:
    return f"x0 clip {args.clip_x0:g}"
  return ""


def eval_workdir(train_dir: pathlib.Path, variant: str) -> pathlib.Path:
  """The folder a sampling variant is evaluated in.

  The training workdir itself for the configs' sampler; otherwise a sibling folder whose
  `checkpoints` is a link to the training workdir's, since sampling options do not change
  training (so no retraining, and each variant keeps its own eval outputs).
  """
  if not variant:
    return train_dir
  folder = train_dir.with_name(f"{train_dir.name}_{variant.replace(' ', '')}")
  folder.mkdir(parents=True, exist_ok=True)
  link = folder / "checkpoints"
  if not link.exists():
    link.symlink_to(train_dir / "checkpoints", target_is_directory=True)
  return folder


def budget_of(args: argparse.Namespace) -> dict:
  """Everything besides the step count that a reused record must share."""
  return {"crop": args.crop, "batch": args.batch, "width": args.width, "lr": args.lr,
          "sample_steps": args.sample_steps, "ppdm_sample_steps": args.ppdm_sample_steps,
          "eval_fraction": args.eval_fraction, "window_overlap": args.window_overlap,
          "window_batch": args.window_batch, "windows": "in-loop",
          "whole_volume": args.whole_volume}


def run_one(task: str, name: str, store: str, out: pathlib.Path,
            args: argparse.Namespace) -> dict:
  """Trains (or resumes) and evaluates one method on one task; returns its record."""
  from jaxvol.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import references as references_lib  # pylint: disable=g-import-not-at-top

  method, factor = METHODS[name]
  config = make_config(task, name, store, args)
  workdir = workdir_for(out, task, name, args)
  workdir.mkdir(parents=True, exist_ok=True)
  timing_path = workdir / "quality_train.json"

  ckpt = ckpt_lib.Checkpointer(str(workdir), with_data=False, async_save=False)
  try:
    done = ckpt.latest_step() is not None and ckpt.latest_step() >= args.steps
  finally:
    ckpt.close()
  if done and timing_path.is_file():
    timing = json.loads(timing_path.read_text())
    log.info("%s/%s: reusing the finished run in %s", task, name, workdir)
  else:
    t0 = time.time()
    result = experiment.train(config, workdir)
    if result["step"] < args.steps:
      raise SystemExit(f"{task}/{name}: training stopped at step {result['step']} of "
                       f"{args.steps} (signal?); run again to resume from {workdir}")
    # The loop's own records of this call (WORKDIR/progress.jsonl holds every call's).
    points = progress_points(result["progress"])
    timing = {"train_step_s": median_step_seconds(points), "train_wall_s": time.time() - t0,
              "windows": points}
    write_json_atomic(timing_path, timing)

  variant = variant_of(method, args)
  eval_dir = eval_workdir(workdir, variant)
  # Both evaluations go through the library's one inference path (jaxvol.eval.evaluate).
  windowed = evaluate_lib.evaluate(windowed_config(config, args), str(eval_dir),
                                   out_name="eval_windowed")
  whole = evaluate_lib.evaluate(config, str(eval_dir)) if args.whole_volume else None
  metrics = windowed["metrics"]
  whole_metric = lambda k: None if whole is None else whole["metrics"][k]["model"]
  return {
      "task": task, "method": method, "factor": factor, "variant": variant,
      "psnr": metrics["psnr"]["model"], "ssim": metrics["ssim"]["model"],
      "train_step_s": timing["train_step_s"], "sample_s": windowed["seconds_per_volume"],
      "steps": args.steps, "split": SPLITS[task],
      "input_psnr": metrics["psnr"].get("input"), "input_ssim": metrics["ssim"].get("input"),
      "train_mean_psnr": metrics["psnr"].get("train_mean"),
      "train_mean_ssim": metrics["ssim"].get("train_mean"),
      "train_mean_floor": windowed.get("train_mean_floor"),
      "references": references_lib.from_summary(windowed),
      "train_region": windowed["train_region"],
      "nmse": metrics["nmse"]["model"], "mae": metrics["mae"]["model"],
      "psnr_whole": whole_metric("psnr"), "ssim_whole": whole_metric("ssim"),
      "sample_whole_s": None if whole is None else whole["seconds_per_volume"],
      "eval_mode": "windowed", "window": args.crop, "overlap": args.window_overlap,
      "eval_shapes": [[b - a for a, b in box] for box in windowed["boxes"].values()],
      "n_eval_volumes": windowed["n_volumes"], "eval_region": windowed["region"],
      "checkpoint_step": windowed["checkpoint_step"], "train_wall_s": timing.get("train_wall_s"),
      "sample_steps": (args.ppdm_sample_steps if method == "ppdm" else
                       None if method == "regression" else args.sample_steps),
      "budget": budget_of(args),
      "config": config_name(task, method) + ".py", "workdir": str(workdir),
      "eval_dir": str(eval_dir),
      "clip_x0": float(config.diffusion.clip_x0) if method in ("full3d", "wdm") else None,
  }


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout,
                      force=True)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  # A rerun (and the warm sampling call after evaluate) reuse compiled programs from disk.
  jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  json_path, md_path = out / "quality.json", out / "quality.md"
  records = json.loads(json_path.read_text()) if json_path.is_file() else []
  start = time.time()
  for task in args.tasks:
    store = experiment.task_store(out, task, args.source)
    print(f"== {task}: {SPLITS[task]}", flush=True)
    for name in args.methods:
      method, factor = METHODS[name]
      old = find(records, task, method, factor, variant_of(method, args))
      budget = budget_of(args)
      if old is not None and old["steps"] == args.steps and old.get("budget") == budget:
        print(f"-- {task}/{name}: already in {json_path}, skipped", flush=True)
        continue
      t0 = time.time()
      rec = run_one(task, name, store, out, args)
      records = upsert(records, rec)
      write_json_atomic(json_path, records)
      print(f"-- {task}/{name}: PSNR {rec['psnr']:.2f} dB, SSIM {rec['ssim']:.4f}, "
            f"{_fmt(rec['train_step_s'], '.3f')} s/step, sample {rec['sample_s']:.2f} s "
            f"({time.time() - t0:.0f} s, elapsed {time.time() - start:.0f} s)", flush=True)
  md = markdown([r for r in records if r["task"] in args.tasks], args)
  write_text_atomic(md_path, md)
  print(md)
  print(f"wrote {json_path} and {md_path} in {time.time() - start:.0f} s")
  return records


if __name__ == "__main__":
  main()
