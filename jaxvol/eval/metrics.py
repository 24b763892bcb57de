"""Image-quality metrics for 3D volumes on their original intensity scale.

These run on the host after sampling, in numpy with float64 accumulation, so the numbers do not
depend on the accelerator's precision. Every metric takes ``(pred, target, mask=None,
data_range=None)`` with ``(D, H, W)`` arrays and returns a Python float computed over the voxels
where ``mask`` is true (all voxels when ``mask`` is None). docs/metrics.md names each convention;
`conventions` returns the same as a JSON-friendly dict for evaluation summaries.

SSIM is the structural similarity index of Wang, Bovik, Sheikh and Simoncelli, "Image quality
assessment: from error visibility to structural similarity", IEEE TIP 2004, extended to 3D.
`ssim` follows scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=L)``, the setting that reproduces Wang et al.: an 11-tap
Gaussian window (sigma 1.5, truncated at 3.5 sigma), reflected borders, and the mean over the map
with a 5-voxel border cropped from every face. `ssim7` is the variant this library reported
first: a 7-tap window (truncated at 2 sigma) and the mean over every voxel, border included.
HFEN is the high-frequency error norm of Ravishankar and Bresler, "MR image reconstruction from
highly undersampled k-space data by dictionary learning", IEEE TMI 2011.

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
    "METRICS",
    "psnr",
    "ssim",
    "ssim_map",
    "ssim7",
    "ssim7_map",
    "nmse",
    "mae",
    "hfen",
    "body_mask",
    "compute_all",
    "conventions",
    "SSIM_SIGMA",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_TRUNCATE",
    "SSIM_WIN_SIZE",
    "SSIM_CROP",
    "SSIM7_RADIUS",
    "SSIM_RADIUS",
    "HFEN_SIGMA",
]

# The keys of compute_all, in report order.
METRICS = ("psnr", "ssim", "nmse", "mae", "hfen")

SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
# Wang et al.'s 11-tap Gaussian: scipy keeps int(truncate * sigma + 0.5) = int(5.75) = 5 voxels
# on each side of the centre.
SSIM_TRUNCATE = 3.5
SSIM_WIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1
# Border voxels whose window reaches past the volume (into reflected data) are left out of the mean.
SSIM_CROP = (SSIM_WIN_SIZE - 1) // 2
# ssim7: the same Gaussian cut at radius 3 (2 sigma), a 7^3 window, no border crop.
SSIM7_RADIUS = 3
# The 7-tap radius under its first name (jaxvol.eval.generation's "jaxvol" MS-SSIM imports it).
SSIM_RADIUS = SSIM7_RADIUS
# Reflection about the edge (d c b a | a b c d), scipy.ndimage's 'reflect', as scikit-image uses.
_FILTER_MODE = "reflect"
HFEN_SIGMA = 1.5
# scipy.ndimage.gaussian_laplace's default truncation: radius int(4 * 1.5 + 0.5) = 6, 13 taps.
_HFEN_TRUNCATE = 4.0


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


def _ssim_from_moments(pred, target, data_range, smooth):
  """Voxelwise SSIM from local moments taken with the linear filter ``smooth``.

  Means, variances and covariance are window-weighted population moments (no Bessel correction,
  as in Wang et al. for the Gaussian window).
  """
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  mu_x = smooth(pred)
  mu_y = smooth(target)
  # E[x^2] - E[x]^2 can dip below 0 by rounding; harmless since c2 > 0 keeps the ratio finite.
  var_x = smooth(pred * pred) - mu_x * mu_x
  var_y = smooth(target * target) - mu_y * mu_y
  cov = smooth(pred * target) - mu_x * mu_y
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return num / den


def _gauss11(x):
  return ndimage.gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode=_FILTER_MODE)


def _gauss7(x):
  return ndimage.gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM7_RADIUS / SSIM_SIGMA,
                                 mode=_FILTER_MODE)


def ssim_map(pred, target, data_range) -> np.ndarray:
  """Voxelwise 3D SSIM with the 11^3 Gaussian window of `ssim` (sigma 1.5, truncate 3.5).

  Separable 1D Gaussian filters along each axis with reflected borders; K1 = 0.01, K2 = 0.03.
  The map covers the whole volume; `ssim` averages it inside the border crop.

  Args:
    pred: float64 volume (D, H, W).
    target: float64 volume, same shape.
    data_range: positive dynamic range L.

  Returns:
    float64 SSIM map with the volume's shape.
  """
  return _ssim_from_moments(pred, target, data_range, _gauss11)


def ssim7_map(pred, target, data_range) -> np.ndarray:
  """Voxelwise 3D SSIM with a 7^3 Gaussian window (sigma 1.5 cut at radius 3), as `ssim7`.

  Args:
    pred: float64 volume (D, H, W).
    target: float64 volume, same shape.
    data_range: positive dynamic range L.

  Returns:
    float64 SSIM map with the volume's shape.
  """
  return _ssim_from_moments(pred, target, data_range, _gauss7)


def ssim(pred, target, mask=None, data_range=None) -> float:
  """3D SSIM as scikit-image computes Wang et al.'s: mean of the 11^3-window map, border cropped.

  Without a mask this equals ``skimage.metrics.structural_similarity(pred, target,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L)``: Gaussian
  window sigma 1.5 truncated at 3.5 sigma (11 taps), reflected borders, K1 = 0.01, K2 = 0.03, and
  the mean over the map with ``SSIM_CROP`` = 5 voxels removed from every face, since those
  voxels' windows reach into reflected data. With a mask the map is still computed on the whole
  volume (windows near the mask's edge see their neighbourhood) and averaged over the masked
  voxels that lie inside that crop.

  Args:
    pred: predicted volume, shape (D, H, W); every side at least ``SSIM_WIN_SIZE`` (11).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: the range L; defaults to target max - min over the mask.

  Returns:
    Mean SSIM, 1.0 for identical volumes.

  Raises:
    ValueError: a side is shorter than the 11-voxel window (as in scikit-image; `ssim7` takes
      volumes of any size), or no masked voxel lies inside the border crop.
  """
  pred, target, mask = _validate(pred, target, mask)
  if min(pred.shape) < SSIM_WIN_SIZE:
    raise ValueError(
        f"ssim needs every side >= {SSIM_WIN_SIZE} (its Gaussian window), got volume shape "
        f"{pred.shape}; use ssim7 (7-voxel window, no border crop) for smaller volumes")
  data_range = _resolve_range(target, mask, data_range)
  inside = np.zeros(pred.shape, dtype=bool)
  inside[tuple(slice(SSIM_CROP, n - SSIM_CROP) for n in pred.shape)] = True
  keep = mask & inside
  if not keep.any():
    raise ValueError(
        f"no masked voxel lies inside ssim's {SSIM_CROP}-voxel border crop of volume shape "
        f"{pred.shape}: nothing to average")
  return float(np.mean(ssim_map(pred, target, data_range)[keep]))


def ssim7(pred, target, mask=None, data_range=None) -> float:
  """3D SSIM with a 7^3 Gaussian window: mean of `ssim7_map` over the mask, border included.

  The window is sigma 1.5 cut at radius 3 (2 sigma) with reflected borders, K1 = 0.01, K2 = 0.03;
  the map is computed on the whole volume and averaged over every masked voxel (no crop), so it
  takes volumes of any size. This is the SSIM that jaxvol reported before `ssim` followed
  scikit-image; its values are not comparable with `ssim`'s.

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
  return float(np.mean(ssim7_map(pred, target, data_range)[mask]))


def nmse(pred, target, mask=None, data_range=None) -> float:
  """Normalised mean squared error: the MSE over the target's variance, both over the mask.

  ``sum((pred - target)^2) / sum((target - mean(target))^2)`` with sums and mean over the masked
  voxels. Dividing by the target's spread rather than its energy ``sum(target^2)`` makes the
  value independent of an intensity offset shared by pred and target (HU vs HU + 1000, or a
  PET/MRI baseline), and gives it a reading: 1 is what predicting the target's own mean over the
  mask scores, 0 is a perfect prediction.

  Args:
    pred: predicted volume, shape (D, H, W).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: unused; accepted so all metrics share one signature.

  Returns:
    NMSE (0 for identical volumes); ``inf`` if the target is constant on the mask and pred is
    not equal to it.
  """
  del data_range
  pred, target, mask = _validate(pred, target, mask)
  t = target[mask]
  err = float(np.sum((pred[mask] - t) ** 2))
  ref = float(np.sum((t - t.mean()) ** 2))
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

  LoG is a 3D Laplacian of Gaussian with sigma 1.5 voxels (Ravishankar and Bresler 2011; scipy's
  truncation at 4 sigma, 13 taps, reflected borders), which weighs edges and fine texture that
  MSE-type metrics underweight. The filter runs on the whole volume; only the norms are
  restricted to the mask.

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
  log_p = ndimage.gaussian_laplace(pred, sigma=HFEN_SIGMA, mode=_FILTER_MODE,
                                   truncate=_HFEN_TRUNCATE)
  log_t = ndimage.gaussian_laplace(target, sigma=HFEN_SIGMA, mode=_FILTER_MODE,
                                   truncate=_HFEN_TRUNCATE)
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
  """All metrics of `METRICS` with one shared mask and data range.

  Args:
    pred: predicted volume, shape (D, H, W); every side at least 11 (see `ssim`).
    target: reference volume, same shape.
    mask: optional boolean volume.
    data_range: the range L for PSNR and SSIM; defaults to target max - min over the mask.

  Returns:
    ``{"psnr", "ssim", "nmse", "mae", "hfen"}`` as floats.

  Raises:
    ValueError: from `ssim` when a side is shorter than 11 voxels, or no masked voxel lies
      inside its border crop; from the shared checks on shapes, NaN/Inf, an empty mask or range.
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


def conventions(data_range=None, mask_name=None) -> dict[str, str]:
  """One line per metric of `compute_all` naming its convention, for JSON summaries.

  Args:
    data_range: what L was: a number, a description such as ``"target preset hi - lo"``, or
      None for compute_all's default (the target's max - min over the mask, per volume).
    mask_name: which voxels were scored: None or ``"none"`` for every voxel (config.eval.mask's
      values), ``"body"`` for `body_mask` of the target, or any other description, used as given.

  Returns:
    ``{metric: definition}`` for every name in `METRICS`; plain strings, so ``json.dumps`` takes it.
  """
  if data_range is None:
    range_text = "L = target max - min over the mask, per volume"
  elif isinstance(data_range, str):
    range_text = f"L = {data_range}"
  else:
    range_text = f"L = {float(data_range):g}"
  if mask_name is None or mask_name == "none":
    where = "all voxels"
  elif mask_name == "body":
    where = "voxels of body_mask(target) (threshold, largest components, holes filled)"
  else:
    where = f"voxels of mask {mask_name!r}"
  return {
      "psnr": f"10 log10(L^2 / MSE), MSE over {where}; {range_text}",
      "ssim": (f"3D SSIM (Wang et al. 2004) as skimage structural_similarity(gaussian_weights="
               f"True, sigma={SSIM_SIGMA:g}, use_sample_covariance=False): Gaussian window sigma "
               f"{SSIM_SIGMA:g}, truncate {SSIM_TRUNCATE:g} ({SSIM_WIN_SIZE} taps per axis), "
               f"reflect borders, population moments, K1={SSIM_K1:g}, K2={SSIM_K2:g}; mean of the "
               f"map over {where} after cropping {SSIM_CROP} voxels from every face; {range_text}"),
      "nmse": (f"sum((pred - target)^2) / sum((target - mean(target))^2) over {where}: MSE over "
               "the target's variance, unchanged by an intensity offset; no range"),
      "mae": f"mean |pred - target| over {where}, in the volumes' intensity unit; no range",
      "hfen": (f"||LoG(pred) - LoG(target)|| / ||LoG(target)||, 3D Laplacian of Gaussian sigma "
               f"{HFEN_SIGMA:g}, truncate {_HFEN_TRUNCATE:g} "
               f"({2 * int(_HFEN_TRUNCATE * HFEN_SIGMA + 0.5) + 1} taps per axis), reflect "
               f"borders, on the whole volume; norms over {where}; no range"),
  }
