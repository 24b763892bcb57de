"""--mode=plan: compiled per-device memory and FLOPs for a config and mesh, nothing allocated."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import ROOT
from conftest import load_module
from jaxvol import config as base
from jaxvol import methods
from jaxvol.train import plan as plan_lib
from jaxvol.train import state as state_lib


_load = load_module


def full3d_smoke():
  c = base.set_method(base.base_config(), "full3d")
  base.smoke_overrides(c)
  return c


def test_parse_mesh_and_shape():
  assert plan_lib.parse_mesh("data:2,spatial:4") == {"data": 2, "spatial": 4, "model": 1}
  assert plan_lib.parse_mesh("data:-1, model:2") == {"data": -1, "spatial": 1, "model": 2}
  with pytest.raises(ValueError, match="data:N"):
    plan_lib.parse_mesh("depth:4")
  assert plan_lib.parse_shape("") is None
  assert plan_lib.parse_shape("256") == (256, 256, 256)
  assert plan_lib.parse_shape("64,128,96") == (64, 128, 96)


def test_too_large_a_mesh_names_the_device_flag(tmp_path):
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
    plan_lib.plan(full3d_smoke(), str(tmp_path), {"data": 1, "spatial": 16, "model": 1})


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")
def test_plan_compiles_without_allocating_the_state(tmp_path, monkeypatch):
  def no_state(*args, **kwargs):
    raise AssertionError("planning must not create the train state")

  monkeypatch.setattr(state_lib, "create_state", no_state)
  config = full3d_smoke()
  before = {id(a) for a in jax.live_arrays()}
  report = plan_lib.plan(config, str(tmp_path), {"data": 1, "spatial": 4, "model": 1},
                         device_memory_gb=80, sample_shape=(32, 16, 16))
  method = methods.build(config, "cpu")
  abstract = method.param_shapes(method.abstract_batch(2, (16, 16, 16)))
  param_shapes = {tuple(p.shape) for p in jax.tree.leaves(abstract) if len(p.shape) > 1}
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert not [a.shape for a in new if tuple(a.shape) in param_shapes]

  assert report["mesh"] == {"data": 1, "spatial": 4, "model": 1}
  for step in ("train", "sample"):
    f = report[step]
    assert f["bytes"] == (f["temp_bytes"] + f["argument_bytes"] + f["output_bytes"]
                          - f["alias_bytes"])
    assert f["bytes"] > 0 and f["flops"] > 0 and f["fits"] is True
  assert report["params"]["count"] > 0 and report["params"]["sharded_bytes"] == 0
  assert report["sample"]["shape"] == [32, 16, 16] and "depth split" in report["sample"]["layout"]
  assert report["train"]["whole_volume_all_gathers"] == [] and report["warnings"] == []
  with open(tmp_path / "plan.json") as f:
    assert json.load(f) == json.loads(json.dumps(report))
  text = plan_lib.format_report(report)
  assert "train step" in text and "sampler" in text and "GFLOPs" in text and "fits" in text


@pytest.mark.skipif(jax.device_count() < 3, reason="needs 3 (fake) devices")
def test_plan_warns_about_replicated_fallbacks(tmp_path):
  """A model axis that does not divide the DiT's kernels, and a memory the steps exceed."""
  config = _load(ROOT / "configs" / "prdit_ct_gen.py", "prdit_ct_gen_for_plan").get_config("smoke")
  report = plan_lib.plan(config, str(tmp_path), {"data": 1, "spatial": 1, "model": 3},
                         device_memory_gb=1e-4, write=False)
  assert any("not divisible by mesh axis model (3)" in w for w in report["warnings"])
  assert report["train"]["fits"] is False and report["sample"]["fits"] is False
  assert not (tmp_path / "plan.json").exists()
  assert "DOES NOT FIT" in plan_lib.format_report(report)


@pytest.mark.slow
def test_plan_cli_on_more_fake_devices_than_the_process_had(tmp_path):
  """`--plan_devices=6` on a 4-device test environment: the CLI asks JAX for 6 before it starts.

  Depth 16 on 3 spatial shards does not divide: the plan says so and still exits 0.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "jaxvol.main", "--mode=plan",
         "--config=configs/full3d_mri_t1_t2.py:smoke", f"--workdir={tmp_path}",
         "--plan_mesh=data:2,spatial:3,model:1", "--plan_devices=6",
         "--plan_device_memory_gb=80"]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "mesh data=2 spatial=3 model=1 on 6 cpu device(s)" in out
  assert "train step (batch 2, crop (16, 16, 16))" in out and "MiB per device" in out
  assert "GFLOPs" in out and "fits" in out
  assert "WARNING: train batch: depth 16 is not divisible by the spatial axis (3)" in out
  with open(tmp_path / "plan.json") as f:
    report = json.load(f)
  assert report["devices"]["count"] == 6 and report["train"]["bytes"] > 0
