"""PRDiT's preprocessing as its authors do it: the `prdit` intensity preset and the
`ct_gen_prdit` task's resampling, against naive restatements of their script's steps."""

import numpy as np
import pytest
from scipy import ndimage

from jaxvol import prepare
from jaxvol.data import nifti
from jaxvol.data import presets
from jaxvol.data import store as store_lib


def _their_normalisation(v):
  """scripts/preproc_lidc_idri.py's steps 3-5 and lidc.py's 2x - 1, restated."""
  v = np.array(v, np.float64)
  v[v < -1000] = -1000
  clipped = np.clip(v, -1000, np.quantile(v, 0.999))
  return 2 * (clipped - clipped.min()) / (clipped.max() - clipped.min()) - 1


def test_prdit_preset_is_their_per_volume_normalisation():
  rng = np.random.default_rng(0)
  v = np.concatenate([rng.uniform(-1200, -900, 4000), rng.normal(40, 300, 20000),
                      rng.uniform(1500, 3000, 30)]).astype(np.float32)
  p = presets.fit_preset("prdit", v)
  assert p.name == "prdit" and p.lo == -1000.0 and p.hi == pytest.approx(np.quantile(v, 0.999))
  np.testing.assert_allclose(p.forward(v), _their_normalisation(v), atol=1e-5)
  inside = v[(v > p.lo) & (v < p.hi)]
  np.testing.assert_allclose(p.inverse(p.forward(inside)), inside, rtol=1e-5, atol=1e-2)
  soft = np.abs(rng.normal(0, 50, 1000)).astype(np.float32) - 500  # no air: lo is the minimum
  assert presets.fit_preset("prdit", soft).lo == pytest.approx(float(soft.min()))
  assert presets.depends_on_volume("prdit") and not presets.depends_on_volume(
      "prdit", {"lo": -1000, "hi": 900})
  with pytest.raises(ValueError, match="needs a volume"):
    presets.fit_preset("prdit")


def test_prdit_geometry_is_their_resample_crop_and_pool():
  rng = np.random.default_rng(1)
  vol = ndimage.gaussian_filter(rng.normal(0, 100, (30, 20, 25)), 1.5).astype(np.float32)
  affine = np.diag([3.0, 3.0, 3.0, 1.0])
  affine[:3, 3] = (-40.0, 12.0, 7.0)
  out, new_affine = prepare.prdit_geometry(vol, affine, crop=64, pool=2)
  # Their steps: zoom to 1 mm (order 3, nearest), centred crop (64 along the 90- and 75-long
  # axes, the whole 60), then 2^3 average pooling.
  big = ndimage.zoom(vol.astype(np.float64), 3.0, order=3, mode="nearest")
  assert big.shape == (90, 60, 75)
  crop = big[13:77, 0:60, 5:69]
  want = crop.reshape(32, 2, 30, 2, 32, 2).mean(axis=(1, 3, 5))
  assert out.shape == (32, 30, 32)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [2.0, 2.0, 2.0],
                             rtol=0.05)
  # Voxel (0, 0, 0) averages resampled voxels 13..14 (x), 0..1 (y), 5..6 (z): 1 mm apart, which
  # sit at old indices (13.5, 0.5, 5.5) x (n_old - 1) / (n_new - 1).
  step = (np.array([30, 20, 25]) - 1) / (np.array([90, 60, 75]) - 1)
  np.testing.assert_allclose(new_affine[:3, 3], affine[:3, :3] @ (step * [13.5, 0.5, 5.5])
                             + affine[:3, 3], atol=1e-6)


@pytest.mark.slow
def test_ct_gen_prdit_store_names_its_preset(shared_data, tmp_path):
  store_path = prepare.prepare("ct_gen_prdit", tmp_path / "data", source=shared_data)
  store = store_lib.Store(store_path)
  (subject,) = store.subjects("train")
  assert tuple(subject["shape"]) == (128, 128, 128)
  preset = store.preset(subject["id"], "ct")
  assert preset.name == "prdit" and preset.lo >= -1000.0 and 0 < preset.hi < 3000
  vol = store.read(subject["id"], "ct")
  assert -1.0 - 1e-6 <= vol.min() and vol.max() <= 1.0 + 1e-6 and vol.min() < -0.99
  geom = store.geometry(subject["id"], "ct")
  np.testing.assert_allclose(np.linalg.norm(nifti.ras_affine(geom)[:3, :3], axis=0), 2.0,
                             rtol=0.01)
  from jaxvol import experiment  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  c = experiment.packaged_config("prdit_ct_gen", "smoke")
  c.data.store = store_path
  assert loop.run_meta(c, store_path)["presets"][subject["id"]]["ct"]["name"] == "prdit"
