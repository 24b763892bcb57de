"""Inference reads no target: presets known without the ground truth, the same prediction with or
without the target in the store, refused stores, and the input baseline only where comparable."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxvol import config as base
from jaxvol.data import inference as inference_lib
from jaxvol.data import presets as presets_lib
from jaxvol.data import store as store_lib
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.eval import volumes
from jaxvol.train import loop

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (20, 18, 16)


@pytest.fixture(scope="module")
def mri_data(tmp_path_factory):
  """Three 'subjects' with a T1-like input and a T2-like target of another scale (x3.7 + 50)."""
  root = tmp_path_factory.mktemp("mri")
  rng = np.random.default_rng(0)
  rows = []
  for i, split in enumerate(["train", "train", "test"]):
    anat = ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0)
    head = ndimage.gaussian_filter(np.ones(SHAPE), 3.0) > 0.5
    t1 = np.where(head, 400 + 900 * anat, 0).astype(np.float32)
    t2 = np.where(head, 50 + 3.7 * (600 - 700 * anat), 0).astype(np.float32)
    for name, vol in (("t1", t1), ("t2", t2)):
      nib.save(nib.Nifti1Image(vol, AFFINE), root / f"s{i}_{name}.nii.gz")
    rows.append((f"s{i}", split))
  (root / "both.csv").write_text("subject,split,t1,t2\n" + "".join(
      f"{s},{sp},{s}_t1.nii.gz,{s}_t2.nii.gz\n" for s, sp in rows))
  # A user's store: only the test subject's input, no training subject, no target.
  (root / "inputs.csv").write_text("subject,split,t1\ns2,test,s2_t1.nii.gz\n")
  return root


def _config(store, steps=2):
  c = base.base_config()
  c.method = "ppdm"
  c.data.store = str(store)
  c.data.inputs, c.data.target = ("t1",), "t2"
  base.smoke_overrides(c)
  c.train.steps = steps
  c.eval.split = "test"
  c.eval.input_baseline = True  # asked for, but T1 is not on T2's scale: "not comparable"
  c.eval.previews = False
  c.mesh.data = 1
  return c


@pytest.fixture(scope="module")
def trained(mri_data, tmp_path_factory):
  """PPDM trained 2 steps on a store whose input is fitted per volume and whose target on the
  training split (the defaults a user gets with `t1=mri:fit=volume`, `t2=mri`)."""
  store = mri_data / "store"
  store_lib.convert(mri_data / "both.csv", store,
                    {"t1": {"kind": "mri", "fit": "volume"}, "t2": {"kind": "mri"}})
  c = _config(store)
  workdir = str(tmp_path_factory.mktemp("run"))
  loop.train(c, workdir)
  return c, workdir


def _pred(workdir, folder):
  return nib.load(os.path.join(workdir, folder, "nifti", "s2_pred.nii.gz")).get_fdata()


def test_same_prediction_with_and_without_the_target(trained, mri_data):
  c, workdir = trained
  summary = evaluate_lib.evaluate(c, workdir)
  with_target = _pred(workdir, "eval")
  # The target's scale came from the training split, not from s2's T2.
  store = store_lib.Store(c.data.store)
  t2_train = [presets_lib.fit_preset("mri", store.preset(s, "t2").inverse(store.read(s, "t2")))
              for s in ("s0", "s1")]
  assert store.preset("s2", "t2").hi == pytest.approx(np.median([p.hi for p in t2_train]), rel=1e-4)
  assert summary["presets"]["t2"].endswith("(fitted on the training split)")
  # T1 units are not T2 units: no input score, a statement instead; the floor is still there.
  assert "input" not in summary["metrics"]["psnr"]
  assert summary["input_baseline"].startswith("not comparable")
  assert "train_mean" in summary["metrics"]["psnr"]
  with open(os.path.join(workdir, "eval", "metrics.csv")) as f:
    (row,) = list(csv.DictReader(f))
  assert row["subject"] == "s2" and "input_psnr" not in row

  # The user's store holds only the input of s2 (fitted on its own volume, as training did).
  store_lib.convert(mri_data / "inputs.csv", mri_data / "inputs",
                    {"t1": {"kind": "mri", "fit": "volume"}})
  c2 = c.copy_and_resolve_references()
  c2.data.store = str(mri_data / "inputs")
  evaluate_lib.sample(c2, workdir)
  without_target = _pred(workdir, "samples")
  data_range = store.preset("s2", "t2").hi - store.preset("s2", "t2").lo
  assert np.abs(without_target - with_target).max() <= 1e-5 * data_range
  assert np.abs(with_target).max() > 0


def test_fixed_input_scale_is_renormalised(mri_data, tmp_path):
  """A user's store normalised with another fixed input scale than training's: the input is
  brought to the checkpoint's scale, so the prediction does not change."""
  rules = {"t1": {"rule": "fixed", "preset": {"name": "mri", "lo": 0.0, "hi": 1000.0}, "spec": {}},
           "t2": {"rule": "fixed", "preset": {"name": "mri", "lo": 0.0, "hi": 3000.0}, "spec": {}}}
  store_lib.convert(mri_data / "inputs.csv", tmp_path / "other",
                    {"t1": {"kind": "mri", "lo": -200.0, "hi": 2500.0}})
  store = store_lib.Store(tmp_path / "other")
  c = _config(tmp_path / "other")
  box = ((0, 20), (0, 18), (0, 16))
  x = volumes.volume_inputs(store, "s2", c, box, rules)[0, ..., 0]
  raw = nib.load(str(mri_data / "s2_t1.nii.gz")).get_fdata()
  np.testing.assert_allclose(x, raw / 500.0 - 1.0, atol=2e-5)


