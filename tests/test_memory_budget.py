"""experiments/memory_budget.py at smoke size: the budget, the full3d crop search, the records, and
a rerun that skips what is done."""

import json

import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from conftest import write_pet_store

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

SHAPE = (16, 16, 30)  # heldout PET split: train z [0, 18), evaluate z [18, 30) (12 slices)
# PPDM r=2 is left out here (time); its branch that does not fit the budget is tested alone.
ARGS = ["--task", "pet_denoise", "--steps", "2", "--width", "4", "--mults", "1,2",
        "--sample-steps", "2", "--ppdm-sample-steps", "2", "--window-batch", "8",
        "--methods", "ppdm_r4,full3d", "--validations", "2"]


@pytest.fixture(scope="module")
def mb():
  return load_module(ROOT / "experiments" / "memory_budget.py", "memory_budget_experiment")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """Two training, one validation and one test PET 'subject' (smooth activity, noisy low-count
  input)."""
  root = tmp_path_factory.mktemp("budget")
  return write_pet_store(root, SHAPE, ["train", "train", "val", "test"])


@pytest.fixture(scope="module")
def run(mb, store, tmp_path_factory):
  out = tmp_path_factory.mktemp("budget_out")
  argv = ["--out", str(out), "--store", store, "--references", "cheap"] + ARGS
  return mb, out, argv, mb.main(argv)


def _bytes(mb, store, args, name, crop):
  """Compiled train-step bytes of one config, compiled here (not through the search)."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  config = mb.make_config("pet_denoise", name, store, args, crop)
  parts = loop.build_everything(config, "unused")
  return loop.compile_step(parts, config)[1]["bytes"]


def test_budget_and_the_largest_full3d_crop_that_fits(run, store):
  mb, out, argv, result = run
  args = mb.parse_args(argv)
  budget = result["budget"]
  # PPDM r=4, 2-level U-Net: multiple 8; the training region 16 x 16 x 18 pads to 16 x 16 x 24.
  assert budget["ppdm"]["ppdm_r4"]["crop"] == [16, 16, 24] and "ppdm_r2" not in budget["ppdm"]
  side, mult = budget["full3d"]["crop"][0], budget["full3d"]["multiple"]
  assert budget["full3d"]["crop"] == [side] * 3 and mult == 2 and side % mult == 0
  # The training loop compiled both train steps again, on its own: the same bytes.
  cost = {name: json.loads((out / "runs" / "pet_denoise" / name / "train_step_cost.json")
                           .read_text())["bytes"] for name in ("ppdm_r4", "full3d")}
  assert budget["bytes"] == cost["ppdm_r4"]
  assert budget["full3d"]["bytes"] == cost["full3d"] <= budget["bytes"]
  assert side < budget["full3d"]["max_side"] == 24
  assert _bytes(mb, store, args, "full3d", (side + mult,) * 3) > budget["bytes"]


def test_search_walks_to_the_boundary():
  mb = load_module(ROOT / "experiments" / "memory_budget.py", "memory_budget_search")
  curve = lambda s: 10e6 + 2000 * s**3  # fits up to 36 (104.3e6), not 40 (138e6)
  for start in (None, 4, 40, 160):
    side, probes = mb.search_crop(curve, 106e6, 4, 160, start)
    assert side == 36 and {36, 40} <= {p for p, _ in probes}, (start, probes)
  assert mb.search_crop(curve, 1e6, 4, 160)[0] is None
  assert mb.search_crop(curve, 1e12, 4, 160)[0] == 160


def test_a_ppdm_step_over_the_budget_is_reported_not_trained(run):
  mb, out, argv, result = run
  budget = json.loads(json.dumps(result["budget"]))
  budget["ppdm"]["ppdm_r2"] = {"crop": [16, 16, 20], "bytes": budget["bytes"] + 1}
  rec = mb.run_method("ppdm_r2", "unused", out, mb.parse_args(argv), budget)
  assert not rec["fits_budget"] and "psnr" not in rec and "not trained" in rec["note"]
  assert not (out / "runs" / "pet_denoise" / "ppdm_r2").exists()


def test_records_and_outputs(run):
  mb, out, _, result = run
  assert json.loads((out / "memory_budget.json").read_text()) == json.loads(json.dumps(result))
  records = {r["method"]: r for r in result["records"]}
  assert list(records) == ["ppdm_r4", "full3d"]
  md = (out / "memory_budget.md").read_text()
  assert "Budget M" in md and "Machine:" in md and "Split:" in md
  assert "the best of 2 validations by PSNR" in md
  for name, rec in records.items():
    assert rec["budget_bytes"] == result["budget"]["bytes"]
    assert rec["fits_budget"] == (rec["train_bytes"] <= rec["budget_bytes"])
    for key in ("psnr", "ssim", "input_psnr", "input_ssim", "train_mean_psnr", "train_step_s",
                "sample_s"):
      assert isinstance(rec[key], float) and np.isfinite(rec[key]), (name, key)
    assert rec["n_eval_volumes"] == 1 and rec["eval_shapes"] == [[16, 16, 12]]
    assert rec["split"] == "test" and rec["mask"] == "body" and rec["steps"] == 2
    # validated at steps 1 and 2 on the validation split; the best of them is the one scored
    val = rec["validation"]
    assert [v["step"] for v in val] == [1, 2]
    assert rec["checkpoint_step"] == max(val, key=lambda v: v["psnr"])["step"]
    assert rec["checkpoint_step"] == val[-1]["best_step"]
  assert records["ppdm_r4"]["input_psnr"] == records["full3d"]["input_psnr"]
  assert records["ppdm_r4"]["trained_on"].startswith("whole training region")
  side = result["budget"]["full3d"]["crop"][0]
  assert records["full3d"]["sampling"].startswith(f"in-loop windows {side}^3")


def test_rerun_skips_finished_methods(run, monkeypatch):
  mb, out, argv, result = run
  from jaxvol.eval import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top

  def refuse(*a, **k):
    raise AssertionError("a finished method was run again")

  for module, name in ((loop, "train"), (evaluate_lib, "evaluate"), (mb, "train_bytes")):
    monkeypatch.setattr(module, name, refuse)
  again = mb.main(argv)
  assert again["records"] == result["records"] and again["budget"] == result["budget"]
