"""Writes the results pages docs/results/<stem>.md from the records committed beside them.

Usage::

  python experiments/results_pages.py             # rewrites every page it knows
  python experiments/results_pages.py --check     # exit 1, listing the pages that differ

Each experiment script renders its own page from its JSON record (its `report` or `markdown`
function) and writes it next to the JSON when it runs; this script runs the same renderers on the
records committed in docs/results/, so that docs/results.md can link to a page instead of
retyping its table, and tests/test_results_pages.py can check that no committed page has drifted
from its record. Nothing is trained, compiled or measured here.

Records written before their script recorded its own command line (and, for some, the machine or
the input's scores) get those from PAGES below, taken from the commands docs/results.md gives.
Two pages are rendered here rather than by an experiment script, since the library wrote their
records: an evaluation summary (`jaxvol.main --mode=evaluate`) and the PRDiT ct_gen runs.

Not rendered: quality_cpu.md (experiments/quality.py now describes its splits as the held-out
regions it uses today, which is not what that committed run used; its committed page stays as
the script wrote it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from typing import Callable

import attention_memory
import conv_cpu
import curves
import flow_nfe
import learned_vs_classical
import memory
import memory_budget
import patch_prior
import sparse_ablation
import sparse_speedup
import spatial_scaling
from jaxvol import fileio

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results"


@dataclasses.dataclass(frozen=True)
class Page:
  """One results page: the script that made its record, and how to render the record.

  `render(data, load)` gets the record's parsed JSON and `load(stem)`, which reads another
  committed record (for a page that quotes one), and returns the page's markdown.
  """

  script: str
  render: Callable[[object, Callable[[str], object]], str]


def evaluation_summary(summary: dict, title: str, commands: list[str], machine: str,
                       labels: dict[str, str], note: str = "") -> str:
  """The page of one `jaxvol.main --mode=evaluate` summary.json: every scored prediction's
  metrics (the model, the input and any floors or references the summary holds)."""
  metrics = summary["metrics"]
  names = list(dict.fromkeys(n for m in metrics.values() for n in m))
  names = [n for n in names if n != "model"] + (["model"] if "model" in names else [])
  units = {"psnr": "PSNR (dB)", "ssim": "SSIM", "nmse": "NMSE", "mae": "MAE", "hfen": "HFEN"}
  keys = list(metrics)
  lines = ["| prediction | " + " | ".join(units.get(k, k) for k in keys) + " |",
           "|---|" + "---:|" * len(keys)]
  for name in names:
    cells = ["-" if name not in metrics[k] else
             f"{metrics[k][name]:.{2 if k == 'psnr' else 1 if k == 'mae' else 3}f}" for k in keys]
    lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
  scored = (f"Method {summary['method']}, checkpoint step {summary['checkpoint_step']}; split "
            f"{summary['split']!r} ({summary['n_volumes']} volume(s)), region "
            f"{summary.get('region')}, mask {summary.get('mask')}, data range "
            f"{summary.get('data_range')}; {summary['seconds_per_volume']:.0f} s per volume.")
  quoted = "; ".join(f"`{c}`" for c in commands)
  parts = [f"# {title}", f"Commands: {quoted}; machine: {machine}.", scored, "\n".join(lines)]
  if note:
    parts.append(note)
  return "\n\n".join(parts) + "\n"


def _sentence(text: str) -> str:
  """`text` with a capital first letter and a full stop."""
  text = text.strip().rstrip(".")
  return text[:1].upper() + text[1:] + "."


def prdit_ct_gen(data: dict, machine: str) -> str:
  """The page of docs/results/prdit_ct_gen_cpu.json: stage 1 before and after the read-out
  change (mean logged training loss), and the two-stage run's samples and generation metrics."""
  s1, gen = data["stage1_paper_layout"], data["generation_cpu_variant"]

  def mean_loss(run: dict, lo: int, hi: int) -> float:
    values = [loss for step, loss in run["logged_loss"] if lo <= step <= hi]
    return sum(values) / len(values)

  rows = ["| stage 1, paper layout | code | mean loss, steps 20-100 | mean loss, steps 420-600 |",
          "|---|---|---:|---:|"]
  for name in ("before_fix", "after_fix"):
    run = s1[name]
    rows.append(f"| {name.replace('_', ' ')} | {run['code']} | {mean_loss(run, 20, 100):.3f} | "
                f"{mean_loss(run, 420, 600):.3f} |")
  late = [mean_loss(s1[n], 420, 600) for n in ("before_fix", "after_fix")]
  samplers = ["| sampler | steps | s per volume | FD | sqrt(MMD^2) | MS-SSIM diversity | "
              "MS-SSIM among the real crops |", "|---|---:|---:|---:|---:|---:|---:|"]
  for name, run in gen.items():
    if not isinstance(run, dict) or "generation_metrics" not in run:
      continue
    m, smp = run["generation_metrics"], run["samples"]
    samplers.append(f"| {name} ({smp['sampler']['sampler']}) | {smp['sampler']['sample_steps']} | "
                    f"{smp['seconds_per_volume']:.2f} | {m['fid']:.2f} | {m['mmd']:.2f} | "
                    f"{m['ms_ssim_diversity']:.2f} | {m['ms_ssim_diversity_real']:.2f} |")
  first = next(r for r in gen.values() if isinstance(r, dict) and "generation_metrics" in r)
  final = ", ".join(f"{k} {v:g}" for k, v in gen.get("final_train_loss", {}).items())
  quoted = "; ".join(f"`{c}`" for c in gen.get("commands", ()))
  return "\n\n".join([
      "# PRDiT on the ct_gen store (CPU)",
      f"Commands: `{s1['command']}` (stage 1 before and after); {quoted}; machine: {machine}.",
      _sentence(data["description"]),
      "## Stage 1 in the paper layout, before and after the read-out change",
      _sentence(s1["note"]), "\n".join(rows),
      f"After the change the late loss is {100 * (1 - late[1] / late[0]):.0f}% lower.",
      "## The two-stage run: samples and generation metrics",
      f"Model {first['samples']['model']}, checkpoint step {first['samples']['checkpoint_step']}; "
      f"final training losses: {final}. {first['generation_metrics']['n_fake']} samples of "
      f"{'x'.join(map(str, first['samples']['shape']))} against "
      f"{first['generation_metrics']['real']}; features: "
      f"{first['generation_metrics']['feature_network']}, so FD is not an FID. "
      f"{_sentence(first['generation_metrics']['note'])} Seconds per volume after compilation.",
      "\n".join(samplers)]) + "\n"


