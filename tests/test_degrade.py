"""Degradations: PET counts and attenuation, low-dose CT noise insertion, thick slices."""

import numpy as np
import pytest
from scipy import integrate

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


# ---- PET: attenuation along lines of response, NAC images, tomographic low-count noise.


def _disc(n, radius, supersample=4):
  """Partial-volume fraction of each pixel of an n x n slice inside a centred disc (pixels)."""
  g = (np.arange(n * supersample) + 0.5) / supersample - n / 2.0
  x, y = np.meshgrid(g, g, indexing="ij")
  inside = (x ** 2 + y ** 2 <= radius ** 2).astype(np.float64)
  return inside.reshape(n, supersample, n, supersample).mean(axis=(1, 3))


def _radius(n):
  c = np.arange(n) - (n - 1) / 2.0
  return np.hypot(*np.meshgrid(c, c, indexing="ij"))


def _nac_cylinder_abel(r_cm, radius_cm, mu):
  """Inverse Abel transform of p(s) = L exp(-mu L), L = 2 sqrt(R^2 - s^2) (unit activity).

  f(r) = -(1/pi) int_r^R p'(s) / sqrt(s^2 - r^2) ds. With p'(s) = -(4 s / L) e^(-mu L) (1 - mu L)
  and s = sqrt(r^2 + t^2), then t = T sin(phi), T = sqrt(R^2 - r^2) (so L = 2 T cos(phi)), the
  1 / sqrt singularities cancel: f(r) = (2 / pi) int_0^(pi/2) e^(-mu L) (1 - mu L) dphi.
  """
  t = np.sqrt(max(radius_cm ** 2 - r_cm ** 2, 0.0))

  def integrand(phi):
    length = 2.0 * t * np.cos(phi)
    return np.exp(-mu * length) * (1.0 - mu * length)

  return 2.0 / np.pi * integrate.quad(integrand, 0.0, np.pi / 2.0)[0]


def test_nac_pet_matches_the_inverse_abel_transform_of_a_water_cylinder():
  # A 16 cm water cylinder of uniform activity: 48x48 pixels of 4 mm, radius 20 pixels, 3 slices.
  n, radius_px, pixel_mm, mu = 48, 20.0, 4.0, degrade.MU_WATER_511KEV_PER_CM
  disc = np.repeat(_disc(n, radius_px)[..., None], 3, axis=2)
  mu_map = disc * mu
  act = disc.copy()
  act[..., 0] *= 2.0  # activity scales the NAC image linearly, slice by slice
  nac = degrade.simulate_nac_pet(act, mu_map, (pixel_mm,) * 3, n_angles=96)
  assert nac.dtype == np.float32 and nac.shape == act.shape
  r = _radius(n)
  reference = np.vectorize(lambda rr: _nac_cylinder_abel(rr * pixel_mm / 10.0,
                                                         radius_px * pixel_mm / 10.0, mu))
  profile = {}
  for frac in (0.0, 0.25, 0.5, 0.8, 0.9):
    ring = r < 1.5 if frac == 0 else np.abs(r - frac * radius_px) < 1.0
    sim = nac[ring, 1:].mean()
    ref = reference(r[ring]).mean()
    profile[frac] = sim
    # Within 1.5% of the analytic profile (0.11 at the centre ... 0.41 at 0.9 R).
    assert sim == pytest.approx(ref, rel=0.015), (frac, sim, ref)
  assert profile[0.0] == pytest.approx(0.110, abs=0.003)
  assert profile[0.8] / profile[0.0] == pytest.approx(0.2888 / 0.1103, rel=0.03)
  np.testing.assert_allclose(nac[..., 0], 2.0 * nac[..., 1], rtol=1e-4, atol=1e-5)
  # Without attenuation FBP gives the activity back; the scanner axis can be any array axis.
  flat = degrade.simulate_nac_pet(act, np.zeros_like(act), (pixel_mm,) * 3, n_angles=96)
  assert flat[r < 15, 1].mean() == pytest.approx(1.0, abs=0.01)
  moved = degrade.simulate_nac_pet(np.moveaxis(act, 2, 0), np.moveaxis(mu_map, 2, 0),
                                   (pixel_mm,) * 3, axis=0, n_angles=96)
  np.testing.assert_allclose(np.moveaxis(moved, 0, 2), nac, atol=1e-6)


