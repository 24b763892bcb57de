"""Classical references (jaxvol.eval.references): each recovers what it should, and tuning reads
the training data only."""

import json
import shutil

import numpy as np
import pytest
from scipy import ndimage

from jaxvol import config as base
from jaxvol.data import inference as inference_lib
from jaxvol.data import store as store_lib
from jaxvol.eval import volumes
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import references as refs
from conftest import write_pet_store

ALL = ("gaussian", "nlm", "lut", "lut_gaussian", "bspline")


def _field(shape, seed):
  rng = np.random.default_rng(seed)
  return (ndimage.gaussian_filter(rng.gamma(2.0, 1.0, shape), 2.0) * 10).astype(np.float32)


def test_gaussian_tuning_finds_a_blur_for_white_noise_and_none_without_noise():
  clean = [_field((20, 20, 20), s) for s in range(2)]
  noisy = [refs.Pair(f"n{i}", c + np.random.default_rng(9 + i).normal(0, 2.0, c.shape)
                     .astype(np.float32), c) for i, c in enumerate(clean)]
  tuned = refs.tune_one("gaussian", noisy, 40.0)
  assert tuned["params"]["sigma"] > 0
  identity = [score for p, score in tuned["grid"] if p["sigma"] == 0.0][0]
  assert tuned["train_psnr"] > identity + 3.0
  exact = refs.tune_one("gaussian", [refs.Pair("c", c, c) for c in clean], 40.0)
  assert exact["params"]["sigma"] == 0.0  # nothing to remove: the input itself wins


def test_nonlocal_means_beats_the_noisy_input():
  c = _field((24, 24, 24), 3)
  pair = refs.Pair("p", c + np.random.default_rng(1).normal(0, 2.0, c.shape).astype(np.float32), c)
  tuned = refs.tune_one("nlm", [pair], 40.0)
  assert tuned["train_psnr"] > refs.score(pair.input, c, 40.0) + 2.0


def test_lookup_table_learns_a_monotone_and_a_non_monotone_contrast():
  t1 = _field((20, 20, 20), 4)
  for mapping in (lambda x: 100.0 - 3.0 * x, lambda x: (x - 10.0) ** 2):
    pair = refs.Pair("p", t1, mapping(t1).astype(np.float32))
    tuned = refs.tune_one("lut", [pair], 100.0)
    pred = refs.apply(tuned, t1)
    inside = (t1 > np.percentile(t1, 1)) & (t1 < np.percentile(t1, 99))
    err = np.abs(pred - pair.target)[inside]
    assert err.max() < 0.02 * np.ptp(pair.target), err.max()


def test_bspline_recovers_a_smooth_profile_better_than_linear():
  z = np.arange(40, dtype=np.float64)
  profile = np.sin(z / 40.0 * 2 * np.pi * 2)
  fine = np.broadcast_to(profile, (6, 5, 40)).astype(np.float32)
  from jaxvol.data import degrade  # pylint: disable=g-import-not-at-top
  thick = degrade.simulate_low_resolution(fine, 4, axes=(2,))
  cubic = refs.bspline_upsample(thick, 4, 2)
  core = slice(4, 36)
  assert np.abs(cubic - fine)[..., core].mean() < np.abs(thick - fine)[..., core].mean()
  # At the block centres the spline passes through the coarse samples.
  centres = np.arange(10) * 4 + 1.5
  lin = np.interp(centres, np.arange(40), thick[0, 0])
  assert np.allclose(np.interp(centres, np.arange(40), cubic[0, 0])[1:-1], lin[1:-1], atol=0.05)
  pair = refs.Pair("p", thick, fine)
  tuned = refs.tune_one("bspline", [pair], 2.0)
  assert tuned["params"] == {"factor": 4, "axis": 2}


