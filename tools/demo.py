"""The quick-start demo: PPDM denoising of low-count PET simulated on real brain anatomy.

  python tools/demo.py --workdir runs/demo [--minutes 10]

1. Builds an FDG-like PET phantom from the MNI152 grey/white-matter maps that nilearn ships
   (offline), six "subjects" that differ in noise, global scale and small hot lesions; full-count
   and 10%-dose low-count versions by Poisson sampling (jaxvol.data.phantoms). Split 4/1/1.
2. Converts them into a store (tools/convert.py).
3. Trains PPDM (configs/ppdm_pet_denoise.py:demo, puzzle factor 2) for at most --minutes.
4. Evaluates the latest checkpoint on the test subject and prints PSNR/SSIM of the low-count
   input, of the PPDM output and of a predictor that ignores its input (the voxelwise mean of the
   training targets) against the full-count image. Outputs:
     WORKDIR/eval/summary.json, metrics.csv, nifti/*.nii.gz, previews/*.png
Steps 2-4 run the same commands a user runs; they are printed before they run.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
  print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="runs/demo")
  ap.add_argument("--minutes", type=float, default=10.0, help="training time limit")
  ap.add_argument("--steps", type=int, default=None, help="override the number of training steps")
  args = ap.parse_args(argv)
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "data")
  store = os.path.join(data_dir, "store")
  py = sys.executable

  if not os.path.exists(os.path.join(store, "manifest.json")):
    from jaxvol.data import phantoms  # pylint: disable=g-import-not-at-top
    print(f"writing the PET phantom dataset to {data_dir}", flush=True)
    datalist = phantoms.write_demo_pet_dataset(data_dir, dose_fraction=0.1, seed=0, crop_margin=2)
    run([py, "tools/convert.py", "--datalist", datalist, "--out", store,
         "--preset", "pet_low=pet", "--preset", "pet_full=pet:ref=pet_low"])

  common = [py, "-m", "jaxvol.main", "--config=configs/ppdm_pet_denoise.py:demo",
            f"--workdir={workdir}", f"--config.data.store={store}"]
  train = common + ["--mode=train", f"--config.train.time_limit_minutes={args.minutes}"]
  if args.steps is not None:
    train.append(f"--config.train.steps={args.steps}")
  run(train)
  run(common + ["--mode=evaluate"])

  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    summary = json.load(f)
  m = summary["metrics"]
  print(f"\nPET denoising, test subject(s) of the phantom, {summary['n_volumes']} volume(s), "
        f"checkpoint step {summary['checkpoint_step']}, metrics inside the body mask:")
  print("| prediction            | PSNR (dB) | SSIM   |")
  print("|-----------------------|-----------|--------|")
  print(f"| low-count input (10%) | {m['psnr']['input']:9.2f} | {m['ssim']['input']:.4f} |")
  print(f"| PPDM (r=2)            | {m['psnr']['model']:9.2f} | {m['ssim']['model']:.4f} |")
  floor = "train_mean" in m["psnr"]
  if floor:
    print(f"| training-target mean  | {m['psnr']['train_mean']:9.2f} | "
          f"{m['ssim']['train_mean']:.4f} |")
    print("(training-target mean: a predictor that ignores its input, "
          f"{summary['train_mean_floor'].split(': ', 1)[-1]}. The phantom's six subjects share one "
          "anatomy, so this floor is high: a model that does not beat it has not shown denoising "
          "of anatomy it has not seen.)")
  print(f"\nsummary: {os.path.join(workdir, 'eval', 'summary.json')}")
  print(f"NIfTI predictions: {os.path.join(workdir, 'eval', 'nifti')}")
  print(f"previews: {os.path.join(workdir, 'eval', 'previews')}")
  if m["psnr"]["model"] <= m["psnr"]["input"]:
    print("warning: PPDM did not beat the low-count input; train longer (--minutes)")
    return 1
  if floor and m["psnr"]["model"] <= m["psnr"]["train_mean"]:
    print("note: PPDM beat the low-count input but NOT the training-target mean, which never looks "
          "at its input: on this phantom (test anatomy seen in training) the result does not "
          "show denoising yet")
  return 0


if __name__ == "__main__":
  sys.exit(main())
