"""MRI T1 -> T2: where a trained model gains and loses against the intensity look-up table.

Usage::

  python experiments/mri_diagnosis.py --lvc DIR [--out DIR/mri_diagnosis] [--methods ppdm,regression]

Reads the finished `mri_t1_t2` runs of experiments/learned_vs_classical.py in DIR (their records,
their best checkpoints and the predictions their evaluation wrote to eval/nifti/) and measures,
per run:

1. **Fit against generalisation.** The model (its validation-chosen checkpoint) and the look-up
   table (+ Gaussian) scored on the TRAINING hemisphere (in-sample for both: the table was fitted
   there, the model trained there), by learned_vs_classical's `--fit` scoring (`fit_one`, written
   to the run's `eval_fit/`), beside the held-out hemisphere's
   scores. A model ahead in-sample and behind out of sample generalises worse than the table; a
   model behind in both underfits.
2. **Intensity calibration.** A look-up table from the model's prediction to the target, fitted ON
   the held-out region itself, and the same from the T1 input. Both read the held-out target: they
   are diagnostic bounds, never predictions. What the first adds to the model is what its
   intensity drift costs; the second is the ceiling of any intensity mapping of T1.
3. **Error by tissue.** Bias (prediction - target) and RMSE of the model and the table + Gaussian
   in three bands of the held-out target's intensity inside the body mask (terciles: dark, middle,
   bright T2).
4. **The shift between the hemispheres.** Percentiles of T2 inside the body mask of the training
   and the held-out region, the fraction of training voxels brighter than the held-out region's
   99th percentile (the subject's stroke lesion lies in the training hemisphere), and the median
   T1 and T2 of white-matter-like voxels in slabs along RAS x (`white_matter_profile`).

Every number is in the target's original units, inside the target's body mask
(jaxvol.eval.metrics.body_mask), PSNR/SSIM over the data range the evaluation used. Prints a
table and writes OUT/mri_diagnosis.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys

import numpy as np

import learned_vs_classical as lvc  # the sibling script (experiments/ is the script's path)

TASK = "mri_t1_t2"


def band_errors(preds: dict, target, mask) -> list[dict]:
  """Bias and RMSE of each prediction in the terciles of the target inside `mask`."""
  t = target[mask]
  edges = np.percentile(t, [0, 100 / 3, 200 / 3, 100])
  rows = []
  for i, name in enumerate(("dark", "middle", "bright")):
    sel = (t >= edges[i]) & ((t <= edges[i + 1]) if i == 2 else (t < edges[i + 1]))
    row = {"band": name, "target_range": [float(edges[i]), float(edges[i + 1])],
           "voxels": int(sel.sum())}
    for pname, p in preds.items():
      d = p[mask][sel] - t[sel]
      row[f"{pname}_bias"] = float(d.mean())
      row[f"{pname}_rmse"] = float(np.sqrt(np.mean(d * d)))
    rows.append(row)
  return rows


def white_matter_profile(t1, t2, slab: int = 12) -> list[dict]:
  """Median T1 and T2 of white-matter-like voxels (T1 between its 70th and 95th percentiles
  inside T1's body mask) in slabs of `slab` voxels along axis 0 (RAS x): with T1 flat, a trend
  in T2 is an intensity gradient across the head that no mapping of T1 can know."""
  from jaxvol.eval import metrics  # pylint: disable=g-import-not-at-top
  body = metrics.body_mask(t1)
  lo, hi = np.percentile(t1[body], [70, 95])
  wm = body & (t1 > lo) & (t1 < hi)
  rows = []
  for x0 in range(0, t1.shape[0], slab):
    sel = wm[x0:x0 + slab]
    if sel.sum() >= 100:
      rows.append({"x": [x0, min(x0 + slab, t1.shape[0])], "voxels": int(sel.sum()),
                   "t1_median": float(np.median(t1[x0:x0 + slab][sel])),
                   "t2_median": float(np.median(t2[x0:x0 + slab][sel]))})
  return rows


def diagnose(record: dict, out: pathlib.Path, source) -> dict:
  from jaxvol import experiment  # pylint: disable=g-import-not-at-top
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import metrics, references  # pylint: disable=g-import-not-at-top
  args = lvc.args_of(record, out)
  store_path = experiment.task_store(out, TASK, source)
  config = lvc.recipe(TASK, record["method"], store_path, record["seed"], args)
  workdir = lvc.workdir_of(out, record)
  if not (workdir / "eval" / "references.json").is_file():
    raise SystemExit(f"{workdir}: no eval/ with the look-up tables (eval/references.json); "
                     "this run's evaluation is missing or scored no references")
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  tuned = json.loads((workdir / "eval" / "references.json").read_text())
  store = store_lib.Store(store_path)
  (subject,) = store.subjects(config.eval.split)
  sid, shape = subject["id"], tuple(subject["shape"])
  whole = tuple((0, n) for n in shape)
  t1 = store.preset(sid, "t1").inverse(store.read(sid, "t1", whole)).astype(np.float32)
  t2 = store.preset(sid, "t2").inverse(store.read(sid, "t2", whole)).astype(np.float32)
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  pred = np.asarray(nib.load(workdir / "eval" / "nifti" / f"{sid}_pred.nii.gz").dataobj,
                    np.float32)
  cut = tuple(slice(a, b) for a, b in pipeline.region_box(shape, config.data.eval_region))
  train_cut = tuple(slice(a, b) for a, b in pipeline.region_box(shape, config.data.train_region))
  data_range = float(summary["data_range"][0] if isinstance(summary["data_range"], list)
                     else summary["data_range"])
  y, x, p = t2[cut], t1[cut], pred[cut]
  mask = metrics.body_mask(y)
  lutg = references.apply(tuned["lut_gaussian"], t1)[cut]

  def scores(q):
    return {"psnr": metrics.psnr(q, y, mask, data_range), "ssim": metrics.ssim(q, y, mask, data_range)}

  oracle_model = references.LUT().apply(p, references.fit_lut([references.Pair("o", p, y)]))
  oracle_t1 = references.LUT().apply(x, references.fit_lut([references.Pair("o", x, y)]))
  held = {"model": scores(p), "lut_gaussian": scores(lutg),
          "model_recalibrated_oracle": scores(oracle_model), "t1_lut_oracle": scores(oracle_t1)}
  fit = lvc.fit_one(record, store_path, out)
  ytr = t2[train_cut]
  mtr = metrics.body_mask(ytr)
  q = [1, 25, 50, 75, 99]
  shift = {"percentiles": q, "train_t2": np.percentile(ytr[mtr], q).tolist(),
           "heldout_t2": np.percentile(y[mask], q).tolist(),
           "train_fraction_above_heldout_p99": float(np.mean(ytr[mtr] > np.percentile(y[mask], 99))),
           "white_matter_profile": white_matter_profile(t1, t2)}
  return {"method": record["method"], "tag": record.get("tag", ""), "seed": record["seed"],
          "train_x_end": train_cut[0].stop, "eval_x_start": cut[0].start,
          "step": record["best_step"], "data_range": data_range,
          "heldout": held,
          "fit": {k: {"psnr": fit["psnr"][k], "ssim": fit["ssim"][k]}
                  for k in ("model", "lut", "lut_gaussian") if k in fit["psnr"]},
          "bands": band_errors({"model": p, "lut_gaussian": lutg}, y, mask), "shift": shift}


def markdown(results: list[dict]) -> str:
  lines = ["# MRI T1 -> T2 diagnosis", "",
           "Held-out: the scored hemisphere (RAS x in [0.6, 1]); fit: the training hemisphere "
           "(x in [0, 0.5), in-sample for the model and the table). Oracles read the held-out "
           "target (diagnostic bounds, not predictions). Body mask, original units.", "",
           "| run | step | held-out model | held-out LUT+G | model recalibrated (oracle) | "
           "T1 LUT (oracle) | fit model | fit LUT+G |", "|---|---|---|---|---|---|---|---|"]
  fmt = lambda s: f"{s['psnr']:.2f} / {s['ssim']:.3f}"
  for r in results:
    h, f = r["heldout"], r["fit"]
    name = r["method"] + (f" [{r['tag']}]" if r["tag"] else "") + f" seed {r['seed']}"
    lines.append(f"| {name} | {r['step']} | {fmt(h['model'])} | {fmt(h['lut_gaussian'])} | "
                 f"{fmt(h['model_recalibrated_oracle'])} | {fmt(h['t1_lut_oracle'])} | "
                 f"{fmt(f['model'])} | {fmt(f['lut_gaussian'])} |")
  lines += ["", "PSNR (dB) / SSIM.", "", "| run | band (T2 range) | voxels | model bias | "
            "model RMSE | LUT+G bias | LUT+G RMSE |", "|---|---|---|---|---|---|---|"]
  for r in results:
    name = r["method"] + (f" [{r['tag']}]" if r["tag"] else "") + f" seed {r['seed']}"
    for b in r["bands"]:
      lo, hi = b["target_range"]
      lines.append(f"| {name} | {b['band']} ({lo:.0f}-{hi:.0f}) | {b['voxels']} | "
                   f"{b['model_bias']:+.1f} | {b['model_rmse']:.1f} | {b['lut_gaussian_bias']:+.1f} "
                   f"| {b['lut_gaussian_rmse']:.1f} |")
  if results:
    s = results[0]["shift"]
    lines += ["", f"T2 percentiles {s['percentiles']} in the body: training hemisphere "
              f"{[round(v) for v in s['train_t2']]}, held-out {[round(v) for v in s['heldout_t2']]}; "
              f"{100 * s['train_fraction_above_heldout_p99']:.1f}% of training voxels are brighter "
              "than the held-out 99th percentile."]
    prof = s["white_matter_profile"]
    lines += ["", "White-matter-like voxels (T1 between its 70th and 95th body percentiles), "
              "medians per 12-voxel slab along RAS x (training x < "
              f"{results[0]['train_x_end']}, held-out x >= {results[0]['eval_x_start']}):", "",
              "| x | " + " | ".join(f"{p['x'][0]}-{p['x'][1]}" for p in prof) + " |",
              "|---|" + "---|" * len(prof),
              "| T1 | " + " | ".join(f"{p['t1_median']:.0f}" for p in prof) + " |",
              "| T2 | " + " | ".join(f"{p['t2_median']:.0f}" for p in prof) + " |"]
  return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--lvc", required=True, help="a learned_vs_classical --out DIR with mri_t1_t2 runs")
  p.add_argument("--out", default="")
  p.add_argument("--methods", default="ppdm,regression")
  p.add_argument("--source", default=None)
  args = p.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
  for noisy in ("absl", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  lvc_dir = pathlib.Path(args.lvc)
  source = lvc_dir / "learned_vs_classical.json"
  if not source.is_file():
    raise SystemExit(f"--lvc {lvc_dir}: no learned_vs_classical.json (run "
                     "experiments/learned_vs_classical.py --out DIR --tasks mri_t1_t2 first)")
  records = [r for r in json.loads(source.read_text())["records"]
             if r["task"] == TASK and r["method"] in args.methods.split(",")
             and not r["settings"].get("infer_tag")]  # trained runs (not their re-scorings)
  if not records:
    raise SystemExit(f"no finished {TASK} runs of {args.methods} in {lvc_dir}")
  out = pathlib.Path(args.out or lvc_dir / "mri_diagnosis")
  out.mkdir(parents=True, exist_ok=True)
  results = []
  for rec in records:  # (fit_one shares the task's reference tuning with each run)
    results.append(diagnose(rec, lvc_dir, args.source))
    fileio.write_json_atomic(str(out / "mri_diagnosis.json"), {"runs": results})
  text = markdown(results)
  fileio.write_text_atomic(str(out / "mri_diagnosis.md"), text)
  print(text)
  return results


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
