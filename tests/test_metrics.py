"""Tests for jaxvol.eval.metrics: identities, analytic values, direct SSIM sums and scikit-image."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from jaxvol.eval import metrics


def _smooth_volume(shape, seed=0):
  rng = np.random.default_rng(seed)
  return ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 10.0 + 50.0


def _naive_ssim(x, y, data_range, r=3):
  """3D Gaussian-window SSIM by explicit (2r+1)^3 window sums at every voxel (no separability)."""
  sigma = 1.5
  ax = np.arange(-r, r + 1, dtype=np.float64)
  g1 = np.exp(-0.5 * (ax / sigma) ** 2)
  w = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
  w /= w.sum()
  # np.pad 'symmetric' (d c b a | a b c d) is scipy.ndimage's 'reflect'.
  xp = np.pad(x, r, mode="symmetric")
  yp = np.pad(y, r, mode="symmetric")
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  out = np.empty(x.shape)
  for i, j, k in np.ndindex(x.shape):
    px = xp[i:i + 2 * r + 1, j:j + 2 * r + 1, k:k + 2 * r + 1]
    py = yp[i:i + 2 * r + 1, j:j + 2 * r + 1, k:k + 2 * r + 1]
    mx = np.sum(w * px)
    my = np.sum(w * py)
    vx = np.sum(w * (px - mx) ** 2)
    vy = np.sum(w * (py - my) ** 2)
    cxy = np.sum(w * (px - mx) * (py - my))
    out[i, j, k] = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
  return out


def test_psnr_identical_is_inf():
  x = _smooth_volume((8, 9, 10))
  assert metrics.psnr(x, x) == math.inf


def test_psnr_constant_offset_matches_formula():
  x = _smooth_volume((8, 9, 10))
  offset = 0.5
  expected = 10 * math.log10(100.0**2 / offset**2)
  assert metrics.psnr(x + offset, x, data_range=100.0) == pytest.approx(expected, abs=1e-9)
  # Default range is the target's own max - min.
  rng_ = x.max() - x.min()
  assert metrics.psnr(x + offset, x) == pytest.approx(10 * math.log10(rng_**2 / offset**2))


def _skimage_ssim(x, y, data_range, full=False):
  """scikit-image's setting that reproduces Wang et al. (its docstring's recommendation)."""
  return structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=data_range, full=full)


def test_ssim_window_constants():
  assert (metrics.SSIM_WIN_SIZE, metrics.SSIM_CROP, metrics.SSIM7_RADIUS) == (11, 5, 3)


@pytest.mark.parametrize("shape,scale,offset,data_range", [
    ((16, 18, 20), 10.0, 50.0, None),
    ((16, 18, 20), 10.0, 50.0, 200.0),
    ((24, 24, 24), 300.0, -1000.0, 2000.0),
    ((11, 12, 13), 1.0, 0.0, 2.0),
])
def test_ssim_matches_skimage(shape, scale, offset, data_range):
  rng = np.random.default_rng(sum(shape))
  x = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * scale * 5 + offset
  y = x + rng.normal(scale=0.3 * scale, size=shape)
  want = _skimage_ssim(y, x, float(x.max() - x.min()) if data_range is None else data_range)
  assert abs(metrics.ssim(y, x, data_range=data_range) - want) < 1e-6
  assert want < 0.99  # the noise is visible, so a wrong window or crop would show


def test_ssim_mask_averages_skimage_map_inside_the_crop():
  x = _smooth_volume((16, 18, 20), seed=4)
  y = x + np.random.default_rng(5).normal(scale=2.0, size=x.shape)
  dr = 60.0
  _, full_map = _skimage_ssim(y, x, dr, full=True)
  mask = np.zeros(x.shape, bool)
  mask[2:12, 3:15, 8:20] = True
  inner = (slice(5, -5),) * 3
  want = full_map[inner][mask[inner]].mean()
  assert abs(metrics.ssim(y, x, mask, dr) - want) < 1e-6
  # The masked mean differs from the unmasked one, so the mask is really used.
  assert abs(metrics.ssim(y, x, None, dr) - full_map[inner].mean()) < 1e-6
  assert abs(want - full_map[inner].mean()) > 1e-4


def test_ssim_map_matches_direct_window_sum():
  x = _smooth_volume((12, 11, 13), seed=6)
  y = x + np.random.default_rng(7).normal(scale=2.0, size=x.shape)
  dr = float(x.max() - x.min())
  ref = _naive_ssim(y, x, dr, r=5)
  np.testing.assert_allclose(metrics.ssim_map(y, x, dr), ref, atol=1e-6, rtol=0)
  assert metrics.ssim(y, x) == pytest.approx(ref[5:-5, 5:-5, 5:-5].mean(), abs=1e-6)


def test_ssim_small_volume_and_mask_outside_crop_raise():
  x = _smooth_volume((10, 16, 16))
  with pytest.raises(ValueError, match=r"ssim needs every side >= 11.*\(10, 16, 16\).*ssim7"):
    metrics.ssim(x + 1.0, x)
  with pytest.raises(ValueError, match="ssim needs"):
    metrics.compute_all(x + 1.0, x)
  assert 0.0 < metrics.ssim7(x + 1.0, x) < 1.0
  y = _smooth_volume((16, 16, 16))
  rim = np.zeros(y.shape, bool)
  rim[:5] = True
  with pytest.raises(ValueError, match="border crop"):
    metrics.ssim(y + 1.0, y, rim)


def test_ssim_identity_and_noise_monotone():
  x = _smooth_volume((16, 16, 16))
  rng = np.random.default_rng(1)
  noise = rng.normal(size=x.shape)
  for fn in (metrics.ssim, metrics.ssim7):
    assert fn(x, x) == pytest.approx(1.0, abs=1e-12)
    s1 = fn(x + 0.5 * noise, x)
    s2 = fn(x + 2.0 * noise, x)
    assert 1.0 > s1 > s2


def test_ssim7_matches_direct_window_sum():
  x = _smooth_volume((10, 9, 11), seed=2)
  y = x + np.random.default_rng(3).normal(scale=2.0, size=x.shape)
  dr = float(x.max() - x.min())
  ref = _naive_ssim(y, x, dr)
  fast = metrics.ssim7_map(y, x, dr)
  np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
  # No border crop: the mean over every voxel.
  assert metrics.ssim7(y, x) == pytest.approx(ref.mean(), abs=1e-6)
  mask = np.zeros(x.shape, bool)
  mask[1:7, 2:9, :5] = True
  assert metrics.ssim7(y, x, mask, dr) == pytest.approx(ref[mask].mean(), abs=1e-6)


def test_nmse_hand_value_and_offset_invariance():
  t = np.arange(8, dtype=np.float64).reshape(2, 2, 2)  # mean 3.5, sum of squared deviations 42
  p = t.copy()
  p[0, 0, 0] += 2.0
  p[1, 1, 0] -= 1.0
  assert metrics.nmse(p, t) == pytest.approx(5.0 / 42.0, rel=1e-12)
  assert metrics.nmse(p + 1000.0, t + 1000.0) == pytest.approx(5.0 / 42.0, rel=1e-12)
  # Predicting the target's own mean scores 1.
  assert metrics.nmse(np.full_like(t, 3.5), t) == pytest.approx(1.0)
  x = _smooth_volume((12, 12, 12))
  y = x + np.random.default_rng(8).normal(size=x.shape)
  mask = metrics.body_mask(x, threshold=50.0)
  for m in (None, mask):
    assert metrics.nmse(y + 1000.0, x + 1000.0, m) == pytest.approx(metrics.nmse(y, x, m),
                                                                      rel=1e-9)
  # A constant target has no variance: 0 when matched, inf otherwise.
  c = np.full((4, 4, 4), 7.0)
  assert metrics.nmse(c, c) == 0.0
  assert metrics.nmse(c + 1.0, c) == math.inf


def test_nmse_mae_hfen_identities():
  x = _smooth_volume((12, 12, 12))
  assert metrics.nmse(x, x) == 0.0
  assert metrics.mae(x, x) == 0.0
  assert metrics.hfen(x, x) == 0.0
  dev = np.sum((x - x.mean()) ** 2)
  assert metrics.nmse(2 * x, x) == pytest.approx(np.sum(x**2) / dev)
  assert metrics.mae(x + 3.0, x) == pytest.approx(3.0)
  # A constant offset has no Laplacian; what remains is the truncated LoG kernel's tiny nonzero sum.
  assert metrics.hfen(x + 3.0, x) < 5e-3
  assert metrics.hfen(2 * x, x) == pytest.approx(1.0)
  noisy = x + np.random.default_rng(0).normal(size=x.shape)
  assert metrics.hfen(noisy, x) > 0.1


def test_mask_restricts():
  x = _smooth_volume((8, 8, 8))
  y = x.copy()
  y[:4] += 10.0
  mask = np.zeros(x.shape, bool)
  mask[4:] = True
  assert metrics.mae(y, x, mask) == 0.0
  assert metrics.nmse(y, x, mask) == 0.0
  assert metrics.psnr(y, x, mask) == math.inf
  assert metrics.mae(y, x, ~mask) == pytest.approx(10.0)
  assert metrics.mae(y, x) == pytest.approx(5.0)


def test_compute_all_keys_and_values():
  x = _smooth_volume((12, 12, 12))
  y = x + 1.0
  out = metrics.compute_all(y, x, data_range=20.0)
  assert tuple(out) == metrics.METRICS == ("psnr", "ssim", "nmse", "mae", "hfen")
  assert all(isinstance(v, float) for v in out.values())
  assert out["psnr"] == pytest.approx(20 * math.log10(20.0))
  assert out["mae"] == pytest.approx(1.0)
  assert out["ssim"] == metrics.ssim(y, x, data_range=20.0)
  assert out["nmse"] == pytest.approx(x.size / np.sum((x - x.mean()) ** 2))


def test_conventions_name_every_metric():
  conv = metrics.conventions(2000.0, "body")
  assert tuple(conv) == metrics.METRICS
  assert json.loads(json.dumps(conv)) == conv
  assert all("body_mask" in line for line in conv.values())
  for needle in ("skimage", "sigma 1.5", "truncate 3.5", "11 taps", "cropping 5 voxels", "reflect",
                 "K1=0.01", "K2=0.03", "L = 2000"):
    assert needle in conv["ssim"], needle
  assert "L = 2000" in conv["psnr"]
  assert "mean(target)" in conv["nmse"] and "offset" in conv["nmse"]
  assert "13 taps" in conv["hfen"]
  plain = metrics.conventions()
  assert "all voxels" in plain["ssim"] and "per volume" in plain["psnr"]
  assert metrics.conventions(None, "none") == plain
  assert "'brain'" in metrics.conventions("preset hi - lo", "brain")["mae"]
  assert "L = preset hi - lo" in metrics.conventions("preset hi - lo")["ssim"]


def test_bad_inputs_raise():
  x = np.zeros((4, 5, 6))
  with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
    metrics.psnr(x, np.zeros((4, 5, 7)))
  with pytest.raises(ValueError, match="3D"):
    metrics.mae(np.zeros((4, 5)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="empty"):
    metrics.mae(x, x, mask=np.zeros(x.shape, bool))
  with pytest.raises(ValueError, match="mask shape"):
    metrics.mae(x, x, mask=np.ones((4, 5, 5), bool))
  bad = x.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    metrics.ssim(bad, x)
  # A constant target has no range to take PSNR/SSIM against.
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(x + 1.0, x)


def test_body_mask_fills_holes_and_drops_specks():
  vol = np.zeros((20, 20, 20))
  vol[4:16, 4:16, 4:16] = 100.0
  vol[8:12, 8:12, 8:12] = 0.0  # an enclosed dark cavity, e.g. a ventricle
  vol[0, 0, 0] = 100.0  # an isolated noise voxel
  mask = metrics.body_mask(vol)
  assert mask[10, 10, 10]
  assert not mask[0, 0, 0]
  assert mask.sum() == 12**3
  assert not metrics.body_mask(np.ones((5, 5, 5))).any()
