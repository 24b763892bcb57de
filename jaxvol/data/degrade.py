"""Degradations that turn one clean volume into a (degraded input, clean target) training pair.

Only what needs physics lives here: low-count PET by Poisson thinning, non-attenuation-corrected
(NAC) PET from a PET image plus an attenuation map, low-dose CT by projection-domain noise
insertion, and thick-slice (low through-plane resolution) acquisitions. All functions are plain
numpy/scipy, vectorised, and take a seeded `np.random.Generator` where they draw random numbers.

Low-dose CT (`simulate_low_dose_ct`): a SIMULATION of the quantum noise of a scan at a fraction of
the dose, not a model of any scanner. Assumptions:
  * Monochromatic beam at an effective energy of about 70 keV (a 120 kVp spectrum), where water
    attenuates mu_water = 0.193 / cm (`MU_WATER_70KEV_PER_CM`; NIST XCOM gives 0.206 cm^2/g at
    60 keV and 0.184 at 80 keV). HU are linear in mu by definition,
    `mu = mu_water * (1 + HU / 1000)`, clipped at 0 (air). No beam hardening, scatter or
    detector blur.
  * 2D parallel-beam geometry per axial slice (slices perpendicular to the scanner axis, the last
    array axis by default: RAS z), detector bins one voxel wide, `n_angles` views evenly spread
    over 180 degrees. Line integrals `p = integral of mu dl` are dimensionless (mu in 1/mm times
    path length in mm from the in-plane voxel size).
  * Beer-Lambert and Poisson statistics: a ray with `I0 = i0 * dose_fraction` incident photons
    records `N ~ Poisson(I0 * exp(-p))`, plus optional zero-mean Gaussian electronic noise of
    standard deviation `electronic_noise` (counts); `N` is floored at 1 count before the log
    (photon starvation). The measured line integral is `log(I0 / N)`.
  * Noise insertion: only the noise sinogram `log(I0 / N) - p` is reconstructed, by filtered
    back-projection (Kak and Slaney, "Principles of Computerized Tomographic Imaging", ch. 3), and
    added to the ORIGINAL image, so the clean image gets no discretisation or reconstruction
    artefacts of our coarse projector. Unlike the lower-dose simulators of Yu et al. (JCAT 2012)
    and Zeng et al. (IEEE TNS 2015), which add only the variance missing from a real full-dose
    scan, the input is treated as noise-free: its own noise is kept and the inserted noise is that
    of a whole scan at `I0`, so the total noise is slightly above that level.
    Reconstructed noise variance scales as 1 / (i0 * dose_fraction * n_angles): `i0` is photons
    per ray per view for THIS discretisation (one-voxel bins), not a scanner's per-element fluence.
    The noise is reconstructed with a Hann-apodised ramp by default (smooth, like a soft-tissue
    kernel); the clean image keeps its own resolution.

Thick slices (`simulate_low_resolution`): a box slice profile of `factor` voxels (the mean of
`factor` neighbouring voxels along an axis), sampled once per `factor` voxels, then linearly
interpolated back onto the original grid, so that input and target share one grid and affine.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy import sparse

MU_WATER_511KEV_PER_CM = 0.096  # Linear attenuation coefficient of water at 511 keV.
MU_WATER_70KEV_PER_CM = 0.193  # Water at a typical effective CT energy (120 kVp beam, ~70 keV).
DEFAULT_CT_I0 = 1e5  # Full-dose incident photons per ray per view (see simulate_low_dose_ct).
DEFAULT_CT_ANGLES = 360  # Views over 180 degrees.


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
  `dose_fraction = 1` gives a realistic full-count image from a noiseless one.

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


def _line_integrals(mu: np.ndarray, step_a: float, step_b: float,
                    directions: int) -> list[np.ndarray]:
  """Line integrals of `mu` over whole in-plane lines through each voxel.

  `mu` is (A, B, Z): planes are the first two axes. Returns one (A, B, Z) array per direction
  (along A, along B, then the two diagonals when `directions == 4`).
  """
  a, b, z = mu.shape
  out = [np.broadcast_to(mu.sum(axis=0, keepdims=True) * step_a, mu.shape),
         np.broadcast_to(mu.sum(axis=1, keepdims=True) * step_b, mu.shape)]
  if directions == 4:
    ia, ib = np.meshgrid(np.arange(a), np.arange(b), indexing="ij")
    step_diag = float(np.hypot(step_a, step_b))
    flat_mu = mu.reshape(-1)
    zs = np.arange(z)
    for line_id in (ia - ib + (b - 1), ia + ib):
      # One bincount sums every diagonal of every plane at once: key = (line id, plane).
      keys = (line_id[:, :, None] * z + zs).reshape(-1)
      sums = np.bincount(keys, weights=flat_mu, minlength=(a + b - 1) * z)
      out.append(sums.reshape(a + b - 1, z)[line_id] * step_diag)
  return out


def attenuation_factor(mu_map: np.ndarray, spacing_mm: Sequence[float], axis: int = 2,
                       directions: int = 4) -> np.ndarray:
  """Fraction of coincidences from each voxel that survive attenuation (see `simulate_nac_pet`).

  Args:
    mu_map: linear attenuation coefficients in 1/cm (>= 0), same grid as the PET.
    spacing_mm: voxel sizes (mm) of the three axes.
    axis: the scanner (axial) axis; lines of response lie in the planes perpendicular to it
      (2 is Superior for RAS arrays).
    directions: 2 (the two in-plane grid axes) or 4 (also the two in-plane diagonals).

  Returns:
    float32 array in (0, 1], 1 where every line through the voxel misses attenuating material.
  """
  mu = np.asarray(mu_map, dtype=np.float64)
  if mu.ndim != 3:
    raise ValueError(f"mu_map must be 3D, got shape {mu.shape}")
  if not np.isfinite(mu).all() or (mu < 0).any():
    raise ValueError("mu_map must be finite and non-negative (1/cm)")
  if directions not in (2, 4):
    raise ValueError(f"directions must be 2 or 4, got {directions}")
  spacing = [float(s) for s in spacing_mm]
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")
  if axis not in (0, 1, 2):
    raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
  in_plane = [i for i in range(3) if i != axis]
  # 1/cm -> 1/mm so that mu * step (mm) is dimensionless.
  planes = np.moveaxis(mu / 10.0, axis, -1)
  integrals = _line_integrals(planes, spacing[in_plane[0]], spacing[in_plane[1]], directions)
  factor = np.mean([np.exp(-li) for li in integrals], axis=0)
  return np.moveaxis(factor, -1, axis).astype(np.float32)


def simulate_nac_pet(pet: np.ndarray, mu_map: np.ndarray, spacing_mm: Sequence[float],
                     axis: int = 2, directions: int = 4) -> np.ndarray:
  """Simulates a non-attenuation-corrected (NAC) PET image from an AC PET and a mu map.

  Physics: a positron annihilation emits two 511 keV photons in opposite directions along a line
  of response (LOR). The pair is detected only if both photons leave the body, with probability
  `exp(-integral of mu along the LOR)` (the two half-line integrals from the voxel to the body
  edge add up to the whole line, so the survival is the same for every voxel on that LOR). Deep
  voxels, whose LORs cross more tissue, lose more counts; that is the dark-centre look of NAC PET.

  Approximation (documented choice): rather than reconstructing attenuated projections, each
  voxel's activity is scaled by its mean survival over a few in-plane LOR directions (the two grid
  axes of the transaxial plane and, with `directions=4`, the two diagonals), with line integrals
  as voxel sums times the step length. Oblique (cross-plane) LORs and scatter are ignored.

  Units: `mu_map` is in 1/cm at 511 keV (water ~0.096/cm; see `mu_from_transmission`), spacing in
  mm; mu is divided by 10 to get 1/mm.

  Args:
    pet: attenuation-corrected activity, same shape as `mu_map`.
    mu_map: linear attenuation coefficients (1/cm).
    spacing_mm: voxel sizes in mm.
    axis: the scanner axis (LORs lie in planes perpendicular to it).
    directions: 2 or 4 in-plane LOR directions.

  Returns:
    float32 NAC image `pet * attenuation_factor(mu_map, ...)`.
  """
  pet = np.asarray(pet)
  if pet.shape != np.shape(mu_map):
    raise ValueError(f"pet shape {pet.shape} and mu_map shape {np.shape(mu_map)} differ")
  factor = attenuation_factor(mu_map, spacing_mm, axis=axis, directions=directions)
  return (pet * factor).astype(np.float32)


# ---- Parallel-beam CT: projector, filtered back-projection and low-dose noise insertion.


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


@functools.lru_cache(maxsize=2)
def _back_projector(nx: int, ny: int, angles: tuple[float, ...]) -> sparse.csr_matrix:
  """Pixel-driven back-projector: (nx * ny, n_angles * n_det), linear interpolation between bins."""
  n_det = _n_detectors(nx, ny)
  theta = np.deg2rad(np.asarray(angles))
  x = np.arange(nx) - (nx - 1) / 2.0
  y = np.arange(ny) - (ny - 1) / 2.0
  # (pixels, angles): detector coordinate of each pixel centre, as a fractional bin index.
  u = ((x[:, None, None] * np.cos(theta) + y[None, :, None] * np.sin(theta))
       .reshape(nx * ny, theta.size) + (n_det - 1) / 2.0)
  lo = np.floor(u)
  w = u - lo
  lo = lo.astype(np.int64) + np.arange(theta.size) * n_det
  pix = np.broadcast_to(np.arange(nx * ny)[:, None], u.shape)
  rows = np.concatenate([pix.ravel(), pix.ravel()])
  cols = np.concatenate([lo.ravel(), lo.ravel() + 1])
  vals = np.concatenate([(1.0 - w).ravel(), w.ravel()])
  return sparse.csr_matrix((vals, (rows, cols)), shape=(nx * ny, theta.size * n_det))


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
  if len(shape) != 2 or min(shape) < 1:
    raise ValueError(f"shape must be (nx, ny), got {shape}")
  nx, ny = int(shape[0]), int(shape[1])
  n_det = _n_detectors(nx, ny)
  if sinogram.ndim not in (2, 3) or sinogram.shape[:2] != (angles.size, n_det):
    raise ValueError(f"sinogram shape {sinogram.shape} does not match {angles.size} angles and "
                     f"{n_det} detector bins of a {nx}x{ny} slice")
  response = _ramp_filter(n_det, filter_name)
  size = 2 * (response.size - 1)
  spectrum = np.fft.rfft(sinogram, n=size, axis=1)
  spectrum *= response.reshape((1, -1) + (1,) * (sinogram.ndim - 2))
  filtered = np.fft.irfft(spectrum, n=size, axis=1)[:, :n_det]
  b = _back_projector(nx, ny, tuple(angles.tolist()))
  image = b @ filtered.reshape(angles.size * n_det, -1) * (np.pi / angles.size)
  return image.reshape((nx, ny) + sinogram.shape[2:])


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_70KEV_PER_CM) -> np.ndarray:
  """Linear attenuation (same units as `mu_water`) from HU: mu_water * (1 + HU / 1000), >= 0."""
  return np.clip(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def simulate_low_dose_ct(hu: np.ndarray, spacing_mm: Sequence[float], dose_fraction: float,
                         rng: np.random.Generator | int, i0: float = DEFAULT_CT_I0,
                         n_angles: int = DEFAULT_CT_ANGLES, electronic_noise: float = 0.0,
                         filter_name: str = "hann", axis: int = 2,
                         mu_water: float = MU_WATER_70KEV_PER_CM,
                         slices_per_batch: int = 16) -> np.ndarray:
  """Simulates a CT scan at `dose_fraction` of the dose by projection-domain noise insertion.

  The physics and its simplifications are in the module docstring. Per axial slice: HU -> mu (1/mm)
  -> line integrals p (mm from the in-plane voxel size) -> Poisson counts at
  `i0 * dose_fraction` incident photons per ray (+ Gaussian electronic noise) -> noise sinogram
  `log(I0 / N) - p` -> filtered back-projection -> added to the input in HU. The expected image is
  the input (up to the small log bias of starved rays); the noise standard deviation grows as
  1 / sqrt(dose_fraction).

  Args:
    hu: 3D image in Hounsfield units (finite).
    spacing_mm: voxel sizes (mm) of the three axes; the two in-plane ones must be equal.
    dose_fraction: in (0, 1]; 1 simulates the full-dose quantum noise.
    rng: a numpy Generator (or an int seed).
    i0: full-dose incident photons per ray (one voxel-wide bin) per view, > 0. The default 1e5 is
      a value often used for "full dose" in low-dose CT simulation studies; with 360 views and
      the 'hann' kernel it gives about 11 HU of noise inside the 3 mm abdomen of
      `shared/data/ct_abdomen` at full dose (about 35 HU at dose 0.1), close to a routine
      abdominal scan's. Noise variance scales as 1 / (i0 * dose_fraction * n_angles), so lowering
      `n_angles` (e.g. for speed) raises the noise unless `i0` is raised with it.
    n_angles: views, evenly spread over [0, 180) degrees.
    electronic_noise: standard deviation (counts) of additive Gaussian detector noise, >= 0.
    filter_name: reconstruction kernel of the noise: 'hann' (default; a smooth kernel like a
      clinical soft-tissue one), 'shepp-logan' or 'ramp' (sharp: ~2.6x the noise std of 'hann').
    axis: the scanner axis; slices perpendicular to it are reconstructed (2: RAS z).
    mu_water: attenuation of water in 1/cm at the effective energy.
    slices_per_batch: slices projected together (bounds memory, not the result).

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
  if not (np.isfinite(i0) and float(i0) > 0.0):
    raise ValueError(f"i0 must be a positive number of photons, got {i0}")
  if int(n_angles) != n_angles or n_angles < 1:
    raise ValueError(f"n_angles must be a positive integer, got {n_angles}")
  if not (np.isfinite(electronic_noise) and float(electronic_noise) >= 0.0):
    raise ValueError(f"electronic_noise must be >= 0 counts, got {electronic_noise}")
  if axis not in (0, 1, 2):
    raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
  if not float(mu_water) > 0.0:
    raise ValueError(f"mu_water must be positive, got {mu_water}")
  spacing = [float(s) for s in spacing_mm]
  if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
    raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm}")
  in_plane = [spacing[i] for i in range(3) if i != axis]
  if abs(in_plane[0] - in_plane[1]) > 1e-3 * max(in_plane):
    raise ValueError(f"in-plane voxels must be square for the parallel-beam projector, got "
                     f"{in_plane[0]} x {in_plane[1]} mm")
  if filter_name not in FILTERS:
    raise ValueError(f"unknown filter {filter_name!r}; expected one of {FILTERS}")
  rng = _rng(rng)
  pixel_mm = in_plane[0]
  mu_water_mm = float(mu_water) / 10.0
  incident = float(i0) * float(dose_fraction)
  angles = np.arange(int(n_angles)) * (180.0 / int(n_angles))
  slices = np.moveaxis(hu, axis, -1)
  noise_hu = np.empty(slices.shape, np.float64)
  for start in range(0, slices.shape[-1], max(1, int(slices_per_batch))):
    chunk = slices[..., start:start + max(1, int(slices_per_batch))]
    # Dimensionless line integrals: (mu in 1/mm) x (voxel-unit path) x (mm per voxel).
    p = radon_parallel(hu_to_mu(chunk, mu_water_mm), angles) * pixel_mm
    counts = rng.poisson(incident * np.exp(-p)).astype(np.float64)
    if electronic_noise > 0:
      counts += rng.normal(0.0, float(electronic_noise), counts.shape)
    noise_p = np.log(incident / np.maximum(counts, 1.0)) - p
    # Back to 1/mm (divide by the voxel size), then to HU (1000 / mu_water).
    noise_mu = fbp_parallel(noise_p / pixel_mm, angles, chunk.shape[:2], filter_name)
    noise_hu[..., start:start + chunk.shape[-1]] = noise_mu * (1000.0 / mu_water_mm)
  out = slices + noise_hu
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
