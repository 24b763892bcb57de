"""Degradations: Poisson thinning, the NAC PET attenuation model, low-dose CT and thick slices."""

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


# ---- Parallel-beam CT and low-dose noise insertion.


def _ellipse(nx, ny, a, b):
  i, j = np.meshgrid(np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2, indexing="ij")
  return (i / a) ** 2 + (j / b) ** 2


def test_radon_views_along_the_grid_axes_are_sums():
  rng = np.random.default_rng(0)
  img = rng.random((31, 24))
  sino = degrade.radon_parallel(img, [0.0, 90.0, 45.0])
  n_det = sino.shape[1]
  assert n_det % 2 == 1 and n_det >= np.hypot(31, 24)
  c = (n_det - 1) // 2
  # theta = 0: rays {x = s} integrate along axis 1; theta = 90: rays {y = s} along axis 0.
  np.testing.assert_allclose(sino[0, c - 15:c + 16], img.sum(1), atol=1e-12)
  # theta = 90 with an even axis 1: pixel centres fall between bins, but no mass is lost.
  assert sino[1].sum() == pytest.approx(img.sum(), rel=1e-12)
  assert sino[2].sum() == pytest.approx(img.sum(), rel=0.01)  # every view sees all the mass
  # A stack of slices along the last axis is projected slice by slice.
  stack = np.stack([img, 2 * img], axis=-1)
  np.testing.assert_allclose(degrade.radon_parallel(stack, [0.0, 45.0])[..., 1],
                             2 * sino[[0, 2]], rtol=1e-12)


def test_fbp_inverts_radon_on_an_ellipse():
  angles = np.arange(180) * 1.0
  r = _ellipse(64, 58, 25.0, 18.0)
  img = (r <= 1).astype(np.float64) * 2.0
  img[_ellipse(64, 58, 6.0, 6.0) <= 1] = 3.0  # an insert
  sino = degrade.radon_parallel(img, angles)
  rec = degrade.fbp_parallel(sino, angles, img.shape)
  assert rec.shape == img.shape
  flat = (_ellipse(64, 58, 21.0, 14.0) <= 1) & (_ellipse(64, 58, 9.0, 9.0) > 1)
  # Away from the edges (ringing of the sharp ramp kernel): within 1% on average, 5% everywhere.
  err = (rec - img)[flat]
  assert np.abs(err).mean() < 0.02 and np.abs(err).max() < 0.1 and abs(err.mean()) < 0.005
  assert abs(rec[_ellipse(64, 58, 3.0, 3.0) <= 1].mean() - 3.0) < 0.02
  assert np.abs(rec[_ellipse(64, 58, 29.0, 22.0) > 1]).max() < 0.15  # outside the object
  # Smoother kernels still reconstruct flat regions; stacks reconstruct slice by slice.
  rec_hann = degrade.fbp_parallel(np.stack([sino, -sino], -1), angles, img.shape, "hann")
  assert abs(rec_hann[..., 0][flat].mean() - 2.0) < 0.02
  np.testing.assert_allclose(rec_hann[..., 1], -rec_hann[..., 0])
  with pytest.raises(ValueError, match="does not match"):
    degrade.fbp_parallel(sino[:, :-1], angles, img.shape)
  with pytest.raises(ValueError, match="filter"):
    degrade.fbp_parallel(sino, angles, img.shape, "cosine")


def _water_phantom(n=64, nz=4, radius=25.0):
  hu = np.full((n, n, nz), -1000.0, np.float32)
  hu[_ellipse(n, n, radius, radius) <= 1] = 0.0
  return hu


def test_low_dose_ct_noise_scales_as_one_over_sqrt_dose():
  hu = _water_phantom()  # 20 cm water cylinder at 4 mm voxels
  spacing = (4.0, 4.0, 4.0)
  inner = np.broadcast_to((_ellipse(64, 64, 20.0, 20.0) <= 1)[..., None], hu.shape)
  std, mean = {}, {}
  for dose, seed in ((1.0, 1), (0.25, 2)):
    low = degrade.simulate_low_dose_ct(hu, spacing, dose, np.random.default_rng(seed),
                                       n_angles=120)
    assert low.dtype == np.float32 and low.shape == hu.shape
    std[dose], mean[dose] = float(low[inner].std()), float(low[inner].mean())
  assert std[0.25] / std[1.0] == pytest.approx(2.0, rel=0.2), std
  assert abs(mean[1.0]) < 3.0 and abs(mean[0.25]) < 5.0, mean  # water stays at 0 HU
  assert std[1.0] > 3.0  # noise is really there
  # The sharp ramp kernel passes more noise than the default Hann-apodised one.
  ramp = degrade.simulate_low_dose_ct(hu, spacing, 1.0, 1, n_angles=120, filter_name="ramp")
  assert ramp[inner].std() > 1.5 * std[1.0]
  # Electronic noise adds variance.
  noisy = degrade.simulate_low_dose_ct(hu, spacing, 1.0, 1, n_angles=120, electronic_noise=30.0)
  assert noisy[inner].std() > std[1.0]


