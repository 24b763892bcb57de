"""Tests for jaxvol.eval.generation: FD/MMD identities and closed forms, MS-SSIM, both protocols."""

import numpy as np
import pytest
from scipy import ndimage

from jaxvol import fileio
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
  # One scale is plain SSIM with the 7-voxel window of jaxvol.eval.metrics.ssim7.
  assert generation.ms_ssim_3d(x, x + 0.3 * noise, data_range=4.0, scales=1) == pytest.approx(
      metrics.ssim7(x + 0.3 * noise, x, data_range=4.0), rel=1e-12)
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


def test_standardized_features_ignore_intensity_scaling_and_batch_padding():
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=2,
                                              standardize=True)
  vols = _smooth_volumes(3)
  feats = net(vols)  # Two batches, the second padded.
  assert feats.shape == (3, 32)
  np.testing.assert_allclose(feats[2:], net(vols[2:]), rtol=1e-6)
  # Per-volume standardisation: [-1, 1] and HU scalings of a volume give the same features.
  np.testing.assert_allclose(net(vols * 1000.0 - 500.0), feats, rtol=1e-4, atol=1e-5)


def test_default_features_take_volumes_as_given():
  # PRDiT feeds its [-1, 1] volumes unchanged: a rescaled volume is a different input.
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=2)
  assert not net.standardize
  vols = _smooth_volumes(2)
  assert np.abs(net(vols * 3.0) - net(vols)).max() > 1e-3


def test_jaxvol_protocol_report_labels_random_features_and_counts():
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=4,
                                              standardize=True)
  real = _smooth_volumes(6, seed=0)
  fake = _smooth_volumes(5, seed=1) + 0.5 * np.random.default_rng(2).normal(size=(5, 16, 16, 16))
  report = generation.generation_report(real, fake, net, rng=0, protocol="jaxvol",
                                        diversity_pairs=4)
  assert report["protocol"] == "jaxvol" and report["feature_input"] == "z-scored per volume"
  assert "NOT pretrained" in report["feature_network"]
  assert report["fid_label"] == "FD (random features)" and report["pretrained"] is False
  assert report["mmd_label"] == "MMD^2 (random features)"
  assert report["mmd"] == report["mmd_squared"]
  assert (report["n_real"], report["n_fake"], report["feature_dim"]) == (6, 5, 32)
  assert report["ms_ssim_pairs"] == report["ms_ssim_pairs_real"] == 4
  assert report["fid"] > 0 and report["mmd"] > 0
  assert 0 <= report["ms_ssim_diversity"] < 1 and 0 <= report["ms_ssim_diversity_real"] < 1
  pretrained = generation.FeatureNetwork("stand-in", net.fn, pretrained=True, dim=32,
                                         standardize=True)
  report = generation.generation_report(real, real, pretrained, rng=0, protocol="jaxvol",
                                        diversity_pairs=4)
  assert report["fid_label"] == "FID" and report["fid"] == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match="standardize=False"):
    generation.generation_report(real, fake, net, protocol="authors")
  with pytest.raises(ValueError, match="unknown generation protocol"):
    generation.generation_report(real, fake, net, protocol="paper")


def test_authors_protocol_report():
  net = generation.random_medicalnet_features(seed=0, width=4, depth=10, batch_size=4)
  real = np.tanh(_smooth_volumes(4, size=48, seed=0) * 3.0)
  fake = np.tanh(_smooth_volumes(3, size=48, seed=1) * 3.0)
  report = generation.generation_report(real, fake, net, rng=0)
  assert report["protocol"] == "authors" and report["feature_input"].startswith("as given")
  assert report["mmd_label"] == "MMD (random features)"
  assert report["mmd"] == pytest.approx(np.sqrt(report["mmd_squared"]), rel=1e-12)
  assert report["data_range"] == 1.0 and report["ms_ssim_settings"]["kernel_size"] == 3
  assert (report["ms_ssim_pairs"], report["ms_ssim_pairs_real"]) == (3, 6)  # all pairs
  assert 0 <= report["ms_ssim_diversity"] < 1 and 0 <= report["ms_ssim_diversity_real"] < 1
  feats_real = net(real)
  assert report["mmd_bandwidth"] == pytest.approx(
      generation.real_median_bandwidth(feats_real), rel=1e-12)
  assert report["feature_weights"] is None and report["feature_weights_sha256"] is None
  # Below MONAI's 48-voxel minimum the MS-SSIM is left out, with the reason.
  small = generation.generation_report(real[:, :16, :16, :16], fake[:, :16, :16, :16], net)
  assert small["ms_ssim_diversity"] is None and "48" in small["ms_ssim_note"]
  # Two real volumes: the diagonal's zeros are PRDiT's median; the report says what it used.
  two = generation.generation_report(real[:2, :16, :16, :16], fake[:, :16, :16, :16], net)
  assert "PRDiT's rule gives 0" in two["mmd_bandwidth_rule"] and np.isfinite(two["mmd"])


def test_feature_network_follows_the_config(tmp_path):
  from jaxvol import config as config_lib
  from jaxvol.eval import generate
  from jaxvol.models import medicalnet
  c = config_lib.base_config()
  assert c.eval.generation_protocol == "authors"
  c.eval.feature_width, c.eval.feature_depth = 4, 10
  assert not generate.feature_network(c).standardize
  c.eval.generation_protocol = "jaxvol"
  assert generate.feature_network(c).standardize
  model = medicalnet.resnet(10, width=4)
  path = tmp_path / "weights.npz"
  np.savez(path, **medicalnet.to_torch_state_dict(medicalnet.init_variables(model, 1)))
  c.eval.feature_weights, c.eval.generation_protocol = str(path), "authors"
  net = generate.feature_network(c)
  assert net.pretrained and not net.standardize and net.weights_file == str(path)
  assert net.weights_sha256 == fileio.file_sha256(path) and len(net.weights_sha256) == 64
  c.eval.feature_weights_sha256 = "0" * 64
  with pytest.raises(ValueError, match="SHA-256"):
    generate.feature_network(c)
  c.eval.generation_protocol = "paper"
  with pytest.raises(ValueError, match="generation_protocol"):
    generate.feature_network(c)


def test_monai_ms_ssim_identity_and_pairs():
  v = np.tanh(_smooth_volumes(3, size=48) * 3.0)
  assert generation.monai_ms_ssim(v[0], v[0]) == pytest.approx(1.0, abs=1e-6)
  assert generation.monai_ms_ssim(v[0], v[1]) == pytest.approx(
      generation.monai_ms_ssim(v[1], v[0]), rel=1e-6)
  mean, count = generation.monai_ms_ssim_diversity(v, batch_size=2)
  pairs = [generation.monai_ms_ssim(v[i], v[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
  assert count == 3 and mean == pytest.approx(np.mean(pairs), rel=1e-6)
  mean2, count2 = generation.monai_ms_ssim_diversity(v, pairs=2, rng=0, batch_size=2)
  assert count2 == 2 and min(pairs) - 1e-6 <= mean2 <= max(pairs) + 1e-6