SPEEDUP_H100 = ("python experiments/sparse_speedup.py --out DIR --steps 1600 --eval-every 100 "
                "--crop 32 --width 32 --batch 8 --lr 2e-4 --val-crops 8 --ddpm-crops 4 "
                "--workers 6")
SPEEDUP_CPU = ("python experiments/sparse_speedup.py --out DIR --steps 400 --eval-every 100 "
               "--crop 16 --width 8 --batch 4 --lr 5e-4 --val-crops 8 --ddpm-crops 2 "
               "--layout jaxvol")
ABLATION = ("python experiments/sparse_ablation.py --out DIR --steps 400 --crop 16 --width 8 "
            "--batch 4 --lr 5e-4 --val-crops 8 --variants ")
PATCH_PRIOR = ("python experiments/patch_prior.py --out DIR --prior-workdir DIR/prior --size 32 "
               "48 48 --steps 20 --overlap 0.25 --tasks mri_r4,sr_x2 --solvers diffpir,dps "
               "--memory-sizes 64,128")
SPATIAL = ["python experiments/spatial_scaling.py --out DIR",
           "python experiments/spatial_scaling.py --out DIR --methods ppdm,full3d "
           "--state-sharding zero1",
           "python experiments/spatial_scaling.py --out DIR --methods ppdm,full3d "
           "--state-sharding fsdp"]
MEMORY = ["python experiments/memory.py --out DIR",
          "python experiments/memory.py --out DIR --sizes 128,256 --attention none "
          "--methods ldm,autoencoder,autoencoder_windows"]
SPARSE_CT = ["python tools/prepare_data.py --task ct_denoise --out data/ct_denoise",
             "python -m jaxvol.main --config=configs/sparse_ct_denoise.py:cpu,heldout "
             "--workdir=runs/sparse_ct --config.data.store=data/ct_denoise/store",
             "python -m jaxvol.main --config=configs/sparse_ct_denoise.py:cpu,heldout "
             "--workdir=runs/sparse_ct --config.data.store=data/ct_denoise/store --mode=evaluate"]


def _ablation_input(load) -> dict:
  """The low-dose input's scores on the ablation's validation crops: sparse_speedup_cpu.json
  sampled the same crops (same store, crop size, count and seed) and recorded them."""
  return load("sparse_speedup_cpu")["sampler_matrix"]["input"]


def _curves_args(settings: dict) -> argparse.Namespace:
  args = curves.parse_args(["--out", "-"])
  for key, value in settings.items():
    setattr(args, key, value)
  return args


