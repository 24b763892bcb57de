"""experiments/curves.py at smoke size: segments of the library's loop, evaluations at the scheduled
steps through the one inference path, mean-of-N records, plots, resumption."""

import json

import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from conftest import write_pet_store

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow



curves = load_module(ROOT / "experiments" / "curves.py", "curves_under_test")
SHAPE = (32, 24, 32)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A PET-like store (2 training, 1 test subject) and one smoke run of two methods."""
  root = tmp_path_factory.mktemp("curves")
  store = write_pet_store(root, SHAPE, ["train", "train", "test"])
  argv = ["--references", "cheap", "--out", str(root / "out"), "--tasks", "pet_denoise", "--methods",
          "ppdm4", "--steps", "4", "--checkpoints", "2", "--width", "8",
          "--samples", "2", "--mean-every", "1", "--max-box", "16", "--sample-steps", "2",
          "--ppdm-sample-steps", "2", "--no-compilation-cache", "--store", f"pet_denoise={store}"]
  records = curves.main(argv)
  return root, argv, records


def test_schedule():
  assert curves.schedule(1600, 7) == [25, 50, 100, 200, 400, 800, 1600]
  assert curves.schedule(4, 2) == [1, 4]
  assert curves.schedule(10, 1) == [10]
  s = curves.schedule(1000, 8)
  assert s == sorted(set(s)) and s[-1] == 1000 and len(s) == 8
  with pytest.raises(ValueError):
    curves.schedule(0, 3)


def test_records_per_scheduled_step(run):
  root, _, records = run
  got = sorted((r["name"], r["step"], r["samples"]) for r in records)
  # Once per step plus the mean of 2 samples (a diffusion method, mean_every 1).
  assert got == [("ppdm4", 1, 1), ("ppdm4", 1, 2), ("ppdm4", 4, 1), ("ppdm4", 4, 2)]
  for r in records:
    assert np.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1 and r["hfen"] > 0
    assert r["input_psnr"] is not None and r["train_mean_psnr"] is not None  # both floors
    assert r["seconds"] is not None and r["seconds"] >= 0
    assert r["region"] == {"2": [0.6, 1.0]}  # the held-out slab, never trained on
    box = next(iter(r["boxes"].values()))
    assert all(b - a <= 16 for a, b in box)
  # Training time grows with the step, from the loop's own records.
  by_step = {r["step"]: r["seconds"] for r in records if r["samples"] == 1}
  assert by_step[4] > by_step[1]
  # The mean of 2 samples differs from one sample (the diffusion draws differ).
  one = next(r for r in records if r["name"] == "ppdm4" and r["step"] == 4 and r["samples"] == 1)
  two = next(r for r in records if r["name"] == "ppdm4" and r["step"] == 4 and r["samples"] == 2)
  assert one["psnr"] != two["psnr"]
  saved = json.loads((root / "out" / "curves.json").read_text())
  assert len(saved["records"]) == 4 and saved["settings"]["steps"] == 4
  assert (root / "out" / "curves_pet_denoise.png").stat().st_size > 1000
  md = (root / "out" / "curves.md").read_text()
  assert "PPDM r=4" in md and "| input |" in md and "never beats the input" in md


def test_rerun_skips_finished_records(run, monkeypatch):
  _, argv, records = run
  calls = []
  monkeypatch.setattr(curves, "evaluate_at", lambda *a, **k: calls.append(a))
  again = curves.main(argv)
  assert not calls and len(again) == len(records)


def test_reading_states_both_comparisons():
  recs = [{"task": "t", "name": "regression", "step": s, "samples": 1, "psnr": p,
           "input_psnr": 20.0} for s, p in ((10, 18.0), (100, 25.0))]
  recs += [{"task": "t", "name": "ppdm2", "step": s, "samples": 1, "psnr": p,
            "input_psnr": 20.0} for s, p in ((10, 19.0), (100, 21.0))]
  lines = curves.reading(recs, "t")
  assert "beats regression from step 10 (1/2 steps)" in lines[0]
  assert "beats the input from step 100" in lines[0]


def test_missing_input_floor_is_filled_from_one_evaluation(run, monkeypatch):
  root, argv, records = run
  args = curves.parse_args(argv)
  old = [dict(r, input_psnr=None, input_ssim=None, input_hfen=None) for r in records]
  calls = []

  def fake(config, workdir, step, samples):
    calls.append((workdir, step, samples))
    return {"metrics": {k: {"model": 0.0, "input": v} for k, v in
                        (("psnr", 21.0), ("ssim", 0.5), ("hfen", 0.7))}}

  monkeypatch.setattr(curves, "evaluate_at", fake)
  saved = []
  out = curves.fill_input_floor("pet_denoise", "ppdm4", str(root / "store"), root / "out", args,
                                old, saved.append)
  assert calls == [(str(root / "out" / "runs" / "pet_denoise" / "ppdm4"), 4, 1)]  # last step
  assert all((r["input_psnr"], r["input_ssim"], r["input_hfen"]) == (21.0, 0.5, 0.7) for r in out)
  assert saved and curves.fill_input_floor("pet_denoise", "ppdm4", "", root / "out", args, out,
                                           saved.append) is out  # nothing lacking: no call
  assert len(calls) == 1
