"""PPDM on whole volumes against full 3D diffusion on crops, at ONE fixed training-memory budget.

Usage::

  python experiments/memory_budget.py --out DIR [--task mri_t1_t2|pet_denoise] [--steps N]
      [--width W] [--lr LR] [--sample-steps K] [--ppdm-sample-steps K] [--window-overlap O]
      [--window-batch B] [--validations K] [--store STORE]

The PPDM paper's claim: it "matches or outperforms full 3D diffusion while reducing training memory
by up to an order of magnitude". Here the memory is fixed and quality is compared:

1. Budget. M = the compiled per-device bytes of PPDM r=4's train step on the WHOLE training
   region (`jaxvol.train.loop.compile_step`, XLA's memory analysis: temp + arguments + outputs -
   aliased, optimizer state and EMA included; batch 1). Compiled from abstract inputs: nothing is
   allocated.
2. Methods, every one with the same U-Net (base width W, channel multipliers (1, 2, 4), one res
   block per level, no attention), batch 1, the same steps, learning rate (warm-up 5% of the
   steps) and flips:
     ppdm_r4   PPDM r=4 trained on whole training regions (the configs' `fullvolume` token,
               jaxvol.data.pipeline.WholeRegion: the region edge-padded to the spatial multiple),
               sampled on the whole held-out region in one pass.
     ppdm_r2   the same with r=2, trained only if its whole-region step fits M (otherwise its
               compiled bytes are reported and the record says it does not fit).
     full3d    full-resolution conditional DDPM on random cubic crops, the LARGEST cube (a multiple
               of the U-Net's spatial multiple) whose compiled train step fits M, found by compiling
               (`search_crop`: every candidate compiled; the next larger cube is compiled too and
               exceeds M). Sampled with
               config.inference.window = its training crop (the library's in-loop Gaussian-blended
               windows, --window-overlap).
3. Checkpoint: every method is validated K times (every steps / K steps, on the task's validation
   set through the one inference path, no early stop: every method trains the same steps), and
   the best step by validation PSNR is the one scored.
4. Evaluation: `jaxvol.eval.evaluate.evaluate` on the whole held-out region (the task's `heldout`
   split, no sub-box): PSNR/SSIM in original units inside the target's body mask with the target
   preset's range (the summary's conventions), the input as a prediction where it shares the
   target's units (PET; not MRI T1 -> T2), the training-target mean floor, the classical
   references tuned on the training region (--references), and seconds_per_volume (sampling,
   compilation excluded).

Tasks (stores built by tools/prepare_data.py into DIR/data/TASK unless --store is given):
  mri_t1_t2    stroke T1 -> T2, one subject at 1 mm (124x160x140): trained on RAS x in [0, 0.5)
               (one hemisphere, 62x160x140), evaluated on x in [0.6, 1] ([0.5, 0.6) validates).
  pet_denoise  10%-dose -> full-count PET, two anatomies at 2 mm (91x109x91, 62x80x70): trained on
               RAS z in [0, 0.6) of the training realisations, evaluated on z in [0.6, 1] of new
               noise realisations. The two anatomies differ in shape: whole-region batches are
               the larger one's region padded to the multiple, the smaller anatomy edge-padded up to
               it (jaxvol.data.pipeline.whole_crop_size).

Timing: train_step_s is the median seconds per step of the loop's own progress records
(WORKDIR/progress.jsonl), the first window excluded; sample_s the evaluation summary's
seconds_per_volume. Both are from whatever machine runs this: compare them within one run.

Outputs: DIR/memory_budget.json ({"settings", "machine", "split", "budget", "records"}, rewritten
atomically after each method), DIR/memory_budget.md (the table), DIR/runs/TASK/NAME/ (checkpoints,
eval/). Resumable: the budget search is kept in the JSON and reused when the settings match,
methods already recorded with the same settings are skipped, and training resumes from the latest
checkpoint of its workdir.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import statistics
import sys
import time

from jaxvol import config as config_lib
from jaxvol import experiment
from jaxvol import fileio
from jaxvol.data import tasks
from jaxvol.eval import references as references_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("mri_t1_t2", "pet_denoise")
# name -> (config.method, puzzle factor)
METHODS = {"ppdm_r4": ("ppdm", 4), "ppdm_r2": ("ppdm", 2), "full3d": ("full3d", 1)}
SPLITS = {  # the regions come from the task registry (jaxvol.data.tasks), written once there
    "mri_t1_t2": ("one subject (stroke T1/T2, 1 mm, 124x160x140), every region scored whole: "
                  + tasks.describe_split(tasks.get("mri_t1_t2"))),
    "pet_denoise": ("train: noise realisations of 2 anatomies (SPM PET template 91x109x91, T1-"
                    "derived FDG-like PET 62x80x70, 2 mm; 10% dose -> full count); test: new noise "
                    "realisations of both, every region scored whole: "
                    + tasks.describe_split(tasks.get("pet_denoise"))),
}
GIB = 2.0**30
MIB = 2.0**20

log = logging.getLogger("jaxvol")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--references", default="auto",
                 help="classical references scored beside every model (config.eval.references)")
  p.add_argument("--task", choices=TASKS, default="mri_t1_t2")
  p.add_argument("--steps", type=int, default=300, help="training steps, the same for every method")
  p.add_argument("--width", type=int, default=8, help="U-Net base width (every method)")
  p.add_argument("--mults", default="1,2,4", help="U-Net channel multipliers (every method)")
  p.add_argument("--lr", type=float, default=5e-4, help="learning rate (every method)")
  p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of full3d")
  p.add_argument("--ppdm-sample-steps", type=int, default=10, help="bridge steps of PPDM")
  p.add_argument("--window-overlap", type=float, default=0.0,
                 help="overlap of full3d's sampling windows (config.inference.overlap; 0: tiles, "
                 "the last one shifted back to end at the edge)")
  p.add_argument("--window-batch", type=int, default=4,
                 help="windows per network call (config.inference.batch)")
  p.add_argument("--validations", type=int, default=4,
                 help="validations per run (every steps / K steps); the best is scored")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)} (ppdm_r4 sets the budget "
                 "and is always measured)")
  p.add_argument("--max-crop", type=int, default=0,
                 help="largest full3d cube side searched (0: the padded region's longest side)")
  p.add_argument("--store", default=None, help="an existing store of the task (default: "
                 "DIR/data/TASK/store, built by tools/prepare_data.py if missing)")
  p.add_argument("--source", default=None, help="shared real volumes (prepare_data's default)")
  args = p.parse_args(argv)
  args.mults = tuple(int(v) for v in args.mults.split(",") if v.strip())
  args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if [m for m in args.methods if m not in METHODS]:
    p.error(f"unknown methods in {args.methods}; choose from {list(METHODS)}")
  if args.steps < 1 or args.width < 1 or not args.mults:
    p.error("--steps, --width must be positive and --mults non-empty")
  if not 1 <= args.validations <= args.steps:
    p.error(f"--validations must be in [1, --steps], got {args.validations}")
  if not 0.0 <= args.window_overlap < 1.0:
    p.error("--window-overlap must be in [0, 1)")
  return args


def settings_of(args: argparse.Namespace) -> dict:
  """What a reused budget or record must share with this run."""
  return {"task": args.task, "steps": args.steps, "width": args.width, "mults": list(args.mults),
          "lr": args.lr, "batch": 1, "sample_steps": args.sample_steps,
          "ppdm_sample_steps": args.ppdm_sample_steps, "window_overlap": args.window_overlap,
          "window_batch": args.window_batch, "max_crop": args.max_crop,
          "validations": args.validations}


def make_config(task: str, name: str, store: str, args: argparse.Namespace, crop=None):
  """The packaged config of (task, method) with its `heldout` split, on the shared budget.

  PPDM takes the `fullvolume` token (whole training regions); `crop` is its padded region or
  full3d's cube (None: left as the config has it, set later).
  """
  method, factor = METHODS[name]
  if task == "mri_t1_t2":
    tokens = "heldout,fullvolume" if method == "ppdm" else "heldout"
    c = experiment.packaged_config(f"{method}_mri_t1_t2", tokens)
  else:
    c = experiment.packaged_config("ppdm_pet_denoise", "heldout,fullvolume" if method == "ppdm" else "heldout")
    c = config_lib.set_method(c, method)
  c.data.store = store
  c.data.batch_size = 1
  c.data.num_workers = 0
  if crop is not None:
    c.data.crop_size = tuple(int(s) for s in crop)
  m = c.model
  m.base_width = args.width
  m.channel_mults = tuple(args.mults)
  m.num_res_blocks = 1
  m.attention_levels = ()
  m.groups = 8
  m.dropout = 0.0
  m.time_embed_dim = max(32, 4 * args.width)
  m.remat = "none"
  c.compute_dtype = "float32"
  if method == "ppdm":
    c.ppdm.factor = (factor,) * 3
  c.ppdm.sample_steps = args.ppdm_sample_steps
  c.diffusion.sample_steps = args.sample_steps
  t = c.train
  t.steps = args.steps
  t.learning_rate = args.lr
  t.warmup_steps = max(1, args.steps // 20)
  t.log_every = max(1, min(25, args.steps // 4))
  t.validate_every = t.checkpoint_every = args.steps // args.validations
  t.patience = 0  # the same steps for every method
  t.keep_checkpoints = 2
  t.time_limit_minutes = 0.0
  c.eval.checkpoint = "best"
  c.eval.previews = True
  c.eval.max_box = ()  # the whole held-out region
  c.eval.references = args.references
  c.eval.input_baseline = task == "pet_denoise"
  if method == "ppdm":
    c.inference.window = ()  # one pass over the whole region
  else:
    c.inference.window = tuple(c.data.crop_size)
    c.inference.overlap = args.window_overlap
    c.inference.batch = args.window_batch
  c.mesh.data = c.mesh.spatial = c.mesh.model = 1
  return c


def spatial_multiple(config) -> tuple[int, int, int]:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  return tuple(int(m) for m in methods.build(config, jax.devices()[0].platform).spatial_multiple())


def train_bytes(config, workdir: str) -> int:
  """XLA's compiled per-device bytes of the config's train step (nothing allocated)."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  parts = loop.build_everything(config, workdir)
  _, cost = loop.compile_step(parts, config)
  return int(cost["bytes"])