PAGES = {
    "sparse_speedup_h100": Page("sparse_speedup", lambda d, load: sparse_speedup.report(
        d, command=SPEEDUP_H100)),
    "sparse_speedup_cpu": Page("sparse_speedup", lambda d, load: sparse_speedup.report(
        d, command=SPEEDUP_CPU)),
    "sparse_ablation_cpu": Page("sparse_ablation", lambda d, load: sparse_ablation.report(
        d, command=ABLATION + "full,no_stm,eps,v,f10", inputs=_ablation_input(load),
        inputs_source="sparse_speedup_cpu.json")),
    "sparse_ablation_authors_cpu": Page("sparse_ablation", lambda d, load: sparse_ablation.report(
        d, command=ABLATION + "full,jaxvol_net,authors_sampler", inputs=_ablation_input(load),
        inputs_source="sparse_speedup_cpu.json")),
    "patch_prior_cpu": Page("patch_prior", lambda d, load: patch_prior.report(
        d, command=PATCH_PRIOR)),
    "prdit_attention_memory_cpu": Page("attention_memory", lambda d, load: attention_memory.report(
        d, command="python experiments/attention_memory.py --out runs/attention_memory")),
    "spatial_scaling_cpu": Page("spatial_scaling", lambda d, load: spatial_scaling.report(
        d, commands=SPATIAL, machine="8 fake CPU devices (records of the three runs kept in one "
        "file)")),
    "sparse_ct_denoise_summary": Page("jaxvol.main --mode=evaluate", lambda d, load:
        evaluation_summary(
            d, "Sparse diffusion on a CT volume larger than its training patch", SPARSE_CT,
            "the 2-core CPU",
            {"input": "low-dose input (10% dose)",
             "model": f"sparse diffusion + STM, step {d['checkpoint_step']}"},
            note="Metrics in HU inside the body mask, PSNR over the 2000 HU window. Measured "
                 "with the earlier CT simulator, SSIM with the 7-tap window and NMSE normalised "
                 "by sum(target^2) (see the conventions in docs/results.md). The run used "
                 "jaxvol's U-Net layout, then the configs' default: to reproduce it today, add "
                 "`--config.model.layout=jaxvol` to the training and evaluation commands.")),
    "prdit_ct_gen_cpu": Page("jaxvol.main (PRDiT configs)", lambda d, load: prdit_ct_gen(
        d, "the 2-core CPU")),
    # Pages their scripts already wrote in their own format; rendered again to catch drift.
    "learned_vs_classical_cpu": Page("learned_vs_classical", lambda d, load:
                                     learned_vs_classical.markdown(d["records"], None)),
    "flow_nfe_cpu": Page("flow_nfe", lambda d, load: flow_nfe.markdown(
        d["records"], d["runs"], d.get("machine", ""))),
    "curves_cpu": Page("curves", lambda d, load: curves.markdown(
        d["records"], _curves_args(d["settings"]))),
    "memory_budget_cpu": Page("memory_budget", lambda d, load: memory_budget.markdown(d)),
    "conv_cpu": Page("conv_cpu", lambda d, load: conv_cpu.report(d)),
    "memory_cpu": Page("memory", lambda d, load: memory.report(
        d, memory.parse_args(["--out", "DIR"]), command=" ; ".join(MEMORY),
        machine="the 2-core CPU (XLA's CPU compiler, memory-minimising scheduler); two runs, "
                "their records kept in one file")),
}


def load_record(stem: str, folder: pathlib.Path = RESULTS):
  return json.loads((folder / f"{stem}.json").read_text())


def render(stem: str, folder: pathlib.Path = RESULTS) -> str:
  """The page PAGES[stem] renders from folder/<stem>.json."""
  return PAGES[stem].render(load_record(stem, folder), lambda s: load_record(s, folder))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--check", action="store_true",
                 help="write nothing; exit 1 listing the pages that differ from their records")
  p.add_argument("--folder", default=str(RESULTS), help="records and pages (docs/results)")
  p.add_argument("stems", nargs="*", help="pages to write (default: all)")
  args = p.parse_args(argv)
  folder = pathlib.Path(args.folder)
  unknown = [s for s in args.stems if s not in PAGES]
  if unknown:
    p.error(f"unknown pages {unknown}; known: {sorted(PAGES)}")
  stale = []
  for stem in args.stems or PAGES:
    text, path = render(stem, folder), folder / f"{stem}.md"
    if args.check:
      if not path.is_file() or path.read_text() != text:
        stale.append(str(path))
    elif not path.is_file() or path.read_text() != text:
      fileio.write_text_atomic(str(path), text)
      print(f"wrote {path} (from {stem}.json, {PAGES[stem].script})")
  if stale:
    print("pages that differ from what their records render (run "
          "`python experiments/results_pages.py`):\n" + "\n".join(stale))
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
