"""Learned vs classical: does training a model beat what a user gets without training?

Usage::

  python experiments/learned_vs_classical.py --out DIR [--tasks demo,pet_denoise,ct_denoise,mri_t1_t2]
      [--methods ppdm,regression,sparse] [--seeds 0,1,2] [--steps N] [--validate-every K]
      [--patience P] [--source ../shared/data] [--set KEY=VALUE ...] [--tag NAME]
  python experiments/learned_vs_classical.py --out DIR --merge OTHER_DIR [--merge ...]

For every task, method and seed: train the task's CPU recipe (`recipe`: the packaged config's
`cpu,heldout` variant, or `demo` for the quick start's phantom, with the settings below) through
the library's loop with validation every K steps on the task's validation set (disjoint from the
training crops and the test voxels: jaxvol.data.tasks, the phantom's `val`
subject), keep the best checkpoint by validation PSNR (stopping after P validations without
improvement), then evaluate THAT checkpoint on the WHOLE held-out region of the test split
(windows as the method samples) through jaxvol.eval.evaluate, beside the floors (the input; the
training targets' body mean) and the classical references (jaxvol.eval.references, tuned on the
training split's training region only; tuned once per task and shared by its runs).

Latent diffusion: `--methods ldm` (pet_denoise, mri_t1_t2) trains the task's KL autoencoder first
(configs/ldm_autoencoder.py, the same `cpu,heldout` budget and validation, method "autoencoder",
runs/TASK/autoencoder/seedS), then the latent diffusion on it (configs/ldm_*.py). The
autoencoder's row scores decode(encode(target)) on the same region: the ceiling of any model in
its latent space, not a prediction.

Recipe search: `--set KEY=VALUE` (repeatable) overrides the recipe's config after the settings
above (e.g. `--set ppdm.max_var=0.1 --set model.base_width=24`; values are Python literals, else
strings), and `--tag NAME` names that variant: its runs live in runs/TASK/METHOD-NAME/seedS and its
rows read `METHOD [NAME]`, beside the untagged recipe's. Compare variants on the table's
validation column (the validation set of training), never on the test column, when choosing one.

Inference-only variants: `--infer-set KEY=VALUE` (repeatable) with `--infer-tag NAME` trains
nothing. For each seed it takes the finished run of the trained variant (`--tag`, or the recipe),
re-scores that run's validation-selected checkpoint with the overrides (inference and evaluation
settings: `inference.flip_axes=(0,1,2)`, `eval.samples=4`, a sampler's step count) on the
validation set and on the test region (the run's `eval-NAME/`), and records it as
`METHOD [TAG+NAME]` (`METHOD [NAME]` for the recipe) with that one validation score, the column
such a variant is chosen on.

Fit against generalisation: `--fit` trains nothing. For each seed it takes the finished record
(`--tag`, or with `--infer-tag NAME` that re-scoring) and scores its selected checkpoint on the
data it trained on: split 'train', the training region (in-sample for the model; the references
were tuned there too) through jaxvol.eval.evaluate into the run's `eval_fit/` (`eval_fit-NAME/`),
with the cheap references (`FIT_REFERENCES`: the non-local denoiser's apply costs minutes per
training volume). The record keeps it as `fit`, and the task's block gains an in-sample table
beside the held-out PSNR: a model behind the input or the blur on its own training voxels
underfits; one ahead in-sample and behind held-out generalises worse than the reference.

Validation curves: every record keeps its run's validation history (validation PSNR every K
steps on the validation set), and each task's block tables it for the headline variants (mean
over seeds at each validated step); `DIR/learned_vs_classical_curves_TASK.png` plots it (band:
the seeds' range). `--val-references` trains nothing: for the records named (as `--fit`) it
scores the selected checkpoint on the validation set with the floors and the classical
references (tuned on the training region as always) into the run's `eval_val/`, so that the
curves stand beside what the references score on the same voxels.

Everything resumes: training from its checkpoints, finished runs from DIR/learned_vs_classical.json
(rewritten atomically after every run). Runs made apart (two processes, two machines: never two
writers of one DIR) are joined with `--merge`. Writes DIR/learned_vs_classical.json and
DIR/learned_vs_classical.md: one block per task with the references and floors (one number each:
they do not depend on a seed), each method's mean +- std over seeds, its validation-selected
steps, and the paired difference to the best classical reference (model - reference PSNR per
seed, mean +- std).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import pathlib
import sys
import time

import numpy as np

from jaxvol import experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = ("demo", "pet_denoise", "ct_denoise", "mri_t1_t2")
METHODS = {"demo": ("ppdm", "regression"), "pet_denoise": ("ppdm", "regression"),
           "ct_denoise": ("sparse", "regression"), "mri_t1_t2": ("ppdm", "regression")}
# (packaged config, variant) of each task; other methods swap config.method in it.
CONFIGS = {"demo": ("ppdm_pet_denoise", "demo"), "pet_denoise": ("ppdm_pet_denoise", "cpu,heldout"),
           "ct_denoise": ("sparse_ct_denoise", "cpu,heldout"),
           "mri_t1_t2": ("ppdm_mri_t1_t2", "cpu,heldout")}
# Latent diffusion (`--methods ldm`): its packaged config per task; its autoencoder
# (configs/ldm_autoencoder.py, same size token) trains first as method "autoencoder", whose
# evaluation (decode(encode(TARGET))) is the ceiling row of any latent model.
LDM_CONFIGS = {"pet_denoise": "ldm_pet_denoise", "mri_t1_t2": "ldm_mri_t1_t2"}
CEILING = "autoencoder"
# `--fit`: the in-sample evaluation's folder in a run, and its references (the cheap ones of each
# kind: a blur where the input shares the target's units, the look-up tables where it does not).
FIT_DIR = "eval_fit"
FIT_REFERENCES = {"mri_t1_t2": "lut,lut_gaussian"}
FIT_REFERENCES_DEFAULT = "gaussian"
# `--val-references`: the folder of a run's validation-set evaluation (model, floors, references).
VAL_DIR = "eval_val"
log = logging.getLogger("jaxvol")


def _read_cache(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except (OSError, json.JSONDecodeError):
    return {}


@contextlib.contextmanager
def task_references(task_dir: pathlib.Path, workdir: pathlib.Path):
  """Shares the classical references' tuning between a task's runs. The tuning reads training
  data only and is the same for every run of the task, so its cache (WORKDIR/references_tuned.json,
  entries keyed by everything the tuning read) lives once in TASK_DIR: its entries join the run's
  cache before an evaluation in the block, and the run's join it after."""
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  from jaxvol.eval.volumes import REFERENCES_CACHE  # pylint: disable=g-import-not-at-top
  shared = pathlib.Path(task_dir) / REFERENCES_CACHE
  local = pathlib.Path(workdir) / REFERENCES_CACHE

  def join(src: pathlib.Path, dst: pathlib.Path):
    entries, known = _read_cache(src), _read_cache(dst)
    if entries.keys() - known.keys():
      fileio.write_json_atomic(dst, {**known, **entries})

  join(shared, local)
  try:
    yield
  finally:  # a tuning that finished is shared even when the evaluation after it failed
    join(local, shared)


