"""Degradations that turn one clean volume into a (degraded input, clean target) training pair.

Only what needs physics lives here: low-count PET by Poisson thinning, and non-attenuation-
corrected (NAC) PET from a PET image plus an attenuation map. All functions are plain numpy,
vectorised, and take a seeded `np.random.Generator` where they draw random numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MU_WATER_511KEV_PER_CM = 0.096  # Linear attenuation coefficient of water at 511 keV.


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
