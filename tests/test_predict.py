"""`jaxvol.predict`: a trained model on a user's own NIfTI files (no store, no target)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxvol import config as base
from jaxvol import predict as predict_lib
from jaxvol.data import store as store_lib
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.train import loop

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

N = 24  # voxels per side of the 1 mm training volumes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """PPDM trained 2 steps on 1 mm RAS crops of the MNI152 template (real anatomy, shipped with
  nilearn), noisy -> clean; the test subject s2 is evaluated from the store."""
  datasets = pytest.importorskip("nilearn.datasets")
  template = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), np.float32)
  # The whole head at about 8 mm, declared 1 mm here: 24^3 voxels, background around it.
  crop = ndimage.zoom(template, [N / s for s in template.shape], order=1, grid_mode=True,
                      mode="nearest").clip(0, None) * 1000.0
  assert crop.shape == (N, N, N) and 0.15 < (crop > 50).mean() < 0.9
  root = tmp_path_factory.mktemp("predict")
  rng = np.random.default_rng(0)
  rows = []
  for i, split in enumerate(["train", "train", "test"]):
    low = np.maximum(crop + rng.normal(0, 0.1 * crop.max(), crop.shape), 0).astype(np.float32)
    for name, vol in (("low", low), ("full", crop)):
      nib.save(nib.Nifti1Image(vol, np.eye(4)), root / f"s{i}_{name}.nii.gz")
    rows.append(f"s{i},{split},s{i}_low.nii.gz,s{i}_full.nii.gz")
  (root / "list.csv").write_text("subject,split,low,full\n" + "\n".join(rows) + "\n")
  store_lib.convert(root / "list.csv", root / "store",
                    {"low": {"kind": "pet"}, "full": {"kind": "pet", "ref": "low"}})
  c = base.base_config()
  c.method = "ppdm"
  c.data.store = str(root / "store")
  c.data.inputs, c.data.target = ("low",), "full"
  base.smoke_overrides(c)
  c.train.steps = 2
  c.eval.split, c.eval.previews, c.mesh.data = "test", False, 1
  workdir = str(root / "run")
  loop.train(c, workdir)
  evaluate_lib.evaluate(c, workdir)
  return root, c, workdir


def test_predict_at_training_spacing_equals_evaluate(run, tmp_path):
  root, c, workdir = run
  record = predict_lib.predict(workdir, [str(root / "s2_low.nii.gz")], str(tmp_path / "out"))
  got = nib.load(str(tmp_path / "out" / "s2_low_pred.nii.gz")).get_fdata()
  want = nib.load(os.path.join(workdir, "eval", "nifti", "s2_pred.nii.gz")).get_fdata()
  store = store_lib.Store(c.data.store)
  data_range = store.preset("s2", "full").hi - store.preset("s2", "full").lo
  assert np.abs(got - want).max() <= 1e-5 * data_range
  assert record["volumes"][0]["resampled_to"] is None
  assert record["checkpoint_step"] == 2 and len(record["config_sha256"]) == 64
  on_disk = json.loads((tmp_path / "out" / "predict.json").read_text())
  assert on_disk["volumes"][0]["name"] == "s2_low" and on_disk["train_spacing"] == [1.0] * 3


def test_predict_on_a_las_scan_at_another_spacing(run, tmp_path):
  """A 1.5 mm LAS file (the test input resampled and flipped): the output is on the file's own
  grid (shape, affine, orientation), and equals, voxel for voxel, the prediction of the same scan
  reoriented to RAS and resampled to 1 mm by hand, brought back the same way: reorientation,
  resampling, presets and units compose as documented."""
  root, _, workdir = run
  low_ras = nib.load(str(root / "s2_low.nii.gz")).get_fdata().astype(np.float32)
  coarse = ndimage.zoom(low_ras, 16 / N, order=1, grid_mode=True, mode="nearest")
  assert coarse.shape == (16, 16, 16)
  las = coarse[::-1]  # x flipped: stored left to right
  affine = np.diag([-1.5, 1.5, 1.5, 1.0])
  affine[0, 3] = 1.5 * 15  # the first stored voxel is the right-most one
  scan = tmp_path / "scan_las.nii.gz"
  nib.save(nib.Nifti1Image(las, affine), scan)
  out = tmp_path / "out"
  record = predict_lib.predict(workdir, [str(scan)], str(out))
  pred_img = nib.load(str(out / "scan_las_pred.nii.gz"))
  assert pred_img.shape == las.shape
  np.testing.assert_allclose(pred_img.affine, affine, atol=1e-5)
  assert nib.aff2axcodes(pred_img.affine) == ("L", "A", "S")
  assert record["volumes"][0]["resampled_to"] == [N, N, N]
  assert record["volumes"][0]["spacing"] == [1.5, 1.5, 1.5]
  # By hand: RAS (flip x back), 1 mm, a RAS NIfTI at the training spacing, predicted there.
  by_hand = predict_lib.resample(np.ascontiguousarray(las[::-1]), (N, N, N))
  nib.save(nib.Nifti1Image(by_hand, np.eye(4)), tmp_path / "scan_1mm.nii.gz")
  predict_lib.predict(workdir, [str(tmp_path / "scan_1mm.nii.gz")], str(tmp_path / "ref"))
  ref = nib.load(str(tmp_path / "ref" / "scan_1mm_pred.nii.gz")).get_fdata().astype(np.float32)
  want = predict_lib.resample(ref, (16, 16, 16))[::-1]
  pred = pred_img.get_fdata()
  scale = float(np.abs(ref).max())
  assert scale > 0 and np.abs(pred - want).max() <= 1e-5 * scale
  # A rerun keeps the existing output and says so.
  again = predict_lib.predict(workdir, [str(scan)], str(out))
  assert "skipped" in again["volumes"][0]


def test_several_samples_give_mean_and_std(run, tmp_path):
  root, _, workdir = run
  predict_lib.predict(workdir, [str(root / "s2_low.nii.gz")], str(tmp_path), samples=2, seed=3)
  one = nib.load(str(tmp_path / "s2_low_pred.nii.gz")).get_fdata()
  std = nib.load(str(tmp_path / "s2_low_std.nii.gz")).get_fdata()
  assert std.shape == one.shape == (N, N, N) and std.min() >= 0 and std.max() > 0
  record = json.loads((tmp_path / "predict.json").read_text())
  assert record["samples"] == 2 and record["seed"] == 3


def test_decathlon_datalist_converts_and_predicts(run, tmp_path):
  """A MONAI Decathlon dataset.json: training pairs convert into a store; its test list (inputs
  only) predicts, with outputs named by subject."""
  root, _, workdir = run
  spec = {"training": [{"low": str(root / f"s{i}_low.nii.gz"),
                        "full": str(root / f"s{i}_full.nii.gz")} for i in (0, 1)],
          "test": [{"low": str(root / "s2_low.nii.gz")}]}
  (tmp_path / "dataset.json").write_text(json.dumps(spec))
  store_lib.convert(tmp_path / "dataset.json", tmp_path / "store",
                    {"low": {"kind": "pet"}, "full": {"kind": "pet", "ref": "low"}})
  store = store_lib.Store(tmp_path / "store")
  assert [s["split"] for s in store.subjects()] == ["train", "train", "test"]
  record = predict_lib.predict(workdir, [str(tmp_path / "dataset.json")], str(tmp_path / "out"))
  assert [v["name"] for v in record["volumes"]] == [s["id"] for s in store.subjects()]
  for v in record["volumes"]:
    assert os.path.exists(v["output"])


@pytest.mark.parametrize("case", ["4d", "nan", "missing", "not_nifti", "complex", "unreadable"])
def test_bad_inputs_give_one_line_and_write_nothing(run, tmp_path, case, capsys):
  root, _, workdir = run
  bad = tmp_path / "bad.nii.gz"
  if case == "4d":
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), bad)
  elif case == "nan":
    vol = np.ones((8, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), bad)
  elif case == "not_nifti":
    bad = tmp_path / "bad.txt"
    bad.write_text("x")
  elif case == "complex":
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.complex64), np.eye(4)), bad)
  elif case == "unreadable":
    bad.write_bytes(b"\x1f\x8b not really gzip")
  out = tmp_path / "out"
  # A good file first: nothing is written for it either, since every input is checked first.
  status = predict_lib.main(["--workdir", workdir, "--input", str(root / "s2_low.nii.gz"),
                             str(bad), "--output", str(out)])
  err = capsys.readouterr().err.strip().splitlines()
  assert status == 1 and len(err) == 1 and err[0].startswith("error: ") and "bad" in err[0]
  assert not out.exists() or not os.listdir(out)