def recipe(task: str, method: str, store: str, seed: int, args: argparse.Namespace):
  """The config of one run: the task's packaged CPU variant for `method`, this experiment's
  budget (steps, cosine decay, validation, patience), whole held-out regions scored."""
  from jaxvol import config as base  # pylint: disable=g-import-not-at-top
  name, variant = CONFIGS[task]
  if method in ("ldm", CEILING):
    if task not in LDM_CONFIGS:
      raise SystemExit(f"--methods {method}: latent diffusion has configs for "
                       f"{sorted(LDM_CONFIGS)}, not {task!r}")
    name, variant = ((LDM_CONFIGS[task], variant) if method == "ldm"
                     else ("ldm_autoencoder", f"{task},{variant}"))
  c = experiment.packaged_config(name, variant)
  if method != c.method:
    base.set_method(c, method)  # with its paper's choices (WDM: x0 prediction)
    if method == "regression":
      c.model.stm = False  # STM modulates a time embedding that a one-pass regressor lacks
    if task != "ct_denoise":
      base.cpu_task_overrides(c)  # regression runs at full resolution: its own CPU budget
  c.seed = seed
  c.data.store = store
  c.data.num_workers = 0
  t = c.train
  t.steps, t.time_limit_minutes = args.steps, 0.0
  t.learning_rate = args.lr if args.lr else t.learning_rate
  t.lr_schedule, t.lr_final = args.schedule, 0.0
  t.validate_every, t.patience = args.validate_every, args.patience
  t.checkpoint_every, t.keep_checkpoints = args.validate_every, 2
  t.log_every = max(1, min(50, args.validate_every // 4))
  c.eval.max_box = ()        # the whole held-out region
  c.eval.previews = False
  c.eval.references = "auto"
  if method == CEILING:  # its input is the target: no reference or input floor means anything
    c.eval.references, c.eval.input_baseline = "", False
  for key, value in (overrides_of(args) if method != CEILING else {}).items():
    set_field(c, key, value)
  return c


def overrides_of(args_or_items, option: str = "--set") -> dict:
  """{dotted config key: value} of the `--set KEY=VALUE` options (or of a list of items)."""
  items = args_or_items.set if isinstance(args_or_items, argparse.Namespace) else args_or_items
  out = {}
  for item in items or ():
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise SystemExit(f"{option} {item!r}: expected KEY=VALUE, e.g. ppdm.max_var=0.1")
    try:
      out[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[key] = text
  return out


def set_field(c, key: str, value) -> None:
  """Sets the dotted `key` of a ConfigDict; an unknown key is an error, not a new field."""
  *path, leaf = key.split(".")
  node = c
  for part in path:
    if part not in node:
      raise SystemExit(f"--set {key}: the config has no field {part!r}")
    node = node[part]
  if leaf not in node:
    raise SystemExit(f"--set {key}: the config has no field {leaf!r}")
  old = node[leaf]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  node[leaf] = value


def run_one(task: str, method: str, seed: int, store: str, out: pathlib.Path,
            args: argparse.Namespace) -> dict:
  """Trains (or resumes) one run with validation, evaluates its best checkpoint; its record."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  c = recipe(task, method, store, seed, args)
  if method == "ldm":  # the seed's autoencoder run (untagged: a --set variant of the diffusion
    #                    keeps it)
    ae = out / "runs" / task / CEILING / f"seed{seed}"
    if not (ae / "validation.jsonl").is_file():
      raise SystemExit(f"ldm seed {seed}: its autoencoder {ae} has not been trained")
    c.ldm.autoencoder_workdir = str(ae)
  tag = args.tag if method != CEILING else ""
  workdir = out / "runs" / task / (method + (f"-{tag}" if tag else "")) / f"seed{seed}"
  workdir.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  result = experiment.train(c, workdir, validate=evaluate.validator(c, str(workdir)))
  trained = time.time() - t0
  with task_references(out / "runs" / task, workdir):
    summary = evaluate.evaluate(c, str(workdir))
  progress = loop.read_progress(str(workdir))
  return {"task": task, "method": method, "tag": tag, "seed": seed, "steps": result["step"],
          "stopped": result.get("stopped"), "train_seconds": progress[-1]["seconds"]
          if progress else None, "wall_seconds": trained, **scored(summary),
          "validation": loop.read_validation(str(workdir)), "settings": settings_of(args, method)}


def scored(summary: dict) -> dict:
  """The fields of a record that its evaluation summary gives (checkpoint, metrics, references,
  where and how it was scored)."""
  m = summary["metrics"]
  return {"best_step": summary["checkpoint_step"], "checkpoint": summary["checkpoint"],
          "metrics": {k: m[k] for k in ("psnr", "ssim", "hfen")},
          "references": {n: e["params"] for n, e in summary.get("references", {}).items()},
          "best_reference": summary.get("best_reference"),
          "region": summary["region"], "split": summary["split"], "mask": summary["mask"],
          "data_range": summary["data_range"]}


def infer_tag(args: argparse.Namespace) -> str:
  """The tag of an inference-only variant's records: TAG+NAME, or NAME for the recipe."""
  return f"{args.tag}+{args.infer_tag}" if args.tag else args.infer_tag


def reevaluate_one(task: str, method: str, seed: int, store: str, out: pathlib.Path,
                   args: argparse.Namespace, trained: dict) -> dict:
  """An inference-only variant of the finished run `trained` (its record): its selected
  checkpoint scored with the `--infer-set` overrides on the validation set and the test region."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  c = recipe(task, method, store, seed, args)
  for key, value in overrides_of(args.infer_set, "--infer-set").items():
    set_field(c, key, value)
  c.eval.checkpoint = str(trained["best_step"])
  workdir = out / "runs" / task / (method + (f"-{args.tag}" if args.tag else "")) / f"seed{seed}"
  params, step = volumes.load_params(c, str(workdir))
  validation = dict(evaluate.validator(c, str(workdir))(params, step), step=step)
  del params
  with task_references(out / "runs" / task, workdir):
    summary = evaluate.evaluate(c, str(workdir), out_name=f"eval-{args.infer_tag}")
  return {**{k: trained[k] for k in ("task", "method", "seed", "steps", "stopped",
                                     "train_seconds", "wall_seconds")},
          "tag": infer_tag(args), **scored(summary), "validation": [validation],
          "settings": {**trained["settings"], "infer_set": list(args.infer_set),
                       "infer_tag": args.infer_tag}}


def trained_tag(record: dict) -> str:
  """The `--tag` of the training run behind a record (an inference-only variant's TAG+NAME
  re-scores the run TAG; NAME alone, the recipe's)."""
  tag = record.get("tag") or ""
  if record["settings"].get("infer_tag"):
    tag = tag.rpartition("+")[0] if "+" in tag else ""
  return tag


def workdir_of(out: pathlib.Path, record: dict) -> pathlib.Path:
  """The workdir of the training run behind a record."""
  tag = trained_tag(record)
  name = record["method"] + (f"-{tag}" if tag else "")
  return pathlib.Path(out) / "runs" / record["task"] / name / f"seed{record['seed']}"


def args_of(record: dict, out) -> argparse.Namespace:
  """This script's arguments that made `record` (its config is rebuilt from them by `recipe`;
  an inference-only variant's --infer-set and --infer-tag included)."""
  st = record["settings"]
  argv = ["--out", str(out), "--tasks", record["task"], "--steps", str(st["steps"]),
          "--validate-every", str(st["validate_every"]), "--patience", str(st["patience"]),
          "--schedule", st.get("schedule", "constant")]
  if st.get("lr"):
    argv += ["--lr", str(st["lr"])]
  for item in st.get("set", ()):
    argv += ["--set", item]
  if trained_tag(record):
    argv += ["--tag", trained_tag(record)]
  if st.get("infer_tag"):
    argv += [a for item in st.get("infer_set", ()) for a in ("--infer-set", item)]
    argv += ["--infer-tag", st["infer_tag"]]
  return parse_args(argv)


def score_selected(record: dict, store: str, out: pathlib.Path, folder: str, elsewhere) -> dict:
  """A finished record's selected checkpoint scored on other data: the record's config (its
  inference-only overrides included) with `elsewhere(config) -> config` choosing the split, region
  and references, evaluated into the run's `folder` (`folder-INFER_TAG` for an inference-only
  variant); {"split", "region", "step", "references": {name: tuned parameters}, "psnr":
  {prediction: dB}, "ssim": {...}}. Reads a finished evaluation there instead of scoring again."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  args = args_of(record, out)
  c = recipe(record["task"], record["method"], store, record["seed"], args)
  for key, value in overrides_of(args.infer_set, "--infer-set").items():
    set_field(c, key, value)
  c.eval.checkpoint = str(record["best_step"])
  c = elsewhere(c)
  workdir = workdir_of(out, record)
  name = folder + (f"-{args.infer_tag}" if args.infer_tag else "")
  path = workdir / name / "summary.json"
  if path.is_file():
    summary = json.loads(path.read_text())
  else:
    with task_references(pathlib.Path(out) / "runs" / record["task"], workdir):
      summary = evaluate.evaluate(c, str(workdir), out_name=name)
  if summary["checkpoint_step"] != record["best_step"]:
    raise SystemExit(f"{path}: scored step {summary['checkpoint_step']}, the record selected "
                     f"{record['best_step']}; remove {workdir / name} to score again")
  m = summary["metrics"]
  return {"split": summary["split"], "region": summary["region"], "step": record["best_step"],
          "references": {n: e["params"] for n, e in summary.get("references", {}).items()},
          "psnr": m["psnr"], "ssim": m["ssim"]}


def fit_one(record: dict, store: str, out: pathlib.Path) -> dict:
  """The in-sample scores of a finished record's selected checkpoint (module docstring, `--fit`):
  the training split's training region, with the cheap references (`score_selected`)."""
  def in_sample(c):
    c.eval.split = c.data.train_split
    c.data.eval_region = c.data.train_region
    c.eval.references = FIT_REFERENCES.get(record["task"], FIT_REFERENCES_DEFAULT)
    return c
  return score_selected(record, store, out, FIT_DIR, in_sample)


def val_references_one(record: dict, store: str, out: pathlib.Path) -> dict:
  """The validation-set scores of a finished record's selected checkpoint, the floors and the
  classical references (module docstring, `--val-references`; `score_selected`)."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  return score_selected(record, store, out, VAL_DIR, evaluate.validation_config)


def settings_of(args: argparse.Namespace, method: str = "") -> dict:
  """The settings a run depends on (the autoencoder of `ldm` takes no --set: it is shared)."""
  settings = {k: getattr(args, k) for k in ("steps", "validate_every", "patience", "lr", "schedule")}
  if args.set and method != CEILING:
    settings["set"] = list(args.set)
  return settings


def variant_of(record: dict) -> str:
  """A record's row name: its method, and its `--tag` in brackets."""
  return record["method"] + (f" [{record['tag']}]" if record.get("tag") else "")


def best_validation(record: dict) -> float | None:
  vals = [v["psnr"] for v in record.get("validation", ()) if "psnr" in v]
  return max(vals) if vals else None


def _mean_std(values, spec: str = ".2f") -> str:
  """'mean ± std' (population std over the seeds), or the value alone for one seed."""
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  if len(values) == 1:
    return format(values[0], spec)
  return f"{format(float(np.mean(values)), spec)} ± {format(float(np.std(values)), spec)}"


def chosen_variants(rows: list[dict]) -> dict[str, str]:
  """{method: its headline variant}: among the method's variants run with at least two seeds (a
  spread; the most-seeded ones where none has two), the one with the best mean validation PSNR
  (the validation set of training, never the test column)."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in rows if r["method"] != CEILING):
    variants = {}
    for r in rows:
      if r["method"] == method:
        variants.setdefault(variant_of(r), []).append(r)
    enough = min(2, max(len(v) for v in variants.values()))
    out[method] = max((name for name, v in variants.items() if len(v) >= enough),
                      key=lambda name: np.mean([best_validation(r) or -np.inf
                                                for r in variants[name]]))
  return out


def tasks_of(records: list[dict]) -> list[str]:
  """The tasks of `records` in TASKS order (a table's blocks do not move when runs merge)."""
  present = dict.fromkeys(r["task"] for r in records)
  return sorted(present, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))


def best_reference_of(record: dict) -> str | None:
  """The classical reference with the best test PSNR (one number per task: no seed)."""
  psnr = record["metrics"]["psnr"]
  refs = [n for n in psnr if n not in ("model", "input", "train_mean")]
  return max(refs, key=lambda n: psnr[n]) if refs else None


def headline(records: list[dict]) -> str:
  """One row per task and method: the best classical reference, and each method's variant
  chosen on validation (`chosen_variants`) with mean ± std over its seeds and the paired
  difference to that reference."""
  lines = ["| task | prediction | seeds | PSNR (dB) | SSIM | PSNR - best reference | "
           "selected steps |", "|---|---|---|---|---|---|---|"]
  commands = []
  for task in tasks_of(records):
    rows = [r for r in records if r["task"] == task]
    first = next((r for r in rows if r["method"] != CEILING), None)
    if first is None:
      continue
    best_ref = best_reference_of(first)
    m = first["metrics"]
    if best_ref:
      label = prediction_label(best_ref, first["references"])
      lines.append(f"| {task} | {label} | - | {m['psnr'][best_ref]:.2f} | "
                   f"{m['ssim'][best_ref]:.4f} | - | - |")
    if "input" in m["psnr"]:
      lines.append(f"| {task} | input (floor) | - | {m['psnr']['input']:.2f} | "
                   f"{m['ssim']['input']:.4f} | - | - |")
    for variant in chosen_variants(rows).values():
      rs = [r for r in rows if variant_of(r) == variant]
      diff = ([r["metrics"]["psnr"]["model"] - r["metrics"]["psnr"][best_ref] for r in rs]
              if best_ref else [])
      lines.append(f"| {task} | {variant} | {len(rs)} | "
                   f"{_mean_std([r['metrics']['psnr']['model'] for r in rs])} | "
                   f"{_mean_std([r['metrics']['ssim']['model'] for r in rs], '.4f')} | "
                   f"{_mean_std(diff)} | "
                   f"{', '.join(str(r['best_step']) for r in rs)} |")
      commands.append(f"- {task} / {variant}: `{command_of(rs)}`")
  return "\n".join(lines + [""] + commands)


def markdown(records: list[dict], args: argparse.Namespace) -> str:
  """The headline (`headline`), then one block per task: floors, references, every variant of
  every method (mean ± std over seeds)."""
  lines = ["# Learned vs classical", "",
           "Each learned row: the checkpoint chosen by validation PSNR during training (validation "
           "set disjoint from training and test), scored on the WHOLE held-out region of the test "
           "split; mean ± std over the seeds listed. Classical references tuned on the training "
           "split's training region only. Metrics in original units inside the target's body mask, "
           "PSNR/SSIM over the target preset's range; training minutes: training wall time "
           "(validation and compilation excluded) on the machine that ran it.", "",
           "## Headline", "",
           "Per task: the best classical reference (on the test region), the input, and for each "
           "method the variant with the best mean validation PSNR among those run with at least "
           "two seeds.", "", headline(records), ""]
  for task in tasks_of(records):
    rows = [r for r in records if r["task"] == task]
    first = next((r for r in rows if r["method"] != CEILING), rows[0])
    lines += [f"## {task}", "", f"Scored: split {first['split']!r}, region {first['region']}, "
              f"mask {first['mask']}, data range {first['data_range']}.", "",
              "| prediction | seeds | PSNR (dB) | SSIM | HFEN | selected steps (of trained) | "
              "validation PSNR | training min | PSNR - best reference |",
              "|---|---|---|---|---|---|---|---|---|"]
    shared = first["metrics"]["psnr"]
    refs = [n for n in shared if n not in ("model", "input", "train_mean")]
    best_ref = best_reference_of(first)
    for name in ("input", "train_mean", *refs):
      if name in shared:
        label = prediction_label(name, first["references"])
        lines.append(f"| {label}{' **(best reference)**' if name == best_ref else ''} | - | "
                     f"{shared[name]:.2f} | {first['metrics']['ssim'][name]:.4f} | "
                     f"{first['metrics']['hfen'][name]:.4f} | - | - | - | - |")
    for variant in dict.fromkeys(variant_of(r) for r in rows):
      rs = [r for r in rows if variant_of(r) == variant]
      diff = [r["metrics"]["psnr"]["model"] - r["metrics"]["psnr"][best_ref] for r in rs] \
          if best_ref and rs[0]["method"] != CEILING else []
      steps = ", ".join(f"{r['best_step']} ({r['steps']})" for r in rs)
      ssim = _mean_std([r["metrics"]["ssim"]["model"] for r in rs], ".4f")
      hfen = _mean_std([r["metrics"]["hfen"]["model"] for r in rs], ".4f")
      minutes = _mean_std([r["train_seconds"] / 60 if r.get("train_seconds") else None
                           for r in rs], ".1f")
      label = (f"{variant} (ceiling of the latent models: decode(encode(TARGET)), not a "
               "prediction)" if rs[0]["method"] == CEILING else variant)
      lines.append(f"| {label} | {len(rs)} | "
                   f"{_mean_std([r['metrics']['psnr']['model'] for r in rs])} | {ssim} | {hfen} | "
                   f"{steps} | {_mean_std([best_validation(r) for r in rs])} | {minutes} | "
                   f"{_mean_std(diff)} |")
    lines.append("")
    lines += fit_table(rows)
    lines += curves_table(rows)
    for variant in dict.fromkeys(variant_of(r) for r in rows):
      lines.append(f"Command ({variant}): `{command_of([r for r in rows if variant_of(r) == variant])}`")
    lines.append("")
  return "\n".join(lines)


def validation_set_of(record: dict) -> tuple[str, dict | None]:
  """(split, region) of the validation set a record's run was selected on (its recipe's)."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import volumes  # pylint: disable=g-import-not-at-top
  args = args_of(record, "DIR")
  c = recipe(record["task"], record["method"], "STORE", record["seed"], args)
  val = evaluate.validation_config(c)
  return val.eval.split, volumes.plain_region(val.data.eval_region)


def curve_of(records: list[dict]) -> dict[int, list[float]]:
  """{validated step: [validation PSNR of each record that validated there]}."""
  out: dict[int, list[float]] = {}
  for r in records:
    for v in r.get("validation", ()):
      if "psnr" in v:
        out.setdefault(int(v["step"]), []).append(float(v["psnr"]))
  return dict(sorted(out.items()))


def val_reference_lines(rows: list[dict]) -> tuple[dict | None, list[tuple[str, float]]]:
  """(the `--val-references` scores of a task, [(label, validation PSNR)] of its input and best
  classical reference on the validation set); (None, []) when none was scored."""
  scored = next((r for r in rows if r.get("val_scores")), None)
  if scored is None:
    return None, []
  v = scored["val_scores"]
  refs = [n for n in v["psnr"] if n not in ("model", "input", "train_mean")]
  names = (["input"] if "input" in v["psnr"] else []) + (
      [max(refs, key=lambda n: v["psnr"][n])] if refs else [])
  return v, [(prediction_label(n, v["references"]), v["psnr"][n]) for n in names]


def curve_groups(rows: list[dict]) -> dict[str, list[dict]]:
  """{variant: its records} whose validation histories a task's curves show: each headline
  variant's (`chosen_variants`), or for an inference-only variant (one validation of a finished
  run) the training run it re-scored, whose history it is."""
  groups = {}
  for variant in chosen_variants(rows).values():
    rs = [r for r in rows if variant_of(r) == variant]
    if rs and rs[0].get("settings", {}).get("infer_tag"):
      trained = {"method": rs[0]["method"], "tag": trained_tag(rs[0])}
      variant = variant_of(trained)
      rs = [r for r in rows if variant_of(r) == variant]
    rs = [r for r in rs if r.get("validation")]
    if rs:
      groups[variant] = rs
  return groups


def curves_table(rows: list[dict]) -> list[str]:
  """A task's validation curves: for each headline variant (`chosen_variants`), the validation
  PSNR at every validated step (mean over the seeds that validated there), beside the input's
  and the best reference's on the same validation set where `--val-references` scored them."""
  groups = curve_groups(rows)
  if not groups:
    return []
  split, region = validation_set_of(next(iter(groups.values()))[0])
  curves = {v: curve_of(rs) for v, rs in groups.items()}
  steps = sorted({s for c in curves.values() for s in c})
  lines = [f"Validation curves of the headline variants (of the run an inference-only variant "
           f"re-scored): validation PSNR (dB) on split {split!r}, "
           f"region {region} (the set checkpoints are chosen on), mean over the seeds that "
           "validated at that step (seeds in brackets); plotted in "
           f"`learned_vs_classical_curves_{rows[0]['task']}.png`.", ""]
  scores, refs = val_reference_lines(rows)
  if scores:
    lines += ["On the same validation set (`--val-references`): " + "; ".join(
        f"{label} {psnr:.2f} dB" for label, psnr in refs) + ".", ""]
  lines += ["| step | " + " | ".join(f"{v} ({len(groups[v])})" for v in curves) + " |",
            "|---:|" + "---:|" * len(curves)]
  for step in steps:
    cells = [f"{np.mean(c[step]):.2f}" + (f" ({len(c[step])})" if len(c[step]) != len(groups[v])
                                          else "") if step in c else "" for v, c in curves.items()]
    lines.append(f"| {step} | " + " | ".join(cells) + " |")
  return lines + [""]


def write_curves(records: list[dict], out: pathlib.Path) -> list[pathlib.Path]:
  """One figure per task, OUT/learned_vs_classical_curves_TASK.png: validation PSNR against the
  training step for each headline variant (line: mean over seeds; band: their range), and the
  input's and best reference's validation PSNR where `--val-references` scored them."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  for task in tasks_of(records):
    rows = [r for r in records if r["task"] == task]
    groups = curve_groups(rows)
    if not groups:
      continue
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant, rs in groups.items():
      c = curve_of(rs)
      x = np.array(list(c))
      ax.plot(x, [np.mean(v) for v in c.values()], marker=".", label=f"{variant} ({len(rs)})")
      ax.fill_between(x, [min(v) for v in c.values()], [max(v) for v in c.values()], alpha=0.2)
    for label, psnr in val_reference_lines(rows)[1]:  # the input dotted, the reference dashed
      style = ":" if label == prediction_label("input", {}) else "--"
      ax.axhline(psnr, color="k", linestyle=style, linewidth=1, label=label)
    split, region = validation_set_of(next(iter(groups.values()))[0])
    ax.set(xlabel="training step", ylabel="validation PSNR (dB)",
           title=f"{task}: validation split {split!r}, region {region}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(out) / f"learned_vs_classical_curves_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def fit_table(rows: list[dict]) -> list[str]:
  """A task's in-sample table (`--fit`): the records that have one, beside their held-out PSNR;
  [] when none has."""
  fitted = [r for r in rows if r.get("fit")]
  if not fitted:
    return []
  f0 = fitted[0]["fit"]
  lines = [f"In-sample (`--fit`): the selected checkpoint scored on the data it trained on (split "
           f"{f0['split']!r}, region {f0['region']}; the references were tuned there), beside "
           "the held-out PSNR of the table above.", "",
           "| prediction | seeds | in-sample PSNR (dB) | in-sample SSIM | held-out PSNR (dB) | "
           "in-sample - held-out (dB) |", "|---|---|---|---|---|---|"]
  held = fitted[0]["metrics"]["psnr"]
  for name in f0["psnr"]:
    if name != "model":
      label = prediction_label(name, f0["references"])
      out_of = held.get(name)
      lines.append(f"| {label} | - | {f0['psnr'][name]:.2f} | {f0['ssim'][name]:.4f} | "
                   f"{'-' if out_of is None else format(out_of, '.2f')} | "
                   f"{'-' if out_of is None else format(f0['psnr'][name] - out_of, '.2f')} |")
  for variant in dict.fromkeys(variant_of(r) for r in fitted):
    rs = [r for r in fitted if variant_of(r) == variant]
    gap = [r["fit"]["psnr"]["model"] - r["metrics"]["psnr"]["model"] for r in rs]
    lines.append(f"| {variant} (seeds {', '.join(str(r['seed']) for r in rs)}) | {len(rs)} | "
                 f"{_mean_std([r['fit']['psnr']['model'] for r in rs])} | "
                 f"{_mean_std([r['fit']['ssim']['model'] for r in rs], '.4f')} | "
                 f"{_mean_std([r['metrics']['psnr']['model'] for r in rs])} | "
                 f"{_mean_std(gap)} |")
  return lines + [""]


def prediction_label(name: str, params: dict) -> str:
  """A table's name for a floor or a classical reference (`params`: {reference: its tuned
  parameters}, as the records keep them)."""
  from jaxvol.eval import references  # pylint: disable=g-import-not-at-top
  floors = {"input": "input (floor)", "train_mean": "training-target body mean (floor)"}
  return floors.get(name) or references.table_label(
      name, {"label": references.LABELS.get(name, name), "params": params.get(name, {})})


def command_of(records: list[dict]) -> str:
  """The command line that makes these records (a task's methods, seeds and settings)."""
  st = records[0]["settings"]
  parts = ["python experiments/learned_vs_classical.py --out DIR",
           f"--tasks {','.join(dict.fromkeys(r['task'] for r in records))}",
           f"--methods {','.join(dict.fromkeys(r['method'] for r in records))}",
           f"--seeds {','.join(str(x) for x in sorted({r['seed'] for r in records}))}",
           f"--steps {st['steps']}", f"--validate-every {st['validate_every']}",
           f"--patience {st['patience']}"]
  if st.get("lr"):
    parts.append(f"--lr {st['lr']:g}")
  if st.get("schedule", "constant") != "constant":
    parts.append(f"--schedule {st['schedule']}")
  parts += [f"--set {item}" for item in st.get("set", ())]
  tag = trained_tag(records[0])
  if tag:
    parts.append(f"--tag {tag}")
  if st.get("infer_tag"):
    parts += [f"--infer-set {item}" for item in st.get("infer_set", ())]
    parts.append(f"--infer-tag {st['infer_tag']}")
  return " ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True)
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--methods", default="", help="default: each task's (METHODS)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=6000)
  p.add_argument("--validate-every", type=int, default=500)
  p.add_argument("--patience", type=int, default=4)
  p.add_argument("--lr", type=float, default=0.0, help="0: the recipe's")
  p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
  p.add_argument("--source", default=None, help="the shared volumes (default ../shared/data)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field of the recipe (repeatable)")
  p.add_argument("--tag", default="", help="the name of this --set variant (its rows and runs)")
  p.add_argument("--infer-set", action="append", default=[], metavar="KEY=VALUE",
                 help="an inference-only variant of finished runs (module docstring; repeatable)")
  p.add_argument("--infer-tag", default="", help="the name of the --infer-set variant")
  p.add_argument("--fit", action="store_true",
                 help="score finished records' selected checkpoints on their training data "
                      "(module docstring), training nothing")
  p.add_argument("--val-references", action="store_true",
                 help="score finished records' selected checkpoints, the floors and the "
                      "references on the validation set (module docstring), training nothing")
  p.add_argument("--report-only", action="store_true",
                 help="rewrite DIR/learned_vs_classical.md from its JSON, training nothing")
  p.add_argument("--merge", action="append", default=[], metavar="JSON_OR_DIR",
                 help="add the records of another run's learned_vs_classical.json (or its DIR) "
                      "to DIR's, a record replacing DIR's of the same task, method, tag and "
                      "seed; trains nothing (repeatable, applied in order)")
  args = p.parse_args(argv)
  args.tasks = [t for t in args.tasks.split(",") if t]
  unknown = [t for t in args.tasks if t not in TASKS]
  if unknown:
    p.error(f"unknown task(s) {unknown}; known: {TASKS}")
  args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
  args.methods = [m for m in args.methods.split(",") if m]
  if args.set and not args.tag:
    p.error("--set needs --tag NAME (the variant's runs and rows are kept apart by it)")
  if args.fit and args.val_references:
    p.error("--fit and --val-references: one at a time")
  if bool(args.infer_set) != bool(args.infer_tag) and not (args.fit or args.val_references):
    p.error("--infer-set and --infer-tag NAME go together")
  return args


def _key(record: dict) -> tuple:
  return record["task"], record["method"], record.get("tag", ""), record["seed"]


def _records_at(path: pathlib.Path) -> list[dict]:
  if path.is_dir():
    path = path / "learned_vs_classical.json"
  if not path.is_file():
    raise SystemExit(f"--merge: no learned_vs_classical.json at {path}")
  return json.loads(path.read_text())["records"]


def merge_records(records: list[dict], *others: list[dict]) -> list[dict]:
  """`records` with each of `others`' records added in turn; a record replaces an earlier one of
  the same task, method, tag and seed (the one key the table groups by), keeping the order."""
  out = list(records)
  for batch in others:
    for rec in batch:
      out = [r for r in out if _key(r) != _key(rec)] + [rec]
  return out


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  for noisy in ("absl", "orbax"):  # Orbax logs every save's internals at INFO
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "learned_vs_classical.json"
  records = json.loads(path.read_text())["records"] if path.exists() else []

  def save():
    fileio.write_json_atomic(str(path), {"records": records})
    fileio.write_text_atomic(str(out / "learned_vs_classical.md"), markdown(records, args))
    write_curves(records, out)

  if args.merge:
    records = merge_records(records, *(_records_at(pathlib.Path(m)) for m in args.merge))
  if args.report_only or args.merge:
    save()
    return records
  for task in args.tasks:
    store = experiment.task_store(out, task, args.source)
    methods = list(args.methods or METHODS[task])
    if "ldm" in methods and CEILING not in methods:
      methods.insert(methods.index("ldm"), CEILING)  # its autoencoder trains first
    for method in methods:
      for seed in args.seeds:
        if args.fit or args.val_references:
          key = (task, method, infer_tag(args) if args.infer_tag else args.tag, seed)
          rec = next((r for r in records if _key(r) == key), None)
          option = "--fit" if args.fit else "--val-references"
          if rec is None:
            raise SystemExit(f"{option}: no finished record {task}/{method}"
                             f"{f' [{key[2]}]' if key[2] else ''} seed {seed} in {path}")
          field, score = ("fit", fit_one) if args.fit else ("val_scores", val_references_one)
          if field not in rec:
            rec = {**rec, field: score(rec, store, out)}
            records = [r for r in records if _key(r) != key] + [rec]
            save()
          continue
        if args.infer_tag:
          trained = next((r for r in records if _key(r) == (task, method, args.tag, seed)
                          and r["settings"] == settings_of(args, method)), None)
          if trained is None:
            raise SystemExit(f"--infer-tag: no finished run {task}/{method}"
                             f"{f' [{args.tag}]' if args.tag else ''} seed {seed} with these "
                             f"settings in {path}")
          key = (task, method, infer_tag(args), seed)
          if not any(_key(r) == key and r["settings"].get("infer_set") == list(args.infer_set)
                     for r in records):
            rec = reevaluate_one(task, method, seed, store, out, args, trained)
            records = [r for r in records if _key(r) != key] + [rec]
            save()
          continue
        key = (task, method, args.tag if method != CEILING else "", seed)
        if any(_key(r) == key and r["settings"] == settings_of(args, method) for r in records):
          continue
        rec = run_one(task, method, seed, store, out, args)
        records = [r for r in records if _key(r) != key] + [rec]
        save()
        m = rec["metrics"]["psnr"]
        print(f"-- {task}/{method}/seed {seed}: {m['model']:.2f} dB at step {rec['best_step']} "
              f"(best reference {rec['best_reference']}: "
              f"{m.get(rec['best_reference'] or '', float('nan')):.2f} dB)", flush=True)
  if records:
    save()
  return records


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
