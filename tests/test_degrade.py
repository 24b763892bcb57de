"""Degradations: Poisson thinning statistics and the NAC PET attenuation model."""

import numpy as np
import pytest

from jaxvol.data import degrade


def test_poisson_thinning_mean_and_variance():
  rng = np.random.default_rng(0)
  activity = np.full((40, 40, 40), 5.0, np.float32)
  activity[:20] = 20.0
  total = 1e6  # expected full-dose counts per voxel: ~15.6 (hot) / 3.9 (cold)
  full = degrade.poisson_thinning(activity, 1.0, total, rng)
  low = degrade.poisson_thinning(activity, 0.25, total, rng)
  assert full.dtype == np.float32 and full.shape == activity.shape
  for img in (full, low):  # unbiased in the activity's units
    assert img[:20].mean() == pytest.approx(20.0, rel=0.02)
    assert img[20:].mean() == pytest.approx(5.0, rel=0.02)
  # Variance in activity units = activity / counts_per_unit, with counts_per_unit ∝ dose.
  counts_per_unit = total / activity.sum()
  assert full[:20].var() == pytest.approx(20.0 / counts_per_unit, rel=0.05)
  assert low[:20].var() / full[:20].var() == pytest.approx(4.0, rel=0.08)
  # Seeded: same generator state -> same image.
  a = degrade.poisson_thinning(activity, 0.5, total, np.random.default_rng(3))
  b = degrade.poisson_thinning(activity, 0.5, total, 3)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw,match", [
    ({"dose_fraction": 0.0}, "dose_fraction"), ({"dose_fraction": 1.5}, "dose_fraction"),
    ({"activity": -np.ones((2, 2, 2))}, "non-negative"),
    ({"activity": np.zeros((2, 2, 2))}, "zero"), ({"total_counts": 0}, "total_counts")])
def test_poisson_thinning_validates(kw, match):
  args = dict(activity=np.ones((2, 2, 2)), dose_fraction=0.5, total_counts=100, rng=0)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    degrade.poisson_thinning(**args)


def _water_cylinder(n=41, nz=4, radius=15):
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  disk = (i - n // 2) ** 2 + (j - n // 2) ** 2 <= radius ** 2
  mu = np.zeros((n, n, nz), np.float32)
  mu[disk, 1:] = degrade.MU_WATER_511KEV_PER_CM
  return mu


@pytest.mark.parametrize("directions", [2, 4])
def test_attenuation_factor_physics(directions):
  mu = _water_cylinder()
  f = degrade.attenuation_factor(mu, (4.0, 4.0, 4.0), axis=2, directions=directions)
  assert f.dtype == np.float32 and f.shape == mu.shape
  assert (f > 0).all() and (f <= 1).all()
  np.testing.assert_array_equal(f[..., 0], 1.0)  # a plane without attenuating material
  c = 20
  centre, edge = f[c, c, 2], f[c, c + 14, 2]
  assert centre < edge < 1.0
  # Centre through 31 voxels of 4 mm water (12.4 cm) along each grid axis: exp(-0.096 * 12.4).
  if directions == 2:
    assert centre == pytest.approx(np.exp(-0.096 * 31 * 0.4), rel=1e-5)
  np.testing.assert_array_equal(degrade.attenuation_factor(np.zeros((5, 6, 7)), (1, 1, 1)), 1.0)
  # The scanner axis matters: planes are perpendicular to it.
  f0 = degrade.attenuation_factor(np.moveaxis(mu, 2, 0), (4.0, 4.0, 4.0), axis=0,
                                  directions=directions)
  np.testing.assert_allclose(np.moveaxis(f0, 0, 2), f, rtol=1e-6)


def test_diagonal_line_integrals_match_a_loop():
  rng = np.random.default_rng(0)
  mu = rng.random((5, 7, 2))
  lines = degrade._line_integrals(mu, 1.0, 2.0, 4)
  step = np.hypot(1.0, 2.0)
  for i in range(5):
    for j in range(7):
      diag = sum(mu[a, b] for a in range(5) for b in range(7) if a - b == i - j)
      anti = sum(mu[a, b] for a in range(5) for b in range(7) if a + b == i + j)
      np.testing.assert_allclose(lines[2][i, j], diag * step)
      np.testing.assert_allclose(lines[3][i, j], anti * step)
      np.testing.assert_allclose(lines[0][i, j], mu[:, j].sum(0) * 1.0)
      np.testing.assert_allclose(lines[1][i, j], mu[i, :].sum(0) * 2.0)


def test_simulate_nac_pet_and_mu_from_transmission():
  transm = np.zeros((30, 30, 3), np.float32)
  transm[5:25, 5:25] = 0.72  # soft tissue in the template's arbitrary units
  transm[5:7, 5:25] = 0.93   # a bone-like rim
  mu = degrade.mu_from_transmission(transm)
  assert np.median(mu[transm > 0.5]) == pytest.approx(0.096)
  assert mu[6, 10, 0] == pytest.approx(0.096 * 0.93 / 0.72)
  pet = np.where(transm > 0, 1.0, 0.0).astype(np.float32)
  nac = degrade.simulate_nac_pet(pet, mu, (2.0, 2.0, 2.0))
  factor = degrade.attenuation_factor(mu, (2.0, 2.0, 2.0))
  np.testing.assert_allclose(nac, pet * factor, rtol=1e-6)
  assert nac[15, 15, 1] < nac[8, 15, 1] <= 1.0
  with pytest.raises(ValueError, match="shape"):
    degrade.simulate_nac_pet(pet[:-1], mu, (2.0, 2.0, 2.0))
  with pytest.raises(ValueError, match="non-negative"):
    degrade.attenuation_factor(-mu, (2.0, 2.0, 2.0))


def test_real_pet_transm(shared_data):
  from jaxvol.data import nifti  # pylint: disable=g-import-not-at-top
  pet, geom = nifti.load_volume(shared_data / "templates_2mm" / "PET.nii.gz")
  transm, _ = nifti.load_volume(shared_data / "templates_2mm" / "Transm.nii.gz")
  mu = degrade.mu_from_transmission(transm)
  nac = degrade.simulate_nac_pet(pet, mu, geom.spacing)
  factor = degrade.attenuation_factor(mu, geom.spacing)
  # A head at 511 keV loses most coincidences from its centre: survival roughly 0.1..0.4 there.
  centre = tuple(s // 2 for s in pet.shape)
  assert 0.05 < factor[centre] < 0.5
  assert nac.sum() < pet.sum()
  low = degrade.poisson_thinning(pet, 0.1, 5e6, np.random.default_rng(0))
  assert low.mean() == pytest.approx(pet.mean(), rel=0.01)