def test_target_fitted_on_itself_is_refused(mri_data, tmp_path):
  """A store whose target preset was fitted on each target volume (what version-1 stores did)
  cannot be evaluated: the message says how to reconvert."""
  store_lib.convert(mri_data / "both.csv", tmp_path / "old",
                    {"t1": {"kind": "mri", "fit": "volume"}, "t2": {"kind": "mri", "fit": "volume"}})
  store = store_lib.Store(tmp_path / "old")
  rules = inference_lib.rules_of(store, ("t1",), "t2")
  assert rules["t2"]["rule"] == "volume"
  with pytest.raises(ValueError, match=r"fitted on each 't2' volume itself.*Reconvert"):
    inference_lib.check_rules(rules, ("t1",), "t2", store.path)
  inference_lib.check_rules(rules, ("t1",), None, store.path)  # inputs alone are fine
  # A ref from an input to the target is refused too (the input would carry the target's scale).
  rules = {"x": {"rule": "ref", "ref": "y", "spec": {"kind": "mri", "ref": "y"}},
           "y": {"rule": "volume", "spec": {"kind": "mri", "fit": "volume"}}}
  with pytest.raises(ValueError, match="'x'"):
    inference_lib.check_rules(rules, ("x",), "y", "here")


def test_version_1_store_reads_with_a_warning_and_is_refused_for_evaluation(
    mri_data, tmp_path, caplog):
  import json  # pylint: disable=g-import-not-at-top
  store_lib.convert(mri_data / "both.csv", tmp_path / "v1",
                    {"t1": {"kind": "mri", "fit": "volume"}, "t2": {"kind": "mri", "fit": "volume"}})
  path = tmp_path / "v1" / "manifest.json"
  manifest = json.loads(path.read_text())
  manifest["version"] = 1
  manifest["presets"] = {"t1": {"kind": "mri"}, "t2": {"kind": "mri"}}
  del manifest["fitted"]
  path.write_text(json.dumps(manifest))
  store_lib._WARNED.clear()
  with caplog.at_level("WARNING", logger="jaxvol"):
    store = store_lib.Store(tmp_path / "v1")
  assert "reconvert" in caplog.text
  assert store.read("s0", "t1").shape == SHAPE  # still readable (training, inspection)
  with pytest.raises(ValueError, match="Reconvert"):
    inference_lib.check_rules(inference_lib.rules_of(store, ("t1",), "t2"), ("t1",), "t2",
                              store.path)


def test_fit_train_without_training_subjects_is_a_clear_error(mri_data, tmp_path):
  with pytest.raises(ValueError, match="no 'train' subject"):
    store_lib.convert(mri_data / "inputs.csv", tmp_path / "s", {"t1": "mri"})
  assert not (tmp_path / "s").exists()
  with pytest.raises(ValueError, match="fit=volume has no effect"):
    store_lib.convert(mri_data / "inputs.csv", tmp_path / "s",
                      {"t1": {"kind": "mri", "lo": 0.0, "hi": 1.0, "fit": "volume"}})