def test_low_dose_ct_is_seeded_and_keeps_the_scanner_axis():
  hu = _water_phantom(n=33, nz=3, radius=12.0)
  hu[10:20, 12:16] = 300.0  # a bone-like insert
  a = degrade.simulate_low_dose_ct(hu, (2.0, 2.0, 5.0), 0.5, np.random.default_rng(7),
                                   n_angles=60)
  b = degrade.simulate_low_dose_ct(hu, (2.0, 2.0, 5.0), 0.5, 7, n_angles=60)
  np.testing.assert_array_equal(a, b)
  c = degrade.simulate_low_dose_ct(hu, (2.0, 2.0, 5.0), 0.5, 8, n_angles=60)
  assert not np.array_equal(a, c)
  # The same scan with the scanner axis first gives the same slices.
  moved = degrade.simulate_low_dose_ct(np.moveaxis(hu, 2, 0), (5.0, 2.0, 2.0), 0.5, 7,
                                       n_angles=60, axis=0)
  np.testing.assert_allclose(np.moveaxis(moved, 0, 2), a, atol=1e-3)


@pytest.mark.parametrize("kw,match", [
    ({"dose_fraction": 0.0}, "dose_fraction"), ({"dose_fraction": 1.5}, "dose_fraction"),
    ({"hu": np.zeros((8, 8))}, "3D"), ({"hu": np.full((8, 8, 2), np.nan)}, "NaN"),
    ({"spacing_mm": (1.0, 2.0, 3.0)}, "square"), ({"spacing_mm": (1.0, 1.0)}, "spacing"),
    ({"i0": 0.0}, "i0"), ({"n_angles": 0}, "n_angles"), ({"electronic_noise": -1.0}, "electronic"),
    ({"filter_name": "cosine"}, "filter"), ({"axis": 3}, "axis")])
def test_low_dose_ct_validates(kw, match):
  args = dict(hu=np.zeros((8, 8, 2)), spacing_mm=(1.0, 1.0, 1.0), dose_fraction=0.5, rng=0,
              n_angles=8)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    degrade.simulate_low_dose_ct(**args)


def test_hu_to_mu():
  np.testing.assert_allclose(degrade.hu_to_mu([-1000.0, 0.0, 1000.0, -1200.0]),
                             [0.0, 0.193, 0.386, 0.0])


# ---- Thick slices.


def test_low_resolution_keeps_constants_shape_and_linear_ramps():
  const = np.full((5, 6, 13), 7.5, np.float32)
  np.testing.assert_allclose(degrade.simulate_low_resolution(const, 4), const, rtol=1e-6)
  rng = np.random.default_rng(0)
  vol = rng.random((6, 5, 16)).astype(np.float32)
  one = degrade.simulate_low_resolution(vol, 1)
  assert one.dtype == np.float32
  np.testing.assert_array_equal(one, vol)
  for factor in (2, 3, 4):
    out = degrade.simulate_low_resolution(vol, factor)
    assert out.shape == vol.shape and out.dtype == np.float32
  # Block means of a linear ramp sit on the ramp at the block centres, and linear interpolation
  # between them gives the ramp back (between the first and last centres): no grid shift.
  ramp = np.broadcast_to(np.arange(16, dtype=np.float32), (3, 3, 16))
  for factor in (2, 4):
    out = degrade.simulate_low_resolution(ramp, factor)
    c0, c1 = (factor - 1) / 2, 16 - factor + (factor - 1) / 2
    inside = slice(int(np.ceil(c0)), int(np.floor(c1)) + 1)
    np.testing.assert_allclose(out[..., inside], ramp[..., inside], atol=1e-5)
    np.testing.assert_allclose(out[..., 0], c0)  # edge value kept beyond the first centre
  # Only the named axes change.
  out = degrade.simulate_low_resolution(vol, 2, axes=(0, 1))
  block = vol[:2, :2].mean(axis=(0, 1))
  np.testing.assert_allclose(out[0, 0], block, rtol=1e-5)  # voxel 0 sits before centre 0.5


def test_low_resolution_removes_high_frequencies():
  rng = np.random.default_rng(0)
  vol = rng.normal(size=(8, 8, 64)).astype(np.float32)

  def hf_energy(x):  # first differences along z: high-pass
    return float((np.diff(x, axis=2) ** 2).sum())

  e1, e2, e4 = (hf_energy(degrade.simulate_low_resolution(vol, f)) for f in (1, 2, 4))
  assert e2 < 0.5 * e1 and e4 < 0.5 * e2
  # In-plane detail is untouched by a through-plane degradation.
  in_plane = np.broadcast_to(vol[..., :1], vol.shape)
  np.testing.assert_allclose(degrade.simulate_low_resolution(in_plane, 4), in_plane, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    ({"factor": 0}, "factor"), ({"factor": 1.5}, "factor"), ({"factor": True}, "factor"),
    ({"axes": (3,)}, "axes"), ({"axes": (2, -1)}, "repeat"),
    ({"volume": np.full((4, 4, 4), np.inf)}, "NaN or Inf")])
def test_low_resolution_validates(kw, match):
  args = dict(volume=np.zeros((4, 4, 4)), factor=2)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    degrade.simulate_low_resolution(**args)
