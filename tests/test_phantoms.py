"""Tests for jaxvol.data.phantoms: offline MNI152 maps, FDG-like activity, the demo dataset."""

import csv
import os
import socket

import nibabel as nib
import numpy as np
import pytest

from jaxvol.data import degrade
from jaxvol.data import phantoms
from jaxvol.eval import metrics


@pytest.fixture(scope="module")
def maps():
  pytest.importorskip("nilearn")
  # Any attempt to open a network connection fails the load: the maps must come from the package.
  mp = pytest.MonkeyPatch()

  def no_network(*args, **kwargs):
    raise AssertionError("mni152_tissue_maps tried to use the network")

  mp.setattr(socket.socket, "connect", no_network)
  mp.setattr(socket, "create_connection", no_network)
  try:
    yield phantoms.mni152_tissue_maps(resolution=2)
  finally:
    mp.undo()


def test_tissue_maps_offline(maps):
  shape = maps["gm"].shape
  assert shape == (99, 117, 95)
  for key in ("gm", "wm", "csf", "t1"):
    assert maps[key].shape == shape and maps[key].dtype == np.float32
  for key in ("gm", "wm", "csf"):
    assert 0.0 <= maps[key].min() and maps[key].max() <= 1.0
  assert maps["affine"].shape == (4, 4)
  assert maps["spacing"] == (2.0, 2.0, 2.0)
  # CSF fills the ventricles: a good part of the brain, far less than GM or WM.
  assert 0.01 * maps["gm"].sum() < maps["csf"].sum() < maps["gm"].sum()


def test_activity_ratios_synthetic():
  shape = (10, 10, 10)
  gm, wm, csf = np.zeros(shape), np.zeros(shape), np.zeros(shape)
  gm[:3], wm[3:6], csf[6:8] = 1.0, 1.0, 1.0
  act = phantoms.simulate_pet_activity(gm, wm, csf, smooth_fwhm_mm=None)
  assert act.dtype == np.float32
  assert act[0, 0, 0] / act[4, 0, 0] == pytest.approx(4.0)
  assert act[7, 0, 0] == pytest.approx(0.05)
  assert act[9, 0, 0] == 0.0
  blob = np.zeros((20, 20, 20))
  blob[8:12, 8:12, 8:12] = 1.0
  sharp = phantoms.simulate_pet_activity(blob, 0 * blob, 0 * blob, smooth_fwhm_mm=None)
  blurred = phantoms.simulate_pet_activity(blob, 0 * blob, 0 * blob)
  assert blurred.min() >= 0.0 and blurred.max() < sharp.max()
  assert blurred.sum() == pytest.approx(sharp.sum(), rel=1e-3)  # blur only redistributes


def test_activity_gm_wm_ratio_real_anatomy(maps):
  gm, wm, csf = maps["gm"], maps["wm"], maps["csf"]
  act = phantoms.simulate_pet_activity(gm, wm, csf, smooth_fwhm_mm=None)
  ratio = act[gm > 0.9].mean() / act[wm > 0.9].mean()
  # Partial volume in the probability maps pulls the ratio a little below the nominal 4.
  assert 3.0 < ratio < 4.5
  blurred = phantoms.simulate_pet_activity(gm, wm, csf, smooth_fwhm_mm=4.0)
  assert 2.0 < blurred[gm > 0.9].mean() / blurred[wm > 0.9].mean() < ratio


def test_lesions_are_hot_and_seeded(maps):
  args = (maps["gm"], maps["wm"], maps["csf"])
  base = phantoms.simulate_pet_activity(*args, smooth_fwhm_mm=None)
  a = phantoms.simulate_pet_activity(*args, smooth_fwhm_mm=None, n_lesions=2, rng=3)
  b = phantoms.simulate_pet_activity(*args, smooth_fwhm_mm=None, n_lesions=2, rng=3)
  np.testing.assert_array_equal(a, b)
  changed = a != base
  assert changed.any()
  assert np.all((a[changed] / base[changed] >= 2.0 - 1e-5) & (a[changed] / base[changed] <= 3.0 + 1e-5))