@pytest.mark.parametrize("ref_kw,own_kw,want", [
    ({"cap": 5.0}, {}, (0.0, 5.0)),
    ({"lo": 1.0, "hi": 9.0}, {}, (1.0, 9.0)),
    ({"cap": 5.0}, {"cap": 7.0}, (0.0, 7.0)),
    ({"lo": 1.0, "hi": 9.0}, {"lo": 0.5}, (0.5, 9.0)),
    ({}, {}, None),  # fit=train percentile of the reference, shared
])
def test_ref_shares_the_scale_with_every_option(mri_data, tmp_path, ref_kw, own_kw, want):
  """`ref=` takes the reference's scale whatever keywords set it, at conversion and at inference
  (`inference.resolve` from a store without the referring modality)."""
  store_lib.convert(mri_data / "both.csv", tmp_path / "s",
                    {"t1": {"kind": "pet", **ref_kw}, "t2": {"kind": "pet", "ref": "t1", **own_kw}})
  store = store_lib.Store(tmp_path / "s")
  rules = inference_lib.rules_of(store, ("t1",), "t2")
  for sid in ("s0", "s2"):
    got = store.preset(sid, "t2")
    if want is not None:
      assert (got.lo, got.hi) == want
    else:
      assert got == store.preset(sid, "t1") == store.fitted_preset("t1")
    assert inference_lib.resolve(rules, "t2", store, sid) == got
  assert inference_lib.shares_scale(rules, "t1", "t2") == (not own_kw)


def test_sampler_clamp_covers_the_preset_range(trained, caplog):
  """PET/MRI presets do not clip, so the configs widen the x0 clamp; training warns when the
  store's training targets leave it."""
  from conftest import ROOT, load_module  # pylint: disable=g-import-not-at-top
  for name, kind in (("full3d_mri_t1_t2", "mri"), ("wdm_mri_t1_t2", "mri"),
                     ("sparse_pet_denoise", "pet"), ("sparse_mri_sr", "mri"),
                     ("sparse_ct_denoise", "ct"), ("ppdm_pet_denoise", "pet")):
    c = load_module(os.path.join(ROOT, "configs", f"{name}.py"), name).get_config("smoke")
    assert c.diffusion.clip_x0 == (1.0 if kind == "ct" else base.UNCLIPPED_CLAMP), name
  c, _ = trained
  c = c.copy_and_resolve_references()
  c.method = "full3d"
  store = store_lib.Store(c.data.store)
  p = store.preset("s0", "t2")
  peak = max(abs(float(p.forward(np.float64(store.subjects()[i]["volumes"]["t2"]["stats"][k]))))
             for i in (0, 1) for k in ("min", "max"))
  c.diffusion.clip_x0 = 1.0
  with caplog.at_level("WARNING", logger="jaxvol"):
    assert loop.check_target_range(c, c.data.store) == pytest.approx(peak)
  assert ("clamps x0" in caplog.text) == (peak > 1.0)
  caplog.clear()
  c.diffusion.clip_x0 = peak + 0.01
  with caplog.at_level("WARNING", logger="jaxvol"):
    loop.check_target_range(c, c.data.store)
  assert "clamps x0" not in caplog.text


def test_ct_windows_share_hounsfield_units_whatever_the_ref():
  """The shared-data CT store's target refers to the input and repeats the HU window: both are in
  HU, so the low-dose input is scored as a floor; a PET target with its own window is not."""
  ct = {"name": "ct", "lo": -1000.0, "hi": 1000.0}
  rules = {"ct_low": {"rule": "fixed", "preset": ct, "spec": {"kind": "ct", "lo": -1000.0,
                                                              "hi": 1000.0}},
           "ct": {"rule": "ref", "ref": "ct_low",
                  "spec": {"kind": "ct", "lo": -1000.0, "hi": 1000.0, "ref": "ct_low"}}}
  assert inference_lib.shares_scale(rules, "ct_low", "ct")
  pet = {"rule": "fixed", "preset": {"name": "pet", "lo": 0.0, "hi": 5.0}, "spec": {"kind": "pet"}}
  rules = {"low": pet, "full": {"rule": "ref", "ref": "low",
                                "spec": {"kind": "pet", "cap": 7.0, "ref": "low"}}}
  assert not inference_lib.shares_scale(rules, "low", "full")
