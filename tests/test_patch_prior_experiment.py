"""experiments/patch_prior.py end to end on the smoke prior: records, memory check, table."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import patch_prior  # noqa: E402  pylint: disable=wrong-import-position


def test_patch_prior_experiment_writes_every_record(shared_data, tmp_path):
  out = tmp_path / "exp"
  patch_prior.main(["--out", str(out), "--variant", "smoke", "--size", "16", "16", "24",
                    "--steps", "2", "--tv-iters", "5", "--tasks", "mri_r4",
                    "--memory-sizes", "32", "--source", str(shared_data)])
  doc = json.loads((out / "patch_prior.json").read_text())
  recs = doc["records"]
  run = [r for r in recs if not r.get("compile_only")]
  assert {(r["solver"], r["prior"]) for r in run} == {
      ("zero_filled", "zero_filled"), ("tv", "tv"), ("diffpir", "patch"), ("diffpir", "whole"),
      ("dps", "patch"), ("dps", "whole")}
  for r in run:
    assert r["task"] == "mri_r4" and r["size"] == [16, 16, 24]
    assert r["bytes"] > 0 and r["seconds"] > 0
    assert 0 < r["psnr"] < 80 and -1 <= r["ssim"] <= 1
  # Compile-only at 32^3: 16^3 windows in groups of 2 need less than the whole volume.
  mem = {(r["solver"], r["prior"]): r["bytes"] for r in recs if r.get("compile_only")}
  assert len(mem) == 4
  for solver in ("diffpir", "dps"):
    assert mem[(solver, "patch")] < mem[(solver, "whole")]
  # DPS backpropagates through the prior: more memory than DiffPIR.
  assert mem[("dps", "whole")] > mem[("diffpir", "whole")]
  assert any("less memory" in c for c in doc["checks"])
  assert (out / "prior" / "DONE").exists()