def test_crop_to_brain_keeps_world_positions():
  vol = np.zeros((10, 12, 14), np.float32)
  vol[3:5, 4:9, 2:3] = 1.0
  affine = np.diag([2.0, 2.0, 2.0, 1.0])
  affine[:3, 3] = (-10.0, -20.0, -30.0)
  (c, d), new_aff, box = phantoms.crop_to_brain((vol, 2 * vol), affine, margin=1)
  assert box == ((2, 6), (3, 10), (1, 4))
  assert c.shape == d.shape == (4, 7, 3)
  np.testing.assert_allclose(new_aff @ [0, 0, 0, 1], affine @ [2, 3, 1, 1])
  assert c.sum() == vol.sum()


def _read(csv_path):
  with open(csv_path, newline="") as f:
    rows = list(csv.DictReader(f))
  folder = os.path.dirname(csv_path)
  imgs = [{k: nib.load(os.path.join(folder, r[k])) for k in ("pet_low", "pet_full")} for r in rows]
  return rows, imgs


@pytest.mark.slow
def test_demo_dataset(maps, tmp_path):
  del maps  # requested only to skip without nilearn
  path = phantoms.write_demo_pet_dataset(tmp_path / "a", write_activity=True, n_train=2, n_val=1,
                                         n_test=1, seed=5, crop_margin=2)
  rows, imgs = _read(path)
  assert [r["split"] for r in rows] == ["train", "train", "val", "test"]
  assert list(rows[0]) == ["subject", "split", "pet_low", "pet_full", "activity"]
  affine = imgs[0]["pet_low"].affine
  shape = imgs[0]["pet_low"].shape
  assert len(shape) == 3 and shape[0] < 99
  for im in imgs:
    for v in im.values():
      assert v.shape == shape and v.get_data_dtype() == np.float32
      np.testing.assert_allclose(v.affine, affine)
  act = np.asarray(nib.load(str(tmp_path / "a" / rows[0]["activity"])).dataobj)
  low = np.asarray(imgs[0]["pet_low"].dataobj)
  full = np.asarray(imgs[0]["pet_full"].dataobj)
  mask = act > 0.05 * act.max()
  dr = float(act.max())
  assert 15.0 < metrics.psnr(low, act, mask, dr) < 32.0
  # Against their expectation (the reconstruction of noiseless counts), 10x fewer counts give
  # 10x the noise variance: 10 dB.
  expected = degrade.simulate_low_count_pet(act, 1e16, 1.0, (2.0, 2.0, 2.0), 0)
  p_low, p_full = metrics.psnr(low, expected, mask, dr), metrics.psnr(full, expected, mask, dr)
  assert p_full - p_low == pytest.approx(10.0, abs=1.0)
  # Reconstructed noise is spatially correlated; the mean is the activity's.
  noise = (low - expected)[:-1][mask[:-1] & mask[1:]], (low - expected)[1:][mask[:-1] & mask[1:]]
  assert np.corrcoef(*noise)[0, 1] > 0.3
  assert low[mask].mean() == pytest.approx(act[mask].mean(), rel=0.02)
  assert not list((tmp_path / "a").glob(".tmp*"))

  # Deterministic for a seed, and subject k depends only on (seed, k), not on the split sizes;
  # another seed gives other noise.
  path_b = phantoms.write_demo_pet_dataset(tmp_path / "b", seed=5, crop_margin=2, n_train=2,
                                           n_val=0, n_test=0)
  rows_b, imgs_b = _read(path_b)
  assert [r["split"] for r in rows_b] == ["train", "train"]
  np.testing.assert_array_equal(np.asarray(imgs_b[0]["pet_low"].dataobj), low)
  np.testing.assert_array_equal(np.asarray(imgs_b[1]["pet_full"].dataobj),
                                np.asarray(imgs[1]["pet_full"].dataobj))
  path_c = phantoms.write_demo_pet_dataset(tmp_path / "c", seed=6, crop_margin=2, n_train=1,
                                           n_val=0, n_test=0)
  _, imgs_c = _read(path_c)
  assert not np.array_equal(np.asarray(imgs_c[0]["pet_low"].dataobj), low)
