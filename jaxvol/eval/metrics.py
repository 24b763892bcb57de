"""Image-quality metrics for 3D volumes on their original intensity scale.

These run on the host after sampling, in numpy with float64 accumulation, so the numbers do not
depend on the accelerator's precision. Every metric takes ``(pred, target, mask=None,
data_range=None)`` with ``(D, H, W)`` arrays and returns a Python float computed over the voxels
where ``mask`` is true (all voxels when ``mask`` is None).

SSIM is the structural similarity index of Wang, Bovik, Sheikh and Simoncelli, "Image quality
assessment: from error visibility to structural similarity", IEEE TIP 2004, extended to 3D with
a Gaussian window. HFEN is the high-frequency error norm of Ravishankar and Bresler, "MR image
reconstruction from highly undersampled k-space data by dictionary learning", IEEE TMI 2011.

Intensity range: PSNR and SSIM need the dynamic range ``L`` of the signal. When ``data_range`` is
None it is taken as ``target.max() - target.min()`` over the mask, which varies from volume to
volume; callers comparing methods or volumes should pass one fixed range (for example the
window of the intensity preset) so the numbers are comparable.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = [
    "psnr",
    "ssim",
    "ssim_map",
    "nmse",
    "mae",
    "hfen",
    "body_mask",
    "compute_all",
    "SSIM_SIGMA",
    "SSIM_RADIUS",
    "HFEN_SIGMA",
]

# Gaussian window of Wang et al. (sigma 1.5), cut at radius 3 so the 3D window is 7^3 voxels.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 3
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# scipy keeps int(truncate * sigma + 0.5) voxels each side; 2.0 * 1.5 + 0.5 -> radius 3.
_SSIM_TRUNCATE = SSIM_RADIUS / SSIM_SIGMA
# Reflection about the edge (d c b a | a b c d) so border windows see plausible local statistics
# instead of zeros, which would spuriously lower SSIM at the boundary.
_FILTER_MODE = "reflect"
HFEN_SIGMA = 1.5


def _validate(pred, target, mask):
  """Returns float64 copies of pred/target and a boolean mask, raising on bad input."""
  pred = np.asarray(pred)
  target = np.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"pred and target shapes differ: pred {pred.shape} vs target {target.shape}")
  if pred.ndim != 3:
    raise ValueError(f"expected 3D (D, H, W) volumes, got pred {pred.shape} and target {target.shape}")
  pred = pred.astype(np.float64)
  target = target.astype(np.float64)
  for name, arr in (("pred", pred), ("target", target)):
    if not np.all(np.isfinite(arr)):
      bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
      raise ValueError(f"{name} contains {bad} NaN/Inf voxels")
  if mask is None:
    mask = np.ones(pred.shape, dtype=bool)
  else:
    mask = np.asarray(mask)
    if mask.shape != pred.shape:
      raise ValueError(f"mask shape {mask.shape} does not match volume shape {pred.shape}")
    mask = mask.astype(bool)
    if not mask.any():
      raise ValueError("mask is empty: no voxel to evaluate")
  return pred, target, mask


def _resolve_range(target, mask, data_range):
  """The dynamic range L: the caller's value, else the target's range inside the mask."""
  if data_range is None:
    values = target[mask]
    data_range = float(values.max() - values.min())
    if data_range <= 0:
      raise ValueError(
          "target is constant inside the mask, so its range is 0; pass data_range explicitly")
    return data_range
  data_range = float(data_range)
  if not math.isfinite(data_range) or data_range <= 0:
    raise ValueError(f"data_range must be a positive finite number, got {data_range}")
  return data_range


def psnr(pred, target, mask=None, data_range=None) -> float:
  """Peak signal-to-noise ratio in dB: 10 log10(L^2 / MSE) over the mask.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume; only voxels where it is true count.
    data_range: the range L; defaults to target max - min over the mask (see module docstring).

  Returns:
    PSNR in dB; ``inf`` when pred equals target on the mask (MSE is 0).
  """
  pred, target, mask = _validate(pred, target, mask)
  data_range = _resolve_range(target, mask, data_range)
  mse = float(np.mean((pred[mask] - target[mask]) ** 2))
  if mse == 0.0:
    return math.inf
  return 10.0 * math.log10(data_range**2 / mse)


def _gauss(x):
  return ndimage.gaussian_filter(x, sigma=SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode=_FILTER_MODE)


def ssim_map(pred, target, data_range) -> np.ndarray:
  """Voxelwise 3D SSIM with a 7^3 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.

  Local means, variances and covariance are Gaussian-weighted moments (no Bessel correction, as
  in Wang et al. for the Gaussian window), computed with separable 1D filters along each axis.

  Args:
    pred: float64 volume (D, H, W).
    target: float64 volume, same shape.
    data_range: positive dynamic range L.

  Returns:
    float64 SSIM map with the volume's shape.
  """
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  mu_x = _gauss(pred)
  mu_y = _gauss(target)
  # E[x^2] - E[x]^2 can dip below 0 by rounding; harmless since c2 > 0 keeps the ratio finite.
  var_x = _gauss(pred * pred) - mu_x * mu_x
  var_y = _gauss(target * target) - mu_y * mu_y
  cov = _gauss(pred * target) - mu_x * mu_y
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


def ssim(pred, target, mask=None, data_range=None) -> float:
  """3D structural similarity (Wang et al. 2004): mean of the SSIM map over the mask.

  The map is computed on the whole volume (so windows near the mask edge still see their
  neighbourhood) and then averaged over the masked voxels.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: the range L; defaults to target max - min over the mask.

  Returns:
    Mean SSIM, 1.0 for identical volumes.
  """
  pred, target, mask = _validate(pred, target, mask)
  data_range = _resolve_range(target, mask, data_range)
  return float(np.mean(ssim_map(pred, target, data_range)[mask]))


def nmse(pred, target, mask=None, data_range=None) -> float:
  """Normalised mean squared error ||pred - target||^2 / ||target||^2 over the mask.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: unused; accepted so all metrics share one signature.

  Returns:
    NMSE (0 for identical volumes); ``inf`` if the target is zero on the mask and pred is not.
  """
  del data_range
  pred, target, mask = _validate(pred, target, mask)
  err = float(np.sum((pred[mask] - target[mask]) ** 2))
  ref = float(np.sum(target[mask] ** 2))
  if ref == 0.0:
    return 0.0 if err == 0.0 else math.inf
  return err / ref


def mae(pred, target, mask=None, data_range=None) -> float:
  """Mean absolute error over the mask, in the volumes' intensity unit.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: unused; accepted so all metrics share one signature.

  Returns:
    MAE.
  """
  del data_range
  pred, target, mask = _validate(pred, target, mask)
  return float(np.mean(np.abs(pred[mask] - target[mask])))


def hfen(pred, target, mask=None, data_range=None) -> float:
  """High-frequency error norm: ||LoG(pred) - LoG(target)|| / ||LoG(target)|| over the mask.

  LoG is a 3D Laplacian of Gaussian with sigma 1.5 voxels (Ravishankar and Bresler 2011), which
  weighs edges and fine texture that MSE-type metrics underweight. The filter runs on the whole
  volume; only the norms are restricted to the mask.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: unused; accepted so all metrics share one signature.

  Returns:
    HFEN (0 for identical volumes); ``inf`` if LoG(target) vanishes on the mask and LoG(pred)
    does not.
  """
  del data_range
  pred, target, mask = _validate(pred, target, mask)
  log_p = ndimage.gaussian_laplace(pred, sigma=HFEN_SIGMA, mode=_FILTER_MODE)
  log_t = ndimage.gaussian_laplace(target, sigma=HFEN_SIGMA, mode=_FILTER_MODE)
  err = float(np.linalg.norm(log_p[mask] - log_t[mask]))
  ref = float(np.linalg.norm(log_t[mask]))
  if ref == 0.0:
    return 0.0 if err == 0.0 else math.inf
  return err / ref


def body_mask(volume, threshold=None, *, fraction=0.05) -> np.ndarray:
  """A simple foreground (body / brain) mask for restricting metrics to the subject.

  Steps: threshold; keep the connected components holding at least 10% of the largest one
  (drops detached noise specks and blobs but keeps e.g. two separate legs, and unlike a
  morphological opening it leaves the subject's outline untouched); fill enclosed holes
  (``scipy.ndimage.binary_fill_holes``) so dark interior structures fully enclosed by tissue,
  such as ventricles, are kept.

  Args:
    volume: 3D array.
    threshold: intensity above which a voxel is foreground. Defaults to ``lo + fraction *
      (hi - lo)`` with lo, hi the 0.5th and 99.9th percentiles, a robust minimum and maximum: a
      few stray voxels (a CT padding value below air, a metal artefact, a PET hot spot) then
      cannot move the threshold. With the default fraction 0.05 this lands above air or zero
      background in CT (about -930 HU), MRI and PET.
    fraction: the fraction of the range used by the default threshold.

  Returns:
    Boolean array with the volume's shape. All false when nothing exceeds the threshold (e.g. a
    constant volume); the metrics then raise on the empty mask rather than report a number.
  """
  volume = np.asarray(volume, dtype=np.float64)
  if volume.ndim != 3:
    raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
  if not np.all(np.isfinite(volume)):
    raise ValueError("volume contains NaN/Inf voxels")
  if threshold is None:
    lo, hi = (float(v) for v in np.percentile(volume, [0.5, 99.9]))
    if hi <= lo:
      lo, hi = float(volume.min()), float(volume.max())
    threshold = lo + fraction * (hi - lo)
  mask = volume > threshold
  if not mask.any():
    return mask
  labels, n = ndimage.label(mask)
  if n > 1:
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= 0.1 * sizes.max()) + 1
    mask = np.isin(labels, keep)
  return ndimage.binary_fill_holes(mask)


def compute_all(pred, target, mask=None, data_range=None) -> dict[str, float]:
  """All metrics with one shared mask and data range.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: the range L for PSNR and SSIM; defaults to target max - min over the mask.

  Returns:
    ``{"psnr", "ssim", "nmse", "mae", "hfen"}`` as floats.
  """
  pred, target, mask = _validate(pred, target, mask)
  data_range = _resolve_range(target, mask, data_range)
  return {
      "psnr": psnr(pred, target, mask, data_range),
      "ssim": ssim(pred, target, mask, data_range),
      "nmse": nmse(pred, target, mask),
      "mae": mae(pred, target, mask),
      "hfen": hfen(pred, target, mask),
  }