def test_resolve_names():
  auto = refs.resolve_names("auto", comparable=True)
  assert auto[0] == "gaussian" and auto[1] in ("nlm", "bm4d") and len(auto) == 2
  assert refs.resolve_names("auto", comparable=False) == ["lut", "lut_gaussian"]
  assert refs.resolve_names("gaussian, lut", comparable=True) == ["gaussian", "lut"]
  assert refs.resolve_names("", comparable=True) == []
  assert refs.resolve_names("cheap", comparable=True) == ["gaussian"]
  assert refs.resolve_names("cheap", comparable=False) == ["lut"]
  with pytest.raises(ValueError, match="unknown classical reference 'wiener'"):
    refs.resolve_names("wiener", comparable=True)


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
  """Two stores with the same training subjects and different test voxels."""
  a = write_pet_store(tmp_path_factory.mktemp("a"), (20, 18, 16), ["train", "train", "test"])
  b_root = tmp_path_factory.mktemp("b")
  write_pet_store(b_root, (20, 18, 16), ["train", "train", "test"])
  # The same subjects but the test subject's volumes, converted again with the same presets.
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  for name in ("low", "full"):
    img = nib.load(b_root / f"s2_{name}.nii.gz")
    nib.save(nib.Nifti1Image(rng.gamma(1.0, 3.0, img.shape).astype(np.float32), img.affine),
             b_root / f"s2_{name}.nii.gz")
  b = str(b_root / "store2")
  store_lib.convert(b_root / "list.csv", b,
                    {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "ref": "pet_low"}})
  return a, b


def _config(store_path):
  c = base.base_config()
  c.data.store, c.data.inputs, c.data.target = store_path, ("pet_low",), "pet_full"
  c.eval.references = ",".join(ALL)
  c.eval.reference_tune_box = (16, 16, 16)
  return c


def test_tuned_parameters_do_not_depend_on_the_test_volume(two_stores):
  tuned = []
  for path in two_stores:
    store = store_lib.Store(path)
    c = _config(path)
    rules = inference_lib.rules_of(store, c.data.inputs, c.data.target)
    s = store.subjects()[2]
    vol = store.read(s["id"], "pet_full")
    tuned.append((volumes.tuned_references(c, store, rules, None), float(vol.mean())))
  (ta, mean_a), (tb, mean_b) = tuned
  assert mean_a != pytest.approx(mean_b)  # the test volumes do differ
  assert set(ta) == set(ALL)
  assert json.dumps(ta, sort_keys=True) == json.dumps(tb, sort_keys=True)
  for entry in ta.values():
    assert entry["tuned_on"]["subjects"] == ["s0", "s1"]


def test_tuning_is_cached_per_workdir(two_stores, tmp_path, monkeypatch):
  path = two_stores[0]
  store = store_lib.Store(path)
  c = _config(path)
  c.eval.references = "gaussian"
  rules = inference_lib.rules_of(store, c.data.inputs, c.data.target)
  first = volumes.tuned_references(c, store, rules, str(tmp_path))
  monkeypatch.setattr(refs, "tune", lambda *a, **k: pytest.fail("tuned again"))
  assert volumes.tuned_references(c, store, rules, str(tmp_path)) == first
  c.eval.reference_tune_box = (12, 12, 12)  # another tuning: not from the cache
  with pytest.raises(pytest.fail.Exception, match="tuned again"):
    volumes.tuned_references(c, store, rules, str(tmp_path))


def test_floor_is_the_body_mean_of_the_training_targets(two_stores):
  path = two_stores[0]
  store = store_lib.Store(path)
  c = _config(path)
  c.data.train_region = {"2": (0.0, 0.5)}
  floor = volumes.TrainingMeanFloor(c, store)
  subject = store.subjects()[2]
  pred, kind = floor(subject, ((0, 4), (0, 4), (0, 4)))
  values = []
  for s in store.subjects("train"):
    box = ((0, 20), (0, 18), (0, 8))
    v = store.preset(s["id"], "pet_full").inverse(store.read(s["id"], "pet_full", box))
    values.append(v[metrics_lib.body_mask(v)])
  assert "inside the body" in kind
  assert float(pred[0, 0, 0]) == pytest.approx(float(np.concatenate(values).mean()), rel=1e-5)


def test_unknown_test_volume_shape_is_cut_after_whole_volume_filtering(two_stores, tmp_path):
  """The evaluated reference equals the tuned filter applied to the whole input, then cut."""
  path = two_stores[0]
  store = store_lib.Store(path)
  c = _config(path)
  c.eval.references = "gaussian"
  c.data.eval_region = {"0": (0.5, 1.0)}
  rules = inference_lib.rules_of(store, c.data.inputs, c.data.target)
  tuned = volumes.tuned_references(c, store, rules, None)
  subject = store.subjects()[2]
  vol = next(volumes.store_volumes(c, store, [subject], rules, True, None, tuned))
  whole = store.preset(subject["id"], "pet_low").inverse(store.read(subject["id"], "pet_low"))
  want = refs.apply(tuned["gaussian"], whole)[10:20]
  np.testing.assert_allclose(vol.references["gaussian"], want, rtol=1e-5, atol=1e-5)
  shutil.rmtree(tmp_path, ignore_errors=True)
