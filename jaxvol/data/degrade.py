"""Degradations that turn one clean volume into a (degraded input, clean target) training pair.

Only what needs physics lives here: low-count PET (tomographic, or by voxelwise Poisson thinning),
non-attenuation-corrected (NAC) PET from a PET image plus an attenuation map, low-dose CT by
projection-domain noise insertion, and thick-slice (low through-plane resolution) acquisitions.
All functions are plain numpy/scipy, vectorised, and take a seeded `np.random.Generator` where
they draw random numbers.

Tomography (shared by PET and CT): 2D parallel-beam geometry per transaxial slice (slices
perpendicular to the scanner axis, the last array axis by default: RAS z), detector bins one voxel
wide, views evenly spread over 180 degrees; Joseph's interpolating projector (`radon_parallel`)
and filtered back-projection (`fbp_parallel`, Kak and Slaney, "Principles of Computerized
Tomographic Imaging", ch. 3). Oblique (cross-plane) lines, scatter, randoms, detector blur and
beam hardening are ignored. `fbp_noise_variance` gives the exact per-pixel variance of an FBP
image of independent sinogram noise for this discretisation.

PET (`simulate_low_count_pet`, `simulate_nac_pet`): an annihilation emits two 511 keV photons
back to back along a line of response (LOR); the pair is counted only if both photons leave the
body, with probability `exp(-integral of mu over the whole LOR)`. The two half-line integrals from
the emission point to the body's edge add up to the whole line, so this survival factor is the
same for every emission point on the LOR: attenuation multiplies each projection bin, not each
voxel. Measured coincidences in a bin are Poisson with mean (counts per unit activity) x (line
integral of activity) x (survival). An NAC image is the FBP of the attenuated sinogram; an
attenuation-corrected (AC) image divides each bin by its survival before FBP. Reconstruction
turns Poisson counts into spatially correlated image noise, as in a real PET image.

Low-dose CT (`simulate_low_dose_ct`): a SIMULATION of the extra quantum noise of a scan at a
fraction of the dose, not a model of any scanner. Assumptions:
  * Monochromatic beam at an effective energy of about 70 keV (a 120 kVp spectrum), where water
    attenuates mu_water = 0.193 / cm (`MU_WATER_70KEV_PER_CM`; NIST XCOM gives 0.206 cm^2/g at
    60 keV and 0.184 at 80 keV). HU are linear in mu by definition,
    `mu = mu_water * (1 + HU / 1000)`, clipped at 0 (air).
  * Beer-Lambert and Poisson statistics: a ray of line integral p with `I0` incident photons
    records `N ~ Poisson(I0 exp(-p))` (+ Gaussian electronic noise of std sigma_e counts); the
    measured line integral `log(I0 / N)` then has variance
    `1 / (I0 exp(-p)) + sigma_e^2 / (I0 exp(-p))^2` (delta method).
  * Noise insertion (Yu et al., JCAT 2012; Zeng et al., IEEE TNS 2015): the input is a real
    full-dose scan that already carries the noise of `I0` photons, so only the MISSING variance is
    added, `var(dose) - var(1)`: for quantum noise `(1 / dose - 1) / (I0 exp(-p))`, zero at
    dose 1. The added line-integral noise is drawn Gaussian with that variance (accurate while
    rays keep more than a few tens of photons; no log bias of photon-starved rays), reconstructed
    alone by FBP and added to the ORIGINAL image, so the image gets no discretisation or
    reconstruction artefacts of our coarse projector.
  * Dose calibration: `I0` (photons per ray per view for THIS discretisation) is not known for a
    real scan, so by default it is solved from the scan's own noise: the value for which the
    simulated full-dose noise, with the reconstruction kernel and number of views actually used,
    has mean variance `full_dose_noise_hu^2` over the body (voxels above -500 HU). That is
    `CT_FULL_DOSE_NOISE_HU` = 11 HU, measured on `shared/data/ct_abdomen/example_ct.nii.gz`
    (below). The noise inserted at `dose` then has a body-averaged standard deviation of
    `full_dose_noise_hu * sqrt(1 / dose - 1)` whatever the kernel (33 HU at dose 0.1), so the
    total noise of the low-dose image is `full_dose_noise_hu / sqrt(dose)` as for a real scan at
    that dose. The kernel only changes the noise TEXTURE (the sharp ramp gives fine, streaky
    grain; Hann a smoother one). Fixing `i0` instead makes the noise depend on the kernel, the
    number of views and the body size.

Thick slices (`simulate_low_resolution`): a box slice profile of `factor` voxels (the mean of
`factor` neighbouring voxels along an axis), sampled once per `factor` voxels, then linearly
interpolated back onto the original grid, so that input and target share one grid and affine.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy import sparse

MU_WATER_511KEV_PER_CM = 0.096  # Linear attenuation coefficient of water at 511 keV.
MU_WATER_70KEV_PER_CM = 0.193  # Water at a typical effective CT energy (120 kVp beam, ~70 keV).
DEFAULT_CT_ANGLES = 360  # Views over 180 degrees.
# Noise standard deviation of the full-dose abdominal CT in shared/data/ct_abdomen (3 mm voxels):
# over its largest uniform soft-tissue region (liver-like, mean 49 HU; Gaussian-smoothed HU in
# 40..90, eroded 3 voxels, 8147 voxels) the median standard deviation of 7x7 in-plane windows is
# 11.2 HU, and neighbouring voxels differ by 11.4 * sqrt(2) HU.
CT_FULL_DOSE_NOISE_HU = 11.0
CT_BODY_HU = -500.0  # Voxels above this are body (not air or lung) for the dose calibration.


def _rng(rng) -> np.random.Generator:
  # default_rng returns a Generator unchanged and seeds one from an int.
  return np.random.default_rng(rng)


def poisson_thinning(activity: np.ndarray, dose_fraction: float, total_counts: float,
                     rng: np.random.Generator | int) -> np.ndarray:
  """Simulates a PET acquisition at a fraction of the full dose (or scan time).

  `activity` is taken as proportional to the expected counts per voxel, scaled so that a FULL-dose
  acquisition has `total_counts` expected counts over the whole volume. The low-dose measurement
  is `Poisson(dose_fraction * expected)`; it is divided by the same factor that turned activity into
  low-dose expected counts, so the result is back in the units of `activity` and its expectation
  equals `activity` (only the noise grows, with variance proportional to 1 / dose_fraction).
  `dose_fraction = 1` gives a full-count image from a noiseless one.

  The noise is drawn voxel by voxel, so it is white, unlike the spatially correlated noise of a
  reconstructed PET image (`simulate_low_count_pet` draws counts on the sinogram and
  reconstructs them). Kept for a controlled white-noise benchmark and for existing callers.

  Args:
    activity: non-negative, finite array with a positive sum.
    dose_fraction: in (0, 1].
    total_counts: expected counts of the full-dose image (e.g. 1e7 for a brain scan), > 0.
    rng: a numpy Generator (or an int seed).

  Returns:
    float32 array of the same shape as `activity`.
  """
  activity = np.asarray(activity)
  if not 0.0 < float(dose_fraction) <= 1.0:
    raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
  if not float(total_counts) > 0.0:
    raise ValueError(f"total_counts must be positive, got {total_counts}")
  if not np.isfinite(activity).all():
    raise ValueError("activity has NaN or Inf voxels")
  if (activity < 0).any():
    raise ValueError(f"activity must be non-negative (min {float(activity.min())})")
  total = float(activity.sum(dtype=np.float64))
  if total <= 0.0:
    raise ValueError("activity is zero everywhere: nothing to count")
  counts_per_unit = float(total_counts) / total * float(dose_fraction)
  counts = _rng(rng).poisson(activity.astype(np.float64) * counts_per_unit)
  return (counts / counts_per_unit).astype(np.float32)


def mu_from_transmission(transm: np.ndarray, mu_water: float = MU_WATER_511KEV_PER_CM,
                         tissue_threshold: float = 0.5) -> np.ndarray:
  """Turns a 0..1 attenuation template into linear attenuation coefficients (1/cm at 511 keV).

  Templates such as SPM's `Transm.nii` are smoothed maps proportional to attenuation (air ~0, soft
  tissue ~0.72, skull ~0.93) without physical units. We scale linearly so that the median of the
  tissue voxels (those above `tissue_threshold * max`) equals water, which puts bone at roughly
  1.3x water, close to the real ratio at 511 keV.

  Args:
    transm: non-negative template.
    mu_water: attenuation of water in 1/cm (0.096 at 511 keV).
    tissue_threshold: fraction of the maximum above which a voxel counts as tissue.

  Returns:
    float32 mu map in 1/cm.
  """
  transm = np.asarray(transm, dtype=np.float64)
  if not np.isfinite(transm).all() or (transm < 0).any():
    raise ValueError("transmission template must be finite and non-negative")
  tissue = transm[transm > tissue_threshold * transm.max()]
  if tissue.size == 0:
    raise ValueError("transmission template has no tissue voxels (all zero?)")
  return (transm * (mu_water / np.median(tissue))).astype(np.float32)



# ---- Parallel-beam tomography: projector, filtered back-projection, noise propagation.


def _angles(angles_deg) -> np.ndarray:
  angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
  if angles.size == 0 or not np.isfinite(angles).all():
    raise ValueError("angles_deg must be a non-empty list of finite angles (degrees)")
  return angles


def _n_detectors(nx: int, ny: int) -> int:
  # Odd, so that bin (n - 1) / 2 sits on the rotation centre, and wide enough for the diagonal.
  n = int(np.ceil(np.hypot(nx, ny))) + 2
  return n + 1 - n % 2


@functools.lru_cache(maxsize=2)
def _projector(nx: int, ny: int, angles: tuple[float, ...]) -> sparse.csr_matrix:
  """Joseph's ray-driven projector: (n_angles * n_det, nx * ny), line integrals in voxel units.

  Pixel (i, j) has centre (x, y) = (i - (nx - 1) / 2, j - (ny - 1) / 2); the ray of bin k at angle
  theta is {x cos(theta) + y sin(theta) = s_k}. The ray is stepped one pixel at a time along the
  axis it is closest to, interpolating linearly along the other (Joseph, IEEE TMI 1982); each step
  has length 1 / max(|cos|, |sin|).
  """
  n_det = _n_detectors(nx, ny)
  theta = np.deg2rad(np.asarray(angles))
  s = np.arange(n_det) - (n_det - 1) / 2.0
  rows, cols, vals = [], [], []
  cos, sin = np.cos(theta), np.sin(theta)
  along_y = np.abs(cos) >= np.abs(sin)
  for steps_along_y in (True, False):
    a = np.flatnonzero(along_y == steps_along_y)
    if a.size == 0:
      continue
    if steps_along_y:  # one sample per row j, interpolated between columns i
      n_step, n_interp, c_step, c_interp = ny, nx, (ny - 1) / 2.0, (nx - 1) / 2.0
      main, other = cos[a], sin[a]
    else:
      n_step, n_interp, c_step, c_interp = nx, ny, (nx - 1) / 2.0, (ny - 1) / 2.0
      main, other = sin[a], cos[a]
    t = np.arange(n_step) - c_step
    # Solve x cos + y sin = s for the interpolated coordinate at each step coordinate t.
    u = (s[None, :, None] - t[None, None, :] * other[:, None, None]) / main[:, None, None]
    u = u + c_interp
    lo = np.floor(u)
    w = u - lo
    lo = lo.astype(np.int64)
    length = (1.0 / np.abs(main))[:, None, None]
    row = (a[:, None, None] * n_det + np.arange(n_det)[None, :, None])
    row = np.broadcast_to(row, u.shape)
    step = np.broadcast_to(np.arange(n_step)[None, None, :], u.shape)
    for idx, weight in ((lo, (1.0 - w) * length), (lo + 1, w * length)):
      ok = (idx >= 0) & (idx < n_interp) & (weight > 0)
      if steps_along_y:
        col = idx[ok] * ny + step[ok]
      else:
        col = step[ok] * ny + idx[ok]
      rows.append(row[ok])
      cols.append(col)
      vals.append(weight[ok])
  rows, cols, vals = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
  return sparse.csr_matrix((vals, (rows, cols)), shape=(theta.size * n_det, nx * ny))


def _back_projection_weights(nx: int, ny: int, angles: tuple[float, ...]):
  """Where each pixel centre falls on each view: (pixels, views) lower bin index and weight.

  The lower bin is a flat index into (views * n_det); the value read is
  `(1 - w) * q[lo] + w * q[lo + 1]` (linear interpolation between bins).
  """
  n_det = _n_detectors(nx, ny)
  theta = np.deg2rad(np.asarray(angles))
  x = np.arange(nx) - (nx - 1) / 2.0
  y = np.arange(ny) - (ny - 1) / 2.0
  # (pixels, angles): detector coordinate of each pixel centre, as a fractional bin index.
  u = ((x[:, None, None] * np.cos(theta) + y[None, :, None] * np.sin(theta))
       .reshape(nx * ny, theta.size) + (n_det - 1) / 2.0)
  lo = np.floor(u)
  w = u - lo
  return lo.astype(np.int64) + np.arange(theta.size) * n_det, w


def _interpolation_matrix(lo: np.ndarray, weights: Sequence[np.ndarray], n_cols: int):
  """Sparse (pixels, n_cols) matrix with weights[0] at column lo and weights[1] at lo + 1."""
  pix = np.broadcast_to(np.arange(lo.shape[0])[:, None], lo.shape)
  rows = np.concatenate([pix.ravel(), pix.ravel()])
  cols = np.concatenate([lo.ravel(), lo.ravel() + 1])
  vals = np.concatenate([weights[0].ravel(), weights[1].ravel()])
  return sparse.csr_matrix((vals, (rows, cols)), shape=(lo.shape[0], n_cols))


@functools.lru_cache(maxsize=2)
def _back_projector(nx: int, ny: int, angles: tuple[float, ...]) -> sparse.csr_matrix:
  """Pixel-driven back-projector: (nx * ny, n_angles * n_det), linear interpolation between bins."""
  lo, w = _back_projection_weights(nx, ny, angles)
  return _interpolation_matrix(lo, (1.0 - w, w), len(angles) * _n_detectors(nx, ny))


@functools.lru_cache(maxsize=2)
def _back_projector_variance(nx: int, ny: int, angles: tuple[float, ...]):
  """Matrices propagating bin variances and neighbour covariances through `_back_projector`.

  Returns (squares, cross): `squares` has the squared interpolation weights (1 - w)^2 and w^2;
  `cross` has 2 w (1 - w) at the lower bin, to multiply cov(q[lo], q[lo + 1]).
  """
  lo, w = _back_projection_weights(nx, ny, angles)
  n_cols = len(angles) * _n_detectors(nx, ny)
  squares = _interpolation_matrix(lo, ((1.0 - w) ** 2, w ** 2), n_cols)
  cross = _interpolation_matrix(lo, (2.0 * w * (1.0 - w), np.zeros_like(w)), n_cols)
  return squares, cross


def radon_parallel(image: np.ndarray, angles_deg: Sequence[float]) -> np.ndarray:
  """Parallel-beam line integrals of a 2D slice (or of a stack of slices along the last axis).

  Geometry: the rotation centre is the centre of the slice; the ray at angle theta and detector
  coordinate s is {x cos(theta) + y sin(theta) = s}, with x along axis 0 and y along axis 1, both
  in voxels. The detector has `n_det` bins one voxel wide (an odd number covering the diagonal),
  centred on the rotation centre. Integrals are in voxel units: a uniform value 1 over a path of
  10 voxels gives 10 (multiply by the voxel size for physical units). Joseph's interpolating
  projector, applied to every slice at once as one sparse matrix.

  Cost: the matrix (cached for the last two slice shapes and angle sets) has about
  2 * n_angles * n_det * max(nx, ny) entries of 12 bytes: ~100 MB for a 122x101 slice and 360
  views, but several GB for 512x512; use fewer views or a coarser grid for large slices.

  Args:
    image: (nx, ny) slice or (nx, ny, nz) stack of slices.
    angles_deg: projection angles in degrees.

  Returns:
    float64 sinogram (n_angles, n_det) or (n_angles, n_det, nz).
  """
  image = np.asarray(image, dtype=np.float64)
  if image.ndim not in (2, 3):
    raise ValueError(f"image must be a 2D slice or a 3D stack of slices, got shape {image.shape}")
  angles = _angles(angles_deg)
  nx, ny = image.shape[:2]
  a = _projector(nx, ny, tuple(angles.tolist()))
  sino = a @ image.reshape(nx * ny, -1)
  return sino.reshape((angles.size, -1) + image.shape[2:])


FILTERS = ("ramp", "shepp-logan", "hann")


def _ramp_filter(n_det: int, filter_name: str) -> np.ndarray:
  """Frequency response (rfft layout, zero-padded length) of the band-limited ramp filter.

  The spatial kernel h(0) = 1/4, h(n odd) = -1 / (pi n)^2, h(n even) = 0 (Kak and Slaney eq.
  3.61, unit sampling) avoids the DC error of sampling |f| directly. Optional apodisation:
  'shepp-logan' (sinc) or 'hann' windows trade resolution for less high-frequency noise.
  """
  size = int(2 ** np.ceil(np.log2(2 * n_det)))
  n = np.concatenate([np.arange(0, size // 2 + 1), np.arange(-size // 2 + 1, 0)])
  h = np.zeros(size)
  h[0] = 0.25
  odd = n % 2 == 1
  h[odd] = -1.0 / (np.pi * n[odd]) ** 2
  response = np.fft.rfft(h).real
  f = np.fft.rfftfreq(size)
  if filter_name == "shepp-logan":
    response = response * np.sinc(f)
  elif filter_name == "hann":
    response = response * 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
  elif filter_name != "ramp":
    raise ValueError(f"unknown filter {filter_name!r}; expected one of {FILTERS}")
  return response


def _check_sinogram(sinogram: np.ndarray, angles: np.ndarray, shape: Sequence[int]):
  """(nx, ny) of `shape`, after checking that `sinogram` has its views and detector bins."""
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be (nx, ny), got {shape}")
  nx, ny = int(shape[0]), int(shape[1])
  n_det = _n_detectors(nx, ny)
  if sinogram.ndim not in (2, 3) or sinogram.shape[:2] != (angles.size, n_det):
    raise ValueError(f"sinogram shape {sinogram.shape} does not match {angles.size} angles and "
                     f"{n_det} detector bins of a {nx}x{ny} slice")
  return nx, ny


def fbp_parallel(sinogram: np.ndarray, angles_deg: Sequence[float], shape: Sequence[int],
                 filter_name: str = "ramp") -> np.ndarray:
  """Filtered back-projection: the inverse of `radon_parallel` for views spread over 180 degrees.

  `f(x, y) = pi / n_angles * sum over views of q(x cos(theta) + y sin(theta))`, where q is the
  sinogram convolved with the ramp kernel (Kak and Slaney ch. 3) and read between bins by linear
  interpolation. The angles should be evenly spaced over [0, 180) degrees.

  Args:
    sinogram: (n_angles, n_det) or (n_angles, n_det, nz), as returned by `radon_parallel` for an
      image of `shape`.
    angles_deg: the projection angles in degrees.
    shape: (nx, ny) of the reconstructed slice.
    filter_name: 'ramp' (Ram-Lak), 'shepp-logan' or 'hann'.

  Returns:
    float64 image (nx, ny) or (nx, ny, nz), in the units of the projected image.
  """
  sinogram = np.asarray(sinogram, dtype=np.float64)
  angles = _angles(angles_deg)
  nx, ny = _check_sinogram(sinogram, angles, shape)
  n_det = _n_detectors(nx, ny)
  response = _ramp_filter(n_det, filter_name)
  size = 2 * (response.size - 1)
  spectrum = np.fft.rfft(sinogram, n=size, axis=1)
  spectrum *= response.reshape((1, -1) + (1,) * (sinogram.ndim - 2))
  filtered = np.fft.irfft(spectrum, n=size, axis=1)[:, :n_det]
  b = _back_projector(nx, ny, tuple(angles.tolist()))
  image = b @ filtered.reshape(angles.size * n_det, -1) * (np.pi / angles.size)
  return image.reshape((nx, ny) + sinogram.shape[2:])



def fbp_noise_variance(variance: np.ndarray, angles_deg: Sequence[float], shape: Sequence[int],
                       filter_name: str = "ramp") -> np.ndarray:
  """Per-pixel variance of `fbp_parallel` applied to independent, zero-mean sinogram noise.

  FBP is linear, so with independent noise of variance v[j] in bin j of each view it propagates
  exactly. Filtering convolves each view with the kernel g that `fbp_parallel` applies (the
  inverse FFT of its zero-padded frequency response), so the filtered value q[k] has
  `var q[k] = sum_j g[k - j]^2 v[j]` and neighbouring bins are correlated,
  `cov(q[k], q[k + 1]) = sum_j g[k - j] g[k + 1 - j] v[j]`. The back-projection reads
  `(1 - w) q[lo] + w q[lo + 1]` in each view (views are independent), scaled by pi / n_angles:

    var f(x) = (pi / n_angles)^2 * sum over views of
               [(1 - w)^2 var q[lo] + w^2 var q[lo + 1] + 2 w (1 - w) cov(q[lo], q[lo + 1])].

  For the ramp kernel, sum_n g[n]^2 = 1/12 (Parseval: the integral of f^2 over |f| < 1/2), so a
  pixel that falls on bin centres in every view (the centre of an odd-sized slice) with constant
  bin variance v has variance pi^2 v / (12 n_angles).

  Args:
    variance: (n_angles, n_det) or (n_angles, n_det, nz) bin variances, in squared sinogram
      units (as passed to `fbp_parallel`).
    angles_deg: the projection angles in degrees.
    shape: (nx, ny) of the reconstructed slice.
    filter_name: the `fbp_parallel` filter.

  Returns:
    float64 variance image (nx, ny) or (nx, ny, nz), in squared image units.
  """
  variance = np.asarray(variance, dtype=np.float64)
  angles = _angles(angles_deg)
  nx, ny = _check_sinogram(variance, angles, shape)
  if (variance < 0).any():
    raise ValueError("variance must be non-negative")
  n_det = _n_detectors(nx, ny)
  response = _ramp_filter(n_det, filter_name)
  size = 2 * (response.size - 1)
  g = np.fft.irfft(response, n=size)  # circular kernel; zero padding keeps it from wrapping
  extra = (1,) * (variance.ndim - 2)
  spectrum = np.fft.rfft(variance, n=size, axis=1)

  def convolve(kernel):
    k = np.fft.rfft(kernel).reshape((1, -1) + extra)
    return np.fft.irfft(spectrum * k, n=size, axis=1)[:, :n_det]

  var_q = convolve(g * g)
  cov_q = convolve(g * np.roll(g, -1))  # kernel[m] = g[m] g[m + 1]
  squares, cross = _back_projector_variance(nx, ny, tuple(angles.tolist()))
  flat = (angles.size * n_det, -1)
  image = squares @ var_q.reshape(flat) + cross @ cov_q.reshape(flat)
  image = image * (np.pi / angles.size) ** 2
  return np.clip(image, 0.0, None).reshape((nx, ny) + variance.shape[2:])


# ---- PET: attenuation along lines of response, NAC images, tomographic low-count noise.


def _check_spacing(spacing_mm: Sequence[float], axis: int) -> float:
  """The in-plane voxel size (mm) of slices perpendicular to `axis`; they must be square."""
  if axis not in (0, 1, 2):
    raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
  spacing = [float(s) for s in spacing_mm]
  if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
    raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")
  in_plane = [spacing[i] for i in range(3) if i != axis]
  if abs(in_plane[0] - in_plane[1]) > 1e-3 * max(in_plane):
    raise ValueError(f"in-plane voxels must be square for the parallel-beam projector, got "
                     f"{in_plane[0]} x {in_plane[1]} mm")
  return in_plane[0]


def _check_mu(mu_map, shape) -> np.ndarray:
  mu = np.asarray(mu_map, dtype=np.float64)
  if mu.shape != tuple(shape):
    raise ValueError(f"mu_map shape {mu.shape} differs from the PET shape {tuple(shape)}")
  if not np.isfinite(mu).all() or (mu < 0).any():
    raise ValueError("mu_map must be finite and non-negative (1/cm)")
  return mu


def _check_activity(activity) -> np.ndarray:
  activity = np.asarray(activity, dtype=np.float64)
  if activity.ndim != 3:
    raise ValueError(f"activity must be a 3D volume, got shape {activity.shape}")
  if not np.isfinite(activity).all():
    raise ValueError("activity has NaN or Inf voxels")
  if (activity < 0).any():
    raise ValueError(f"activity must be non-negative (min {float(activity.min())})")
  if not activity.sum() > 0:
    raise ValueError("activity is zero everywhere: nothing to count")
  return activity


def pet_angles(shape: Sequence[int], axis: int = 2) -> np.ndarray:
  """Default PET views (degrees over [0, 180)) for slices of a volume of `shape`.

  Angular sampling matched to the one-voxel detector sampling: pi / 2 * n_det views (rounded
  up), so that the outermost bins are as far apart along the arc as neighbouring bins.
  """
  in_plane = [int(shape[i]) for i in range(3) if i != axis]
  n = int(math.ceil(np.pi / 2.0 * _n_detectors(*in_plane)))
  return np.arange(n) * (180.0 / n)


def lor_survival(mu_map: np.ndarray, spacing_mm: Sequence[float], angles_deg: Sequence[float],
                 axis: int = 2) -> np.ndarray:
  """Probability that both 511 keV photons of a LOR escape: exp(-integral of mu along the LOR).

  One value per projection bin, the same for every emission point on that line (the two
  half-line integrals add up to the whole line). Line integrals by `radon_parallel` on every
  slice perpendicular to `axis`, in voxel units times the in-plane voxel size.

  Args:
    mu_map: 3D linear attenuation coefficients in 1/cm (>= 0; water 0.096 at 511 keV).
    spacing_mm: voxel sizes (mm) of the three axes; the two in-plane ones must be equal.
    angles_deg: projection angles in degrees.
    axis: the scanner axis (2: RAS z).

  Returns:
    float64 (n_angles, n_det, n_slices) array in (0, 1], slices along the last axis.
  """
  pixel_mm = _check_spacing(spacing_mm, axis)
  mu = np.asarray(mu_map, dtype=np.float64)
  if mu.ndim != 3:
    raise ValueError(f"mu_map must be 3D, got shape {mu.shape}")
  mu = _check_mu(mu, mu.shape)
  # 1/cm -> 1/mm, times the path in voxels times mm per voxel: dimensionless.
  line_integrals = radon_parallel(np.moveaxis(mu, axis, -1) / 10.0, angles_deg) * pixel_mm
  return np.exp(-line_integrals)


def simulate_nac_pet(pet: np.ndarray, mu_map: np.ndarray, spacing_mm: Sequence[float],
                     axis: int = 2, n_angles: int | None = None,
                     filter_name: str = "ramp") -> np.ndarray:
  """Noiseless non-attenuation-corrected (NAC) PET image from an AC PET and a mu map.

  Physics (module docstring): each projection bin of the activity is multiplied by the survival
  `exp(-integral of mu along its LOR)` (`lor_survival`), and the attenuated sinogram is
  reconstructed by FBP without attenuation correction. The centre of the body, seen only through
  long, strongly attenuated lines, comes out darkest; near the edge, short lines pull the image
  up, though not to the true activity. In a 16 cm water cylinder of uniform activity a (mu =
  0.096 / cm) the NAC image is 0.11 a at the centre, 0.16 a at half the radius, 0.29 a at 0.8 of
  it and 0.53 a 4 mm inside the edge, where it climbs steeply to a. Its exact radial profile is
  the inverse Abel transform of the projection `p(s) = a L e^(-mu L)`, `L = 2 sqrt(R^2 - s^2)`:
  `f(r) = (2 a / pi) * integral over [0, pi/2] of e^(-mu l) (1 - mu l) dphi` with
  `l = 2 sqrt(R^2 - r^2) cos(phi)`. Scaling each voxel by a survival instead (as if attenuation
  acted on voxels) gives a flatter, wrong image (about 0.21 a at the centre and 0.37 a at the
  rim of that cylinder). The NAC image has the units of `pet` but is not quantitative (it is
  not an attenuated copy of the activity: attenuation acts on lines, not on voxels).

  Units: `mu_map` in 1/cm at 511 keV (see `mu_from_transmission`), spacing in mm.

  Args:
    pet: attenuation-corrected activity (3D, non-negative), same shape as `mu_map`.
    mu_map: linear attenuation coefficients (1/cm).
    spacing_mm: voxel sizes in mm; the two in-plane ones must be equal.
    axis: the scanner axis (LORs lie in the slices perpendicular to it; 2: RAS z).
    n_angles: views over 180 degrees; None: `pet_angles` (pi / 2 x detector bins).
    filter_name: FBP kernel, 'ramp' (default: the exact inverse of the projection),
      'shepp-logan' or 'hann'.

  Returns:
    float32 NAC image, same shape as `pet`. Attenuated projections are not the projections of
    any image, so, as in real NAC FBP images, it has negative values in places (down to about
    -14% of its maximum around the SPM head template, whose background is not zero).
  """
  pet = _check_activity(pet)
  mu = _check_mu(mu_map, pet.shape)
  return _reconstruct_pet(pet, mu, spacing_mm, axis, n_angles, filter_name, None)


def simulate_low_count_pet(activity: np.ndarray, total_counts: float, dose_fraction: float,
                           spacing_mm: Sequence[float], rng: np.random.Generator | int,
                           mu_map: np.ndarray | None = None,
                           attenuation_correction: bool = False, n_angles: int | None = None,
                           filter_name: str = "hann", axis: int = 2) -> np.ndarray:
  """Simulates a reconstructed PET image of `activity` from Poisson counts on its sinogram.

  Per slice perpendicular to `axis` (module docstring): the activity's line integrals `y`
  (`radon_parallel`) are scaled so that the whole sinogram of a full-dose scan expects
  `total_counts` coincidences, and multiplied by the LOR survival when `mu_map` is given
  (`lor_survival`); the measured counts are `n ~ Poisson(dose_fraction * c * y * survival)`, with
  `c = total_counts / sum(y)`. They are rescaled by `1 / (dose_fraction * c)` (divided by the
  survival too with `attenuation_correction`) and reconstructed by FBP, so the image is in the
  units of `activity`, with expectation the FBP of the noiseless (attenuated, without correction)
  sinogram: the activity as seen through the reconstruction kernel, or the NAC image of
  `simulate_nac_pet` for `mu_map` without correction. Noise variance scales as
  1 / (total_counts * dose_fraction), independently of the number of views, and is spatially
  correlated within a slice (not across slices: oblique LORs are ignored). Attenuation removes
  counts, and correcting for it amplifies the noise of deep, strongly attenuated lines, as in a
  real scan.

  `total_counts` counts coincidences as if nothing attenuated them (all emitted pairs of the
  field of view): with `mu_map` the scan detects only `total_counts * mean survival` of them, so
  one `total_counts` describes one injected dose whether or not attenuation is simulated.

  Kernel: FBP with a Hann-apodised ramp ('hann', default) gives a smoothed image with moderate,
  blotchy noise, closer to a clinical PET reconstruction (iterative, then post-filtered) than the
  plain ramp, whose noise is much stronger and finer. Expected counts of a clinical brain FDG
  scan are of order 1e8.

  Args:
    activity: 3D non-negative activity with a positive sum.
    total_counts: expected coincidences of the full-dose scan (before attenuation), > 0.
    dose_fraction: in (0, 1] (or the fraction of the scan time).
    spacing_mm: voxel sizes in mm; the two in-plane ones must be equal.
    rng: a numpy Generator (or an int seed).
    mu_map: optional attenuation map in 1/cm at 511 keV, same shape as `activity`.
    attenuation_correction: divide each bin by its survival before FBP (needs `mu_map`).
    n_angles: views over 180 degrees; None: `pet_angles` (pi / 2 x detector bins).
    filter_name: FBP kernel, 'hann' (default), 'shepp-logan' or 'ramp'.
    axis: the scanner axis (2: RAS z).

  Returns:
    float32 image, same shape as `activity`; FBP noise makes some voxels negative where the
    activity is low, as in real FBP images.
  """
  activity = _check_activity(activity)
  if not 0.0 < float(dose_fraction) <= 1.0:
    raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
  if not (np.isfinite(total_counts) and float(total_counts) > 0.0):
    raise ValueError(f"total_counts must be positive, got {total_counts}")
  if attenuation_correction and mu_map is None:
    raise ValueError("attenuation_correction needs a mu_map")
  mu = None if mu_map is None else _check_mu(mu_map, activity.shape)
  return _reconstruct_pet(activity, mu, spacing_mm, axis, n_angles, filter_name,
                          counts=float(total_counts) * float(dose_fraction), rng=_rng(rng),
                          correct=bool(attenuation_correction))


def _reconstruct_pet(activity, mu, spacing_mm, axis, n_angles, filter_name, counts=None,
                     rng=None, correct=False):
  """FBP of the sinogram of `activity`, attenuated where `mu` is given.

  With `counts` (expected coincidences before attenuation), the sinogram is Poisson-sampled with
  `rng` and scaled back to activity units, and divided by the survival when `correct`.
  """
  _check_spacing(spacing_mm, axis)
  if filter_name not in FILTERS:
    raise ValueError(f"unknown filter {filter_name!r}; expected one of {FILTERS}")
  if n_angles is None:
    angles = pet_angles(activity.shape, axis)
  elif int(n_angles) != n_angles or n_angles < 1:
    raise ValueError(f"n_angles must be a positive integer, got {n_angles}")
  else:
    angles = np.arange(int(n_angles)) * (180.0 / int(n_angles))
  slices = np.moveaxis(activity, axis, -1)
  y = radon_parallel(slices, angles)
  survival = None if mu is None else lor_survival(mu, spacing_mm, angles, axis)
  if counts is None:
    sino = y if survival is None else y * survival
  else:
    per_unit = counts / float(y.sum())  # expected coincidences per unit of line integral
    expected = per_unit * (y if survival is None else y * survival)
    sino = rng.poisson(expected) / per_unit
    if correct:
      sino = sino / survival
  image = fbp_parallel(sino, angles, slices.shape[:2], filter_name)
  return np.moveaxis(image, -1, axis).astype(np.float32)


# ---- Low-dose CT by projection-domain noise insertion.


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_70KEV_PER_CM) -> np.ndarray:
  """Linear attenuation (same units as `mu_water`) from HU: mu_water * (1 + HU / 1000), >= 0."""
  return np.clip(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def _log_variance(p: np.ndarray, photons: float, electronic_noise: float) -> np.ndarray:
  """Variance of a measured line integral log(I0 / N) with `photons` incident (delta method)."""
  detected = np.maximum(photons * np.exp(-p), 1.0)  # at least one photon: starved rays
  return 1.0 / detected + (float(electronic_noise) / detected) ** 2


def ct_i0_for_noise(p: np.ndarray, body: np.ndarray, angles_deg: Sequence[float],
                    noise_mu: float, filter_name: str, electronic_noise: float = 0.0) -> float:
  """Incident photons per ray whose full-dose FBP noise has mean variance `noise_mu^2` on `body`.

  With `I0` photons the line-integral variance is `e^p / I0 + sigma_e^2 e^(2p) / I0^2`
  (`_log_variance`, away from photon starvation), so by `fbp_noise_variance` the image variance
  is `a(x) / I0 + b(x) / I0^2`; the mean over `body` is solved for `I0` (a quadratic in 1 / I0).

  Args:
    p: (n_angles, n_det, nz) dimensionless line integrals of the slices.
    body: (nx, ny, nz) boolean mask of the voxels whose noise is matched.
    angles_deg: the projection angles in degrees.
    noise_mu: target noise standard deviation in the units of `p / pixel` (1 / voxel).
    filter_name: the FBP kernel of the noise.
    electronic_noise: electronic noise standard deviation (counts).

  Returns:
    I0 (photons per ray per view).
  """
  shape = body.shape[:2]
  a = fbp_noise_variance(np.exp(p), angles_deg, shape, filter_name)[body].mean()
  b = 0.0
  if electronic_noise > 0:
    b = fbp_noise_variance(float(electronic_noise) ** 2 * np.exp(2.0 * p), angles_deg, shape,
                           filter_name)[body].mean()
  target = float(noise_mu) ** 2
  inv_i0 = target / a if b == 0.0 else (-a + np.sqrt(a * a + 4.0 * b * target)) / (2.0 * b)
  return 1.0 / inv_i0


def simulate_low_dose_ct(hu: np.ndarray, spacing_mm: Sequence[float], dose_fraction: float,
                         rng: np.random.Generator | int, i0: float | None = None,
                         n_angles: int = DEFAULT_CT_ANGLES, electronic_noise: float = 0.0,
                         filter_name: str = "hann", axis: int = 2,
                         mu_water: float = MU_WATER_70KEV_PER_CM,
                         slices_per_batch: int = 16,
                         full_dose_noise_hu: float = CT_FULL_DOSE_NOISE_HU) -> np.ndarray:
  """Simulates a CT scan at `dose_fraction` of the dose of `hu` by noise insertion in projections.

  The physics and its simplifications are in the module docstring. Per axial slice: HU -> mu
  (1/mm) -> line integrals p (mm from the in-plane voxel size) -> Gaussian noise of the variance
  a scan at `dose_fraction` has on top of the full-dose one,
  `var(I0 * dose) - var(I0)` of `log(I0 / N)` -> filtered back-projection of the noise alone ->
  added to the input in HU. The expected image is the input; `dose_fraction = 1` returns it
  unchanged. Unless `i0` is given, `I0` is solved (`ct_i0_for_noise`) so that the full-dose scan
  would have noise of `full_dose_noise_hu` averaged over the body (> -500 HU) with this kernel and
  these views; the added noise variance then averages `full_dose_noise_hu^2 (1 / dose_fraction
  - 1)` over the body (more with electronic noise, whose share grows as 1 / dose_fraction^2), and
  `fbp_noise_variance` predicts it voxel by voxel. One `I0` per volume (no tube-current modulation): thicker slices get more noise.

  Args:
    hu: 3D image in Hounsfield units (finite), a full-dose scan.
    spacing_mm: voxel sizes (mm) of the three axes; the two in-plane ones must be equal.
    dose_fraction: in (0, 1]; 1 adds nothing.
    rng: a numpy Generator (or an int seed).
    i0: full-dose incident photons per ray (one voxel-wide bin) per view, > 0; None (default):
      solved from `full_dose_noise_hu`. A fixed `i0` makes the noise depend on the kernel (the
      ramp passes about 2.6x the noise std of Hann), the views and the body size.
    n_angles: views, evenly spread over [0, 180) degrees.
    electronic_noise: standard deviation (counts) of additive Gaussian detector noise, >= 0.
    filter_name: reconstruction kernel of the noise: 'hann' (default; smooth, like a soft-tissue
      kernel), 'shepp-logan' or 'ramp' (sharp, fine streaky grain).
    axis: the scanner axis; slices perpendicular to it are reconstructed (2: RAS z).
    mu_water: attenuation of water in 1/cm at the effective energy.
    slices_per_batch: slices filtered and back-projected together (bounds memory, not the result).
    full_dose_noise_hu: noise standard deviation (HU) of the input scan itself, in a uniform
      region; default `CT_FULL_DOSE_NOISE_HU`, measured on the shared abdominal CT.

  Returns:
    float32 low-dose image in HU, same shape as `hu`.
  """
  hu = np.asarray(hu)
  if hu.ndim != 3:
    raise ValueError(f"hu must be a 3D volume, got shape {hu.shape}")
  if not np.isfinite(hu).all():
    raise ValueError("hu has NaN or Inf voxels")
  if not 0.0 < float(dose_fraction) <= 1.0:
    raise ValueError(f"dose_fraction must be in (0, 1], got {dose_fraction}")
  if i0 is not None and not (np.isfinite(i0) and float(i0) > 0.0):
    raise ValueError(f"i0 must be a positive number of photons, got {i0}")
  if not (np.isfinite(full_dose_noise_hu) and float(full_dose_noise_hu) > 0.0):
    raise ValueError(f"full_dose_noise_hu must be positive, got {full_dose_noise_hu}")
  if int(n_angles) != n_angles or n_angles < 1:
    raise ValueError(f"n_angles must be a positive integer, got {n_angles}")
  if not (np.isfinite(electronic_noise) and float(electronic_noise) >= 0.0):
    raise ValueError(f"electronic_noise must be >= 0 counts, got {electronic_noise}")
  if not float(mu_water) > 0.0:
    raise ValueError(f"mu_water must be positive, got {mu_water}")
  pixel_mm = _check_spacing(spacing_mm, axis)
  if filter_name not in FILTERS:
    raise ValueError(f"unknown filter {filter_name!r}; expected one of {FILTERS}")
  rng = _rng(rng)
  if float(dose_fraction) == 1.0:
    return hu.astype(np.float32)
  mu_water_mm = float(mu_water) / 10.0
  hu_per_unit = 1000.0 / (mu_water_mm * pixel_mm)  # noise of line integrals / voxel -> HU
  angles = np.arange(int(n_angles)) * (180.0 / int(n_angles))
  slices = np.moveaxis(hu, axis, -1)
  # Dimensionless line integrals: (mu in 1/mm) x (voxel-unit path) x (mm per voxel).
  p = radon_parallel(hu_to_mu(slices, mu_water_mm), angles) * pixel_mm
  if i0 is None:
    body = slices > CT_BODY_HU
    if not body.any():
      body = np.ones(slices.shape, bool)
    i0 = ct_i0_for_noise(p, body, angles, float(full_dose_noise_hu) / hu_per_unit, filter_name,
                         electronic_noise)
  extra = (_log_variance(p, float(i0) * float(dose_fraction), electronic_noise)
           - _log_variance(p, float(i0), electronic_noise))
  noise_p = rng.standard_normal(p.shape) * np.sqrt(np.clip(extra, 0.0, None))
  out = slices.astype(np.float64)
  batch = max(1, int(slices_per_batch))
  for start in range(0, slices.shape[-1], batch):
    # The slice's noise in line integrals / voxel, reconstructed, then in HU.
    noise = fbp_parallel(noise_p[..., start:start + batch], angles, slices.shape[:2], filter_name)
    out[..., start:start + batch] += noise * hu_per_unit
  return np.moveaxis(out, -1, axis).astype(np.float32)


# ---- Thick slices / low resolution.


def simulate_low_resolution(volume: np.ndarray, factor: int,
                            axes: Sequence[int] = (2,)) -> np.ndarray:
  """Simulates an acquisition with `factor`-times coarser sampling along `axes`, on the same grid.

  Along each axis in `axes`: the mean of `factor` consecutive voxels (a box slice profile, as a
  thick slice integrates the signal across its thickness), one sample per block (decimation;
  the volume is first extended by repeating its last voxels to a multiple of `factor`), then linear
  interpolation back to every original voxel centre (block centres sit at voxel
  `b * factor + (factor - 1) / 2`; beyond the first and last centre the edge value is kept). The
  result is on the original grid and shares its affine, so it pairs voxel by voxel with the input.

  Args:
    volume: finite array (3D for volumes; any number of dimensions works).
    factor: integer >= 1; 1 returns a float32 copy.
    axes: axes to degrade (2: the RAS z, through-plane axis of axial slices).

  Returns:
    float32 array of the same shape as `volume`.
  """
  volume = np.asarray(volume)
  if isinstance(factor, (bool, np.bool_)) or int(factor) != factor or factor < 1:
    raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
  factor = int(factor)
  if volume.ndim == 0 or volume.size == 0:
    raise ValueError(f"volume must be a non-empty array, got shape {volume.shape}")
  if not np.isfinite(volume).all():
    raise ValueError("volume has NaN or Inf voxels")
  axes = [int(a) for a in axes]
  if not axes or any(not -volume.ndim <= a < volume.ndim for a in axes):
    raise ValueError(f"axes {axes} must be valid axes of a {volume.ndim}D volume")
  axes = [a % volume.ndim for a in axes]
  if len(set(axes)) != len(axes):
    raise ValueError(f"axes {axes} repeat an axis")
  out = volume.astype(np.float64)
  if factor == 1:
    return out.astype(np.float32)
  for axis in axes:
    n = out.shape[axis]
    n_blocks = -(-n // factor)
    pad = [(0, 0)] * out.ndim
    pad[axis] = (0, n_blocks * factor - n)
    padded = np.pad(out, pad, mode="edge")
    blocks = padded.reshape(padded.shape[:axis] + (n_blocks, factor) + padded.shape[axis + 1:])
    blocks = blocks.mean(axis=axis + 1)
    # Output voxel o samples block coordinate (o - (factor - 1) / 2) / factor.
    matrix = np.ones(out.ndim)
    matrix[axis] = 1.0 / factor
    offset = np.zeros(out.ndim)
    offset[axis] = -(factor - 1) / (2.0 * factor)
    out = ndimage.affine_transform(blocks, matrix, offset=offset, output_shape=out.shape,
                                   order=1, mode="nearest")
  return out.astype(np.float32)
