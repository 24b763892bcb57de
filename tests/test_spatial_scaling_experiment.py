"""Runs experiments/spatial_scaling.py in-process on a tiny U-Net and volume; checks its records."""

import json

import jax
import pytest

from conftest import ROOT
from conftest import load_module

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

SCRIPT = ROOT / "experiments" / "spatial_scaling.py"


def _load_script():
  return load_module(SCRIPT, "spatial_scaling_experiment")


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (fake) devices")
def test_spatial_scaling_tiny(tmp_path):
  experiment = _load_script()
  records = experiment.main([
      "--out", str(tmp_path), "--sizes", "16", "--shards", "2", "--methods", "full3d",
      "--width", "4", "--mults", "1,2", "--res-blocks", "1", "--groups", "2", "--time-embed", "8"])
  assert json.loads((tmp_path / "spatial_scaling.json").read_text()) == json.loads(
      json.dumps(records))
  assert [(r["method"], r["size"], r["shards"]) for r in records] == [
      ("full3d", 16, 1), ("full3d", 16, 2)]  # one shard is always measured, for the ratios
  for r in records:
    assert r["error"] is None, r["error"]
    assert r["train_bytes"] > 0 and r["sample_bytes"] > 0 and r["sample_kind"] == "loop"
    assert r["whole_volume_all_gathers"] == 0
    assert r["state_sharding"] == "replicated" and r["state_device_bytes"] == r["state_bytes"]
  assert records[1]["train_bytes"] < records[0]["train_bytes"]
  md = (tmp_path / "spatial_scaling.md").read_text()
  assert "| full3d | 16^3 | 2 |" in md and "train state layout replicated" in md


def test_state_sharding_option_reaches_the_config():
  experiment = _load_script()
  args = experiment.parse_args(["--out", "x", "--state-sharding", "fsdp"])
  assert experiment.make_config("ppdm", 32, 2, args).mesh.state_sharding == "fsdp"
  assert experiment.parse_args(["--out", "x"]).state_sharding == "replicated"
  with pytest.raises(SystemExit):
    experiment.parse_args(["--out", "x", "--state-sharding", "zero2"])