def search_crop(bytes_of, budget: int, multiple: int, max_side: int,
                start: int | None = None) -> tuple[int | None, list]:
  """The largest cube side s (a multiple of `multiple`, at most `max_side`) with bytes_of(s) <=
  budget; every probe is compiled.

  Compiled bytes grow with the cube, roughly as a + b s^3 (state and buffers that do not scale,
  plus activations per voxel). From `start` the side doubles while it fits (or halves while it
  does not) until a fitting and an exceeding side bracket the answer; then the next probe is where
  the a + b s^3 line through the bracket's ends meets the budget (kept strictly inside), until the
  ends are one multiple apart. So s and s + multiple are both compiled (unless s is `max_side`),
  in a few probes, without compiling cubes far above the budget.

  Args:
    bytes_of: side -> compiled bytes.
    budget: the budget M in bytes.
    multiple: the network's spatial multiple (cube sides are its multiples).
    max_side: the largest side considered.
    start: the first side probed (rounded down to a multiple); None: a quarter of max_side.

  Returns:
    (s or None when even `multiple` does not fit, [(side, bytes), ...] in probe order).
  """
  probes, cache = [], {}

  def probe(k):
    side = k * multiple
    if side not in cache:
      cache[side] = int(bytes_of(side))
      probes.append((side, cache[side]))
      log.info("full3d crop %d^3: %.1f MiB (budget %.1f MiB)", side, cache[side] / MIB,
               budget / MIB)
    return cache[side]

  kmax = max(1, max_side // multiple)
  k = kmax // 4 if start is None else start // multiple
  k = min(max(k, 1), kmax)
  if probe(k) <= budget:
    lo, hi = k, None  # lo fits; hi does not
    while hi is None:
      if lo == kmax:
        return lo * multiple, probes
      k = min(2 * lo, kmax)
      if probe(k) <= budget:
        lo = k
      else:
        hi = k
  else:
    lo, hi = None, k
    while lo is None:
      if hi == 1:
        return None, probes
      k = hi // 2
      if probe(k) <= budget:
        lo = k
      else:
        hi = k
  while hi - lo > 1:
    b_lo, b_hi = probe(lo), probe(hi)
    slope = (b_hi - b_lo) / (hi**3 - lo**3) if b_hi > b_lo else 0.0
    guess = (lo**3 + (budget - b_lo) / slope) ** (1.0 / 3.0) if slope > 0 else (lo + hi) / 2
    k = min(max(int(guess), lo + 1), hi - 1)
    if probe(k) <= budget:
      lo = k
    else:
      hi = k
  return lo * multiple, probes


def median_step_seconds(progress) -> float | None:
  """Median seconds per step over the progress records' windows, the first window excluded."""
  pts = [(float(r["seconds"]), int(r["step"])) for r in progress]
  rates = [(t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in zip(pts, pts[1:]) if s1 > s0]
  return statistics.median(rates) if rates else None


def machine() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  out = {"platform": dev.platform, "device": getattr(dev, "device_kind", str(dev)),
         "devices_used": 1, "cpu_count": os.cpu_count(), "processor": platform.processor() or
         platform.machine(), "jax": jax.__version__}
  try:
    out["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
  except OSError:
    pass
  return out


def find_budget(store: str, out: pathlib.Path, args: argparse.Namespace,
                saved: dict | None) -> dict:
  """M, the PPDM crops and the full3d crop search (`saved` reused when its settings match)."""
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  settings = settings_of(args)
  ppdm = [n for n in METHODS if n == "ppdm_r4" or (n in args.methods and n != "full3d")]
  if (saved and saved.get("settings") == settings and saved.get("store") == store
      and all(n in saved["ppdm"] for n in ppdm)):
    return saved
  scratch = str(out / "runs" / args.task / "_compile")
  budget = {"settings": settings, "store": store, "ppdm": {}}
  for name in ppdm:
    c = make_config(args.task, name, store, args)
    crop = pipeline.whole_crop_size(store, c.data.train_split, c.data.train_region,
                                    spatial_multiple(c))
    c.data.crop_size = crop
    t0 = time.time()
    budget["ppdm"][name] = {"crop": list(crop), "bytes": train_bytes(c, scratch),
                            "compile_s": round(time.time() - t0, 1)}
    shapes = pipeline.region_shapes(pipeline.Store(store), c.data.train_split,
                                    c.data.train_region)
    budget["ppdm"][name]["regions"] = {k: list(v) for k, v in shapes.items()}
    log.info("%s whole region %s: %.1f MiB", name, crop, budget["ppdm"][name]["bytes"] / MIB)
  budget["bytes"] = budget["ppdm"]["ppdm_r4"]["bytes"]
  c = make_config(args.task, "full3d", store, args)
  mult = spatial_multiple(c)
  if len(set(mult)) != 1:
    raise ValueError(f"full3d's spatial multiple {mult} is not the same on every axis")
  max_side = args.max_crop or max(budget["ppdm"]["ppdm_r4"]["crop"])

  def bytes_of(side):
    return train_bytes(make_config(args.task, "full3d", store, args, (side,) * 3), scratch)

  side, probes = search_crop(bytes_of, budget["bytes"], mult[0], max_side)
  if side is None:
    raise SystemExit(f"full3d does not fit the budget even at {mult[0]}^3 ({probes})")
  budget["full3d"] = {"crop": [side] * 3, "multiple": mult[0], "max_side": max_side,
                      "probes": [list(p) for p in probes],
                      "bytes": dict(probes)[side]}
  return budget


def run_method(name: str, store: str, out: pathlib.Path, args: argparse.Namespace,
               budget: dict) -> dict:
  """Trains (or resumes) and evaluates one method; returns its record."""
  from jaxvol.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top

  method, factor = METHODS[name]
  info = budget["full3d"] if method == "full3d" else budget["ppdm"][name]
  crop = tuple(info["crop"])
  rec = {"task": args.task, "method": name, "factor": factor, "crop": list(crop),
         "trained_on": (f"random {crop[0]}^3 crops" if method == "full3d" else
                        f"whole training region padded to {'x'.join(map(str, crop))}"),
         "train_bytes": info["bytes"], "budget_bytes": budget["bytes"],
         "fits_budget": info["bytes"] <= budget["bytes"], "settings": settings_of(args),
         "steps": args.steps, "batch": 1, "lr": args.lr,
         "sample_steps": args.ppdm_sample_steps if method == "ppdm" else args.sample_steps,
         "sampling": ("whole region in one pass" if method == "ppdm" else
                      f"in-loop windows {crop[0]}^3, overlap {args.window_overlap:g}")}
  if not rec["fits_budget"]:
    rec["note"] = (f"its whole-region train step needs {info['bytes'] / MIB:.1f} MiB > the budget "
                   f"{budget['bytes'] / MIB:.1f} MiB: not trained")
    return rec
  config = make_config(args.task, name, store, args, crop)
  workdir = out / "runs" / args.task / name
  workdir.mkdir(parents=True, exist_ok=True)
  timing_path = workdir / "train_timing.json"
  ckpt = ckpt_lib.Checkpointer(str(workdir), with_data=False, async_save=False)
  try:
    done = ckpt.latest_step() is not None and ckpt.latest_step() >= args.steps
  finally:
    ckpt.close()
  if not (done and timing_path.is_file()):
    t0 = time.time()
    result = experiment.train(config, workdir,
                              validate=evaluate_lib.validator(config, str(workdir)))
    if result["step"] < args.steps:
      raise SystemExit(f"{name}: training stopped at step {result['step']} of {args.steps}; run "
                       f"again to resume from {workdir}")
    # Every call's records (a resumed run continues the clock): the whole run's step time.
    fileio.write_json_atomic(timing_path, {
        "train_step_s": median_step_seconds(loop.read_progress(str(workdir))),
        "train_wall_s": time.time() - t0})
  timing = json.loads(timing_path.read_text())
  summary = evaluate_lib.evaluate(config, str(workdir))
  metrics = summary["metrics"]
  rec.update({
      "psnr": metrics["psnr"]["model"], "ssim": metrics["ssim"]["model"],
      "input_psnr": metrics["psnr"].get("input"), "input_ssim": metrics["ssim"].get("input"),
      "input_baseline": summary.get("input_baseline", "scored" if "input" in metrics["psnr"]
                                    else "off"),
      "train_mean_psnr": metrics["psnr"].get("train_mean"),
      "train_mean_ssim": metrics["ssim"].get("train_mean"),
      "references": references_lib.from_summary(summary),
      "train_step_s": timing["train_step_s"], "train_wall_s": timing.get("train_wall_s"),
      "sample_s": summary["seconds_per_volume"], "sample_compile_s": summary["compile_seconds"],
      "n_eval_volumes": summary["n_volumes"],
      "eval_shapes": [[b - a for a, b in box] for box in summary["boxes"].values()],
      "eval_region": summary["region"], "train_region": summary["train_region"],
      "split": summary["split"], "mask": summary["mask"],
      "checkpoint_step": summary["checkpoint_step"],
      "validation": loop.read_validation(str(workdir)), "workdir": str(workdir)})
  return rec


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def table(records, budget: dict) -> str:
  lines = ["| method | trained on | compiled train MiB | / budget | PSNR (dB) | SSIM "
           "| step | train step (s) | sample (s/volume) | sampling |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  first = records[0] if records else {}
  if first.get("input_psnr") is not None:
    lines.append(f"| input (no model) | - | - | - | {first['input_psnr']:.2f} "
                 f"| {first['input_ssim']:.4f} | - | - | - | - |")
  elif records:
    lines.append("| input (no model) | - | - | - | not comparable | - | - | - | - | - |")
  mean = next((r for r in records if r.get("train_mean_psnr") is not None), None)
  if mean is not None:
    lines.append(f"| training-target mean (ignores the input) | - | - | - "
                 f"| {mean['train_mean_psnr']:.2f} | {mean['train_mean_ssim']:.4f} | - | - | - "
                 "| - |")
  refs = next((r["references"] for r in records if r.get("references")), {})
  for name, entry in refs.items():
    lines.append(f"| {references_lib.table_label(name, entry)} | - | - | - | {entry['psnr']:.2f} "
                 f"| {entry['ssim']:.4f} | - | - | - | - |")
  for r in records:
    label = f"ppdm r={r['factor']}" if r["factor"] > 1 else "full3d"
    if "psnr" not in r:
      label += " (does not fit M: not trained)"
    lines.append(
        f"| {label} | {r['trained_on']} | {r['train_bytes'] / MIB:.1f} "
        f"| {r['train_bytes'] / budget['bytes']:.2f} | {_fmt(r.get('psnr'), '.2f')} "
        f"| {_fmt(r.get('ssim'), '.4f')} | {_fmt(r.get('checkpoint_step'), 'd')} "
        f"| {_fmt(r.get('train_step_s'), '.3f')} "
        f"| {_fmt(r.get('sample_s'), '.2f')} | {r['sampling']}, {r['sample_steps']} steps |")
  return "\n".join(lines)


def markdown(result: dict) -> str:
  s, b, m = result["settings"], result["budget"], result["machine"]
  probes = ", ".join(f"{side}^3: {by / MIB:.1f}" for side, by in b["full3d"]["probes"])
  machine_line = (f"{m['platform']} ({m['device']}, {m['cpu_count']} cores, {m['processor']}), "
                  f"1 device, jax {m['jax']}")
  if "load_average_at_start" in m:
    machine_line += f"; load average at start {m['load_average_at_start']} (a shared machine)"
  return (
      f"# PPDM on whole volumes vs full3d on crops at one memory budget ({s['task']})\n\n"
      f"Budget M = compiled train-step bytes per device of PPDM r=4 on the whole training region "
      f"({'x'.join(map(str, b['ppdm']['ppdm_r4']['crop']))} padded, batch 1): "
      f"**{b['bytes'] / MIB:.1f} MiB** (XLA memory analysis: temp + arguments + outputs - "
      f"aliased; AdamW moments and EMA included). full3d gets the largest cube (a multiple of "
      f"{b['full3d']['multiple']}) whose compiled train step fits M: "
      f"**{b['full3d']['crop'][0]}^3** (probes, MiB: {probes}).\n\n"
      f"Same for every method: U-Net base width {s['width']}, mults {tuple(s['mults'])}, 1 res "
      f"block per level, no attention, float32; batch 1, {s['steps']} steps, lr {s['lr']:g} "
      f"(warm-up 5%), random flips. Sampling: PPDM {s['ppdm_sample_steps']} bridge steps on the "
      f"whole region; full3d {s['sample_steps']} DDIM steps in in-loop windows of its crop "
      f"(overlap {s['window_overlap']:g}).\n\n"
      + (f"Checkpoint (column step): the best of {s['validations']} validations by PSNR on the "
         f"task's validation set, every {s['steps'] // s['validations']} steps.\n\n"
         if s.get("validations") else
         "Checkpoint: the last step (measured before the runs validated).\n\n") +
      f"Split: {result['split']}.\n\nMachine: {machine_line}.\n\n"
      f"{table(result['records'], b)}\n\n"
      "PSNR/SSIM: jaxvol.eval.evaluate on the whole held-out region, original units, inside the "
      "target's body mask, data range = the target preset's hi - lo. Train step: median seconds "
      "per step of the loop's progress records (first window excluded). Sample: the evaluation "
      "summary's seconds_per_volume (compilation excluded).\n")


def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout,
                      force=True)
  for noisy in ("absl", "orbax", "jax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  # The train step compiled by the budget search is compiled again by the loop: a cache hit.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(out / "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  json_path, md_path = out / "memory_budget.json", out / "memory_budget.md"
  old = json.loads(json_path.read_text()) if json_path.is_file() else {}
  store = str(pathlib.Path(args.store).resolve()) if args.store else experiment.task_store(
      out, args.task, args.source)
  start = time.time()
  budget = find_budget(store, out, args, old.get("budget"))
  settings = settings_of(args)
  keep = [r for r in old.get("records", []) if r.get("settings") == settings]
  result = {"settings": settings, "machine": old.get("machine") if keep else machine(),
            "split": SPLITS[args.task], "store": store, "budget": budget, "records": keep}
  fileio.write_json_atomic(str(json_path), result)
  print(f"budget M = {budget['bytes'] / MIB:.1f} MiB; full3d crop {budget['full3d']['crop']}; "
        + "; ".join(f"{k} whole {v['bytes'] / MIB:.1f} MiB" for k, v in budget["ppdm"].items()),
        flush=True)
  for name in [n for n in METHODS if n in args.methods]:
    if any(r["method"] == name for r in result["records"]):
      print(f"-- {name}: already in {json_path}, skipped", flush=True)
      continue
    t0 = time.time()
    rec = run_method(name, store, out, args, budget)
    result["records"] = [r for r in result["records"] if r["method"] != name] + [rec]
    result["records"].sort(key=lambda r: list(METHODS).index(r["method"]))
    fileio.write_json_atomic(str(json_path), result)
    print(f"-- {name}: PSNR {_fmt(rec.get('psnr'), '.2f')} dB, SSIM {_fmt(rec.get('ssim'), '.4f')}"
          f" ({time.time() - t0:.0f} s, elapsed {time.time() - start:.0f} s)", flush=True)
  md = markdown(result)
  fileio.write_text_atomic(str(md_path), md)
  print(md)
  return result


if __name__ == "__main__":
  main()
