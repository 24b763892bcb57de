"""experiments/patch_prior.py end to end on the smoke prior: records, memory check, table.

The script runs as its own process, as a user runs it: with XLA's default CPU code generation
rather than the suite's LLVM level 0 (tests/conftest.py), which compiles faster but runs DPS
through the windowed prior about 15x slower (135 s against 9 s for this test's two steps).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_patch_prior_experiment_writes_every_record(shared_data, tmp_path):
  out = tmp_path / "exp"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "patch_prior.py"),
         "--out", str(out), "--variant", "smoke", "--size", "16", "16", "24",
         "--steps", "2", "--tv-iters", "5", "--tasks", "mri_r4",
         "--memory-sizes", "32", "--source", str(shared_data)]
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
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


def _experiment():
  from conftest import load_module  # pylint: disable=import-outside-toplevel
  return load_module(os.path.join(ROOT, "experiments", "patch_prior.py"), "patch_prior_experiment")


def _prior_config(variant):
  from conftest import load_module  # pylint: disable=import-outside-toplevel
  return load_module(os.path.join(ROOT, "configs", "patch_prior_train.py"),
                     "patch_prior_train_cfg").get_config(variant)


def test_position_channels_only_encode_axes_training_covers():
  """Trained on RAS x in [0, 0.5), evaluated on [0.6, 1): no x channel, and a guard for one."""
  from jaxvol.data import pipeline  # pylint: disable=import-outside-toplevel
  exp = _experiment()
  c = _prior_config("cpu,positions,heldout")  # the experiment's split (patch_prior.ensure_prior)
  assert dict(c.data.train_region) == {"0": (0.0, 0.5)}
  assert dict(c.data.eval_region) == {"0": (0.6, 1.0)}
  assert pipeline.position_axes(c.data) == (1, 2)
  exp.check_positions(c)
  assert pipeline.position_axes(_prior_config("cpu").data) == ()
  c.data.position_axes = (0, 1, 2)  # the x channel would be evaluated on unseen coordinates
  with pytest.raises(ValueError, match="axis 0 evaluated on"):
    exp.check_positions(c)


def test_reconstruction_config_encodes_the_priors_position_axes():
  """The plug-and-play config (jaxvol.config.pnp_config) agrees with the prior it restores."""
  from jaxvol.data import pipeline  # pylint: disable=import-outside-toplevel
  exp = _experiment()
  for task in ("mri_r4", "sr_x2"):
    c = exp.task_config(task, "cpu,positions", "store", "prior")
    assert pipeline.position_axes(c.data) == (1, 2)
    assert dict(c.data.eval_region) == {"0": (0.6, 1.0)} and c.eval.split == "train"
    assert tuple(c.data.position_axes) == tuple(
        _prior_config("cpu,positions,heldout").data.position_axes)