def test_lor_survival_is_exp_of_the_whole_line_integral():
  n, pixel_mm, mu = 41, 4.0, degrade.MU_WATER_511KEV_PER_CM
  mu_map = np.repeat(_disc(n, 15.0)[..., None], 2, axis=2) * mu
  survival = degrade.lor_survival(mu_map, (pixel_mm,) * 3, [0.0, 90.0])
  n_det = survival.shape[1]
  assert survival.shape == (2, n_det, 2) and n_det % 2 == 1
  # The central LOR crosses the whole 30-pixel diameter (12 cm of water).
  centre = survival[:, (n_det - 1) // 2]
  np.testing.assert_allclose(centre, np.exp(-mu * 30 * pixel_mm / 10.0), rtol=0.01)
  assert survival.min() > 0 and survival.max() == 1.0  # lines that miss the body


def test_mu_from_transmission_and_nac_validation():
  transm = np.zeros((30, 30, 3), np.float32)
  transm[5:25, 5:25] = 0.72  # soft tissue in the template's arbitrary units
  transm[5:7, 5:25] = 0.93   # a bone-like rim
  mu = degrade.mu_from_transmission(transm)
  assert np.median(mu[transm > 0.5]) == pytest.approx(0.096)
  assert mu[6, 10, 0] == pytest.approx(0.096 * 0.93 / 0.72)
  pet = np.where(transm > 0, 1.0, 0.0).astype(np.float32)
  nac = degrade.simulate_nac_pet(pet, mu, (2.0, 2.0, 2.0))
  assert nac[15, 15, 1] < nac[8, 15, 1] < 1.0
  with pytest.raises(ValueError, match="shape"):
    degrade.simulate_nac_pet(pet[:-1], mu, (2.0, 2.0, 2.0))
  with pytest.raises(ValueError, match="non-negative"):
    degrade.simulate_nac_pet(pet, -mu, (2.0, 2.0, 2.0))
  with pytest.raises(ValueError, match="square"):
    degrade.simulate_nac_pet(pet, mu, (2.0, 3.0, 2.0))


@pytest.fixture(scope="module")
def pet_phantom():
  """A 40x40x4 slab of 4 mm pixels: a warm disc (activity 1) with a hot core (4)."""
  r = _radius(40)
  act = np.zeros((40, 40, 4))
  act[r <= 15] = 1.0
  act[r <= 5] = 4.0
  return act, r


def test_low_count_pet_is_unbiased_with_correlated_noise(pet_phantom):
  act, r = pet_phantom
  spacing = (4.0, 4.0, 4.0)
  # The expectation: the same reconstruction from (practically) noiseless counts.
  expected = degrade.simulate_low_count_pet(act, 1e16, 1.0, spacing, 0)
  assert expected.dtype == np.float32 and expected.shape == act.shape
  inner, ring = r <= 13, (r > 6) & (r < 13)
  assert expected[inner].mean() == pytest.approx(act[inner].mean(), rel=0.005)
  pairs = ring[:-1] & ring[1:]  # horizontal neighbours inside the warm ring

  def neighbour_correlation(noise):
    return np.corrcoef(noise[:-1][pairs].ravel(), noise[1:][pairs].ravel())[0, 1]

  var = {}
  for dose in (1.0, 0.25):
    imgs = np.stack([degrade.simulate_low_count_pet(act, 2e6, dose, spacing, seed)
                     for seed in range(2)], -1)
    noise = imgs - expected[..., None]
    # Counts scaled back to activity units: the mean is kept (the total to 0.5%).
    assert imgs[inner].mean() == pytest.approx(act[inner].mean(), rel=0.01)
    assert imgs.sum() / 2 == pytest.approx(act.sum(), rel=0.005)
    var[dose] = float(noise[ring].var())
    # Reconstructed noise is spatially correlated (Hann kernel: about 0.6 between neighbours);
    # voxelwise Poisson noise is not.
    assert neighbour_correlation(noise) > 0.4
    white = degrade.poisson_thinning(act, dose, 2e6, 0) - act
    assert abs(neighbour_correlation(white)) < 0.1
  assert var[0.25] / var[1.0] == pytest.approx(4.0, rel=0.15)
  # Seeded.
  a = degrade.simulate_low_count_pet(act, 2e6, 0.5, spacing, np.random.default_rng(3))
  np.testing.assert_array_equal(a, degrade.simulate_low_count_pet(act, 2e6, 0.5, spacing, 3))


def test_low_count_pet_with_attenuation(pet_phantom):
  act, r = pet_phantom
  spacing = (4.0, 4.0, 4.0)
  mu = np.where(r[..., None] <= 15, degrade.MU_WATER_511KEV_PER_CM, 0.0) * np.ones(act.shape)
  nac = degrade.simulate_nac_pet(act, mu, spacing, filter_name="hann")
  nac_noisy = degrade.simulate_low_count_pet(act, 1e8, 1.0, spacing, 1, mu_map=mu)
  ac_noisy = degrade.simulate_low_count_pet(act, 1e8, 1.0, spacing, 1, mu_map=mu,
                                            attenuation_correction=True)
  inner = r <= 13
  # Without correction: the NAC image (darker than the activity); with it: the activity.
  assert nac_noisy[inner].mean() == pytest.approx(nac[inner].mean(), rel=0.01)
  assert nac[inner].mean() < 0.6 * act[inner].mean()
  assert ac_noisy[inner].mean() == pytest.approx(act[inner].mean(), rel=0.01)
  # Correction amplifies the noise of the attenuated counts: noisier than without attenuation.
  plain = degrade.simulate_low_count_pet(act, 1e8, 1.0, spacing, 1)
  expected = degrade.simulate_low_count_pet(act, 1e16, 1.0, spacing, 0)
  ring = (r > 6) & (r < 13)
  assert (ac_noisy - expected)[ring].std() > 1.5 * (plain - expected)[ring].std()


@pytest.mark.parametrize("kw,match", [
    ({"dose_fraction": 0.0}, "dose_fraction"), ({"total_counts": -1.0}, "total_counts"),
    ({"activity": -np.ones((8, 8, 2))}, "non-negative"), ({"activity": np.ones((8, 8))}, "3D"),
    ({"activity": np.zeros((8, 8, 2))}, "zero"), ({"attenuation_correction": True}, "mu_map"),
    ({"mu_map": np.ones((8, 8, 3))}, "shape"), ({"filter_name": "cosine"}, "filter"),
    ({"n_angles": 0}, "n_angles"), ({"spacing_mm": (1.0, 2.0, 1.0)}, "square"),
    ({"axis": 3}, "axis")])
def test_low_count_pet_validates(kw, match):
  args = dict(activity=np.ones((8, 8, 2)), total_counts=1e5, dose_fraction=0.5,
              spacing_mm=(1.0, 1.0, 1.0), rng=0)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    degrade.simulate_low_count_pet(**args)


def test_real_pet_transm(shared_data):
  from jaxvol.data import nifti  # pylint: disable=g-import-not-at-top
  pet, geom = nifti.load_volume(shared_data / "templates_2mm" / "PET.nii.gz")
  transm, _ = nifti.load_volume(shared_data / "templates_2mm" / "Transm.nii.gz")
  pet = np.clip(pet, 0.0, None)
  mu = degrade.mu_from_transmission(transm)
  nac = degrade.simulate_nac_pet(pet, mu, geom.spacing, n_angles=120)
  # A head at 511 keV (about 18 cm across, with a skull): the NAC brain centre keeps about 0.09
  # of the activity (0.11 at the centre of a 16 cm water cylinder), the whole image about 0.23.
  centre = tuple(slice(s // 2 - 3, s // 2 + 3) for s in pet.shape)
  ratio = nac[centre].mean() / pet[centre].mean()
  assert 0.05 < ratio < 0.15, ratio
  assert 1.5 * ratio < nac.sum() / pet.sum() < 0.4




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


def test_fbp_noise_variance_closed_form_and_monte_carlo():
  n, angles = 25, np.arange(40) * 4.5
  n_det = degrade.radon_parallel(np.zeros((n, n)), angles).shape[1]
  # Ramp kernel, unit bin variance: the centre pixel sits on bin centres in every view, so its
  # variance is (pi / A)^2 * A * sum_n h[n]^2 = pi^2 / (12 A) (Parseval, module docstring).
  var = degrade.fbp_noise_variance(np.ones((40, n_det)), angles, (n, n))
  assert var[n // 2, n // 2] == pytest.approx(np.pi ** 2 / (12 * 40), rel=1e-3)
  # Hann kernel and a bin-dependent variance, against 4000 noise realisations reconstructed as
  # a stack of slices.
  bin_var = np.outer(1.0 + 0.5 * np.cos(np.deg2rad(angles)), 1.0 + np.arange(n_det) / n_det)
  rng = np.random.default_rng(0)
  noise = rng.standard_normal((40, n_det, 4000)) * np.sqrt(bin_var)[..., None]
  empirical = degrade.fbp_parallel(noise, angles, (n, n), "hann").var(axis=-1)
  predicted = degrade.fbp_noise_variance(bin_var, angles, (n, n), "hann")
  ratio = empirical / predicted
  assert ratio.mean() == pytest.approx(1.0, abs=0.01)
  assert np.abs(ratio - 1.0).max() < 0.15
  with pytest.raises(ValueError, match="non-negative"):
    degrade.fbp_noise_variance(-bin_var, angles, (n, n))


@pytest.fixture(scope="module")
def water_disc():
  """A 20 cm water cylinder in air: 49x49 pixels of 5 mm (radius 20 pixels), 4 slices."""
  r = _radius(49)
  hu = np.full((49, 49, 4), -1000.0, np.float32)
  hu[r <= 20] = 0.0
  return hu, r


def _ct_noise(hu, dose, seeds, **kw):
  return np.stack([degrade.simulate_low_dose_ct(hu, (5.0, 5.0, 5.0), dose, seed, n_angles=90,
                                                **kw) - hu for seed in seeds])


def test_low_dose_ct_noise_matches_the_calibrated_prediction(water_disc):
  hu, r = water_disc
  body = np.broadcast_to((r <= 20)[None, ..., None], (2,) + hu.shape)
  sigma = degrade.CT_FULL_DOSE_NOISE_HU
  # Full dose adds nothing: the input already carries the full-dose noise.
  np.testing.assert_array_equal(degrade.simulate_low_dose_ct(hu, (5.0,) * 3, 1.0, 0), hu)
  # Noise insertion adds the missing variance sigma^2 (1 / dose - 1), averaged over the body,
  # whatever the kernel: 19.1 HU at dose 0.25 and 33 HU at dose 0.1 for the 11 HU scan.
  corr = {}
  for dose, filter_name in ((0.25, "ramp"), (0.1, "ramp"), (0.25, "hann")):
    noise = _ct_noise(hu, dose, (1, 2), filter_name=filter_name)
    assert noise.dtype == np.float32
    target = sigma * np.sqrt(1.0 / dose - 1.0)
    assert noise[body].std() == pytest.approx(target, rel=0.15), (dose, filter_name)
    assert abs(noise[body].mean()) < 0.05 * target  # water stays at 0 HU
    a, b = noise[:, 10:39, 10:38], noise[:, 10:39, 11:39]
    corr[filter_name] = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    if filter_name == "ramp" and dose == 0.1:
      # Voxel by voxel: fbp_noise_variance of the inserted line-integral variance.
      angles = np.arange(90) * 2.0
      p = degrade.radon_parallel(degrade.hu_to_mu(hu, 0.0193), angles) * 5.0
      hu_per_unit = 1000.0 / (0.0193 * 5.0)
      i0 = degrade.ct_i0_for_noise(p, hu > -500, angles, sigma / hu_per_unit, "ramp")
      extra = (1.0 / dose - 1.0) * np.exp(p) / i0
      predicted = degrade.fbp_noise_variance(extra, angles, (49, 49), "ramp") * hu_per_unit ** 2
      for lo, hi in ((5, 10), (10, 15), (15, 19)):
        ring = (r >= lo) & (r < hi)
        assert noise[:, ring].std() == pytest.approx(np.sqrt(predicted[ring].mean()), rel=0.15)
  assert corr["hann"] > corr["ramp"] + 0.3  # same level, smoother texture
  # The calibration follows the stated full-dose noise.
  louder = _ct_noise(hu, 0.25, (1,), filter_name="ramp", full_dose_noise_hu=2 * sigma)
  assert louder[body[:1]].std() == pytest.approx(2 * sigma * np.sqrt(3.0), rel=0.15)


def test_low_dose_ct_with_fixed_photon_count(water_disc):
  hu, r = water_disc
  body = np.broadcast_to((r <= 18)[None, ..., None], (2,) + hu.shape)
  # Added variance (1 / dose - 1) / (I0 exp(-p)): 3x as much at dose 0.25 as at 0.5.
  var = {d: _ct_noise(hu, d, (3, 4), i0=1e5)[body].var() for d in (0.5, 0.25)}
  assert var[0.25] / var[0.5] == pytest.approx(3.0, rel=0.15)
  # A fixed I0 ignores full_dose_noise_hu; electronic noise adds variance.
  assert _ct_noise(hu, 0.5, (3, 4), i0=1e5, full_dose_noise_hu=100.0)[body].var() == pytest.approx(
      var[0.5], rel=1e-6)
  noisy = _ct_noise(hu, 0.5, (3, 4), i0=1e5, electronic_noise=30.0)
  assert noisy[body].var() > 1.2 * var[0.5]


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
    ({"filter_name": "cosine"}, "filter"), ({"axis": 3}, "axis"),
    ({"full_dose_noise_hu": 0.0}, "full_dose_noise_hu")])
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
