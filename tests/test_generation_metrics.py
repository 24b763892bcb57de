"""Tests for jaxvol.eval.generation: FD/MMD identities and closed forms, MS-SSIM, the report."""

import numpy as np
import pytest
from scipy import ndimage

from jaxvol.eval import generation, metrics


def _feats(n=200, dim=16, seed=0):
  """Samples of one correlated Gaussian (fixed mixing matrix); seed picks the draw."""
  mixing = np.random.default_rng(123).normal(size=(dim, dim)) * 0.3
  return np.random.default_rng(seed).normal(size=(n, dim)) @ mixing


def _smooth_volumes(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  return np.stack([ndimage.gaussian_filter(rng.normal(size=(size,) * 3), 1.5) for _ in range(n)])


def test_fd_and_mmd_of_a_set_with_itself_vanish():
  f = _feats()
  scale = np.trace(np.cov(f, rowvar=False))
  assert generation.frechet_distance(f, f) < 1e-6 * scale
  assert abs(generation.mmd_rbf(f, f)) < 1e-12


def test_fd_and_mmd_grow_with_a_mean_shift():
  f = _feats()
  g = _feats(seed=1)  # Another draw of the same distribution: the sampling-noise floor.
  bandwidth = generation.median_bandwidth(f, g)
  fds, mmds = [], []
  for shift in (0.0, 0.5, 1.0, 2.0):
    fds.append(generation.frechet_distance(f, g + shift))
    mmds.append(generation.mmd_rbf(f, g + shift, bandwidth))
  assert np.all(np.diff(fds) > 0) and np.all(np.diff(mmds) > 0)
  # The mean term adds ||shift * 1||^2 = 16 shift^2 on top of the noise floor.
  assert fds[-1] > 10 * fds[0] and mmds[-1] > 10 * mmds[0]
  # The unbiased estimate is centred on 0 for equal distributions, and positive when shifted.
  assert abs(generation.mmd_rbf(f, g, bandwidth, unbiased=True)) < 0.1 * mmds[-1]
  assert generation.mmd_rbf(f, g + 2.0, bandwidth, unbiased=True) > 0


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
  # Exact sample moments: standardise, then scale and shift each coordinate.
  rng = np.random.default_rng(0)
  z = rng.normal(size=(500, 4))
  z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False)).T)
  mu_a, sd_a = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 2.0, 0.5, 3.0])
  mu_b, sd_b = np.array([1.0, 1.0, 0.0, 0.0]), np.array([2.0, 2.0, 1.0, 0.1])
  a, b = mu_a + z * sd_a, mu_b + z[::-1] * sd_b
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
  assert generation.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_ms_ssim_identity_noise_and_single_scale_reference():
  x = _smooth_volumes(1, size=32)[0]
  noise = np.random.default_rng(1).normal(size=x.shape) * x.std()
  assert generation.ms_ssim_scales(x.shape) == 3  # 32, 16, 8 exceed the 7-voxel window; 4 not.
  assert generation.ms_ssim_3d(x, x) == pytest.approx(1.0, abs=1e-12)
  values = [generation.ms_ssim_3d(x, x + s * noise, data_range=4.0) for s in (0.1, 0.3, 1.0)]
  assert 1.0 > values[0] > values[1] > values[2] >= 0.0
  # One scale is plain SSIM as computed by jaxvol.eval.metrics.
  assert generation.ms_ssim_3d(x, x + 0.3 * noise, data_range=4.0, scales=1) == pytest.approx(
      metrics.ssim(x + 0.3 * noise, x, data_range=4.0), rel=1e-12)
  with pytest.raises(ValueError, match="too small"):
    generation.ms_ssim_scales((7, 64, 64))


def test_ms_ssim_diversity():
  same = np.repeat(_smooth_volumes(1)[:1], 4, axis=0)
  assert generation.ms_ssim_diversity(same, pairs=3, rng=0) == pytest.approx(1.0, abs=1e-12)
  different = _smooth_volumes(4)
  assert generation.ms_ssim_diversity(different, pairs=100, rng=0) < 0.5


def test_resnet50_features_are_2048_d():
  net = generation.random_medicalnet_features(seed=0, batch_size=1)
  assert net.dim == 2048 and not net.pretrained
  feats = net(_smooth_volumes(1)[..., None].astype(np.float32))
  assert feats.shape == (1, 2048) and np.all(np.isfinite(feats)) and feats.std() > 0


def test_features_ignore_intensity_scaling_and_batch_padding():
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=2)
  vols = _smooth_volumes(3)
  feats = net(vols)  # Two batches, the second padded.
  assert feats.shape == (3, 32)
  np.testing.assert_allclose(feats[2:], net(vols[2:]), rtol=1e-6)
  # Per-volume standardisation: [-1, 1] and HU scalings of a volume give the same features.
  np.testing.assert_allclose(net(vols * 1000.0 - 500.0), feats, rtol=1e-4, atol=1e-5)


def test_report_labels_random_features_and_counts():
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=4)
  real = _smooth_volumes(6, seed=0)
  fake = _smooth_volumes(5, seed=1) + 0.5 * np.random.default_rng(2).normal(size=(5, 16, 16, 16))
  report = generation.generation_report(real, fake, net, rng=0, diversity_pairs=4)
  assert "NOT pretrained" in report["feature_network"]
  assert report["fid_label"] == "FD (random features)" and report["pretrained"] is False
  assert report["mmd_label"] == "MMD (random features)"
  assert (report["n_real"], report["n_fake"], report["feature_dim"]) == (6, 5, 32)
  assert report["fid"] > 0 and report["mmd"] > 0
  assert 0 <= report["ms_ssim_diversity"] < 1 and 0 <= report["ms_ssim_diversity_real"] < 1
  pretrained = generation.FeatureNetwork("stand-in", net.fn, pretrained=True, dim=32)
  report = generation.generation_report(real, real, pretrained, rng=0, diversity_pairs=4)
  assert report["fid_label"] == "FID" and report["fid"] == pytest.approx(0.0, abs=1e-9)
