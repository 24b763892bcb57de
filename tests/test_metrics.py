"""Tests for jaxvol.eval.metrics: identities, analytic values and a direct SSIM reference."""

import math

import numpy as np
import pytest
from scipy import ndimage

from jaxvol.eval import metrics


def _smooth_volume(shape, seed=0):
  rng = np.random.default_rng(seed)
  return ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 10.0 + 50.0


def _naive_ssim(x, y, data_range):
  """3D Gaussian-window SSIM by explicit 7^3 window sums at every voxel (no separability)."""
  r, sigma = 3, 1.5
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


def test_ssim_identity_and_noise_monotone():
  x = _smooth_volume((16, 16, 16))
  rng = np.random.default_rng(1)
  noise = rng.normal(size=x.shape)
  assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
  s1 = metrics.ssim(x + 0.5 * noise, x)
  s2 = metrics.ssim(x + 2.0 * noise, x)
  assert 1.0 > s1 > s2


def test_ssim_matches_direct_window_sum():
  x = _smooth_volume((10, 9, 11), seed=2)
  y = x + np.random.default_rng(3).normal(scale=2.0, size=x.shape)
  dr = float(x.max() - x.min())
  ref = _naive_ssim(y, x, dr)
  fast = metrics.ssim_map(y, x, dr)
  np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
  assert metrics.ssim(y, x) == pytest.approx(ref.mean(), abs=1e-6)


def test_nmse_mae_hfen_identities():
  x = _smooth_volume((12, 12, 12))
  assert metrics.nmse(x, x) == 0.0
  assert metrics.mae(x, x) == 0.0
  assert metrics.hfen(x, x) == 0.0
  assert metrics.nmse(2 * x, x) == pytest.approx(1.0)
  assert metrics.nmse(np.zeros_like(x), x) == pytest.approx(1.0)
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
  x = _smooth_volume((10, 10, 10))
  y = x + 1.0
  out = metrics.compute_all(y, x, data_range=20.0)
  assert set(out) == {"psnr", "ssim", "nmse", "mae", "hfen"}
  assert all(isinstance(v, float) for v in out.values())
  assert out["psnr"] == pytest.approx(20 * math.log10(20.0))
  assert out["mae"] == pytest.approx(1.0)


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
