"""Distribution metrics for unconditional 3D volume generation: 3D FID, MMD, MS-SSIM diversity.

PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation", ICLR 2026)
and the 3D generation work it compares with report
  * 3D FID: the Frechet distance between Gaussians fitted to features of real and generated
    volumes (Heusel et al., "GANs trained by a two time-scale update rule converge to a local
    Nash equilibrium", NeurIPS 2017), with the 2048 pooled features of a MedicalNet ResNet-50
    (jaxvol.models.medicalnet) in place of Inception;
  * MMD: the maximum mean discrepancy of Gretton et al., "A kernel two-sample test", JMLR 2012,
    on the same features;
  * MS-SSIM diversity: the mean multi-scale SSIM (Wang, Simoncelli and Bovik, "Multiscale
    structural similarity for image quality assessment", Asilomar 2003) between pairs of
    generated volumes; lower means more diverse samples, and the same number on real volumes is
    the reference.

Features come from a FeatureNetwork, which records whether its weights are pretrained. A Frechet
distance on randomly initialised features ranks sample sets but is not comparable with published
FIDs, so generation_report labels it "FD (random features)" and keeps "FID" for pretrained
MedicalNet weights.

Two protocols (``PROTOCOLS``) fix every choice that moves these numbers; a report names its own.
  * "authors" (the default): PRDiT's evaluation code (Fredy-Zhang/PRDiT, evaluations/), so
    numbers can stand next to the paper's tables.
      - features: the volumes go into MedicalNet as they are (PRDiT feeds [-1, 1] CT), no
        standardisation, no resize, no transpose: array axes (D, H, W) are PyTorch's (D, H, W) of
        an (N, 1, D, H, W) batch, which is Flax's (N, D, H, W, 1).
      - FID: sample mean and covariance (np.cov, N - 1), scipy's sqrtm of C_real C_fake; when
        that is not finite, 1e-6 is added to both diagonals and sqrtm taken again; an imaginary
        diagonal above 1e-3 is an error, smaller imaginary parts are dropped; no clamp at 0.
      - MMD: RBF kernel exp(-gamma ||x - y||^2) with gamma = 1 / (2 m), m the median of ALL
        N_real^2 real-real squared distances (the N zeros of the diagonal included, each pair
        twice; torch's median, the lower middle value for an even count); biased estimator
        (every kernel entry, diagonals included); reported as sqrt(max(MMD^2, 0)).
      - MS-SSIM diversity: MONAI-generative's MultiScaleSSIMMetric(spatial_dims=3,
        data_range=1, kernel_size=3): 3-tap Gaussian (sigma 1.5) without padding, five scales
        with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) (never renormalised), 2x average
        pooling (odd voxel dropped), negative scale means set to 0, in float32; the mean over
        all pairs of distinct generated volumes. MONAI accepts only sides >= 48.
  * "jaxvol": the conventions this module used first: per-volume z-scored features, a
    Frechet distance from symmetric eigendecompositions (exact for singular covariances),
    MMD^2 with the bandwidth from the median distance of the pooled sets, and MS-SSIM with
    jaxvol.eval.metrics' 7-voxel reflect-padded window over up to five scales, 100 random pairs.

Statistics run on the host in float64 (numpy), like jaxvol.eval.metrics; the feature network
and the authors' MS-SSIM run on the accelerator in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg
from scipy import ndimage

from jaxvol.eval.metrics import SSIM7_RADIUS, SSIM_K1, SSIM_K2, SSIM_SIGMA
from jaxvol.models import medicalnet

__all__ = [
    "PROTOCOLS",
    "MS_SSIM_WEIGHTS",
    "frechet_distance",
    "median_bandwidth",
    "real_median_bandwidth",
    "mmd_rbf",
    "ms_ssim_scales",
    "ms_ssim_3d",
    "ms_ssim_diversity",
    "monai_ms_ssim_min_size",
    "monai_ms_ssim",
    "monai_ms_ssim_diversity",
    "FeatureNetwork",
    "medicalnet_features",
    "random_medicalnet_features",
    "generation_report",
]

PROTOCOLS = ("authors", "jaxvol")
# Per-scale exponents of Wang et al. 2003, finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# PRDiT's MS-SSIM: MONAI-generative's Gaussian window of 3 taps (sigma 1.5), data range 1.
AUTHORS_MS_SSIM_KERNEL = 3
AUTHORS_MS_SSIM_SIGMA = 1.5
AUTHORS_MS_SSIM_DATA_RANGE = 1.0
# scipy sqrtm retry of PRDiT's FID (their eps) when the first root is not finite.
_SQRTM_EPS = 1e-6
# jaxvol protocol: random pairs per MS-SSIM diversity estimate.
JAXVOL_DIVERSITY_PAIRS = 100
# The Gaussian window of jaxvol.eval.metrics.ssim7 (sigma 1.5, radius 3: 7 voxels across).
_WINDOW = 2 * SSIM7_RADIUS + 1


def _features(feats, name: str) -> np.ndarray:
  feats = np.asarray(feats, dtype=np.float64)
  if feats.ndim != 2 or feats.shape[0] < 2:
    raise ValueError(f"{name}: expected (N, F) features with N >= 2, got shape {feats.shape}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{name} contains NaN/Inf")
  return feats


def _pair(feats_a, feats_b):
  a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
  return a, b


def _check_protocol(protocol: str) -> str:
  if protocol not in PROTOCOLS:
    raise ValueError(f"unknown generation protocol {protocol!r}; expected one of {PROTOCOLS}")
  return protocol


def frechet_distance(feats_a, feats_b, method: str = "eigh") -> float:
  """Frechet distance between Gaussians fitted to two feature sets.

  ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)), with the sample means and the
  N - 1 covariances (np.cov). Two ways to the trace of the root:

  * "eigh" (protocol "jaxvol"): tr((C_a C_b)^(1/2)) equals tr((C_a^(1/2) C_b C_a^(1/2))^(1/2)),
    a symmetric positive semi-definite matrix, so both roots come from symmetric
    eigendecompositions: no complex parts, exact for singular covariances (fewer samples than
    features, usual with 2048-d features); clamped at 0.
  * "sqrtm" (protocol "authors", PRDiT's fid.py): scipy.linalg.sqrtm of the product C_a C_b; if
    that is not finite, sqrtm of (C_a + eps I)(C_b + eps I) with eps = 1e-6; a complex result
    whose diagonal has an imaginary part above 1e-3 raises, otherwise the real part is kept.
    Not clamped. For singular covariances the Schur-based root carries rounding that the eigh
    route avoids, so the two can differ in the last digits there.

  With N < F the estimate is biased upwards either way; compare numbers only at equal sample
  counts.

  Args:
    feats_a: (N_a, F) features (real, in PRDiT's argument order).
    feats_b: (N_b, F) features.
    method: "eigh" or "sqrtm".

  Returns:
    The distance.
  """
  a, b = _pair(feats_a, feats_b)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.atleast_2d(np.cov(a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(b, rowvar=False))
  mean_term = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
  if method == "sqrtm":
    with warnings.catch_warnings():
      # A singular product (N < F) is expected; PRDiT silences the same report (disp=False).
      warnings.simplefilter("ignore", linalg.LinAlgWarning)
      root = linalg.sqrtm(cov_a @ cov_b)
      if not np.all(np.isfinite(root)):
        eye = np.eye(len(cov_a)) * _SQRTM_EPS
        root = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    if np.iscomplexobj(root):
      if not np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3):
        raise ValueError(f"matrix square root has an imaginary part of up to "
                         f"{np.max(np.abs(root.imag)):.3g}: covariances too ill-conditioned")
      root = root.real
    return float(mean_term - 2.0 * np.trace(root))
  if method != "eigh":
    raise ValueError(f"unknown Frechet distance method {method!r}; expected 'eigh' or 'sqrtm'")
  w, v = np.linalg.eigh(cov_a)
  root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
  # Rounding can push the distance of (near-)identical sets a hair below zero.
  return max(float(mean_term - 2.0 * trace_root), 0.0)


def _squared_distances(z: np.ndarray) -> np.ndarray:
  norms = np.sum(z * z, axis=1)
  sq = norms[:, None] + norms[None, :] - 2.0 * (z @ z.T)
  np.fill_diagonal(sq, 0.0)
  return np.clip(sq, 0.0, None)


def median_bandwidth(*feature_sets) -> float:
  """The median heuristic: median Euclidean distance between distinct rows of the pooled sets.

  Args:
    *feature_sets: (N_i, F) arrays, pooled.

  Returns:
    The bandwidth sigma (> 0).
  """
  z = np.concatenate([np.asarray(f, np.float64) for f in feature_sets], axis=0)
  sq = _squared_distances(z)
  sigma = float(np.sqrt(np.median(sq[np.triu_indices(len(z), 1)])))
  if sigma <= 0.0:
    raise ValueError("median pairwise distance is 0 (most features identical); pass bandwidth")
  return sigma


def real_median_bandwidth(feats_real) -> float:
  """PRDiT's MMD bandwidth: sigma = sqrt(m), m the median of all real-real squared distances.

  Their mmd.py takes the median over the full N x N matrix of squared distances of the real
  features: the N zeros of the diagonal count, every distinct pair counts twice, and torch's
  median of an even count is the lower of the two middle values (no averaging). With
  gamma = 1 / (2 m), exp(-gamma d^2) is the kernel of mmd_rbf at bandwidth sqrt(m). The
  generated features play no part, so the kernel is the same for every model compared.

  Args:
    feats_real: (N, F) features of the real volumes.

  Returns:
    The bandwidth sigma (> 0).
  """
  z = _features(feats_real, "feats_real")
  sq = _squared_distances(z).ravel()
  m = float(np.partition(sq, (sq.size - 1) // 2)[(sq.size - 1) // 2])
  if m <= 0.0:
    raise ValueError("median real-real squared distance is 0 (over half the real features "
                     "coincide); pass bandwidth")
  return float(np.sqrt(m))


def mmd_rbf(feats_a, feats_b, bandwidth: float | None = None, unbiased: bool = False) -> float:
  """Squared maximum mean discrepancy with the kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)).

  The default is the biased V-statistic MMD^2_b of Gretton et al. 2012 (eq. 5): every kernel
  entry, diagonals included. It is >= 0 and exactly 0 for identical sets, so a table of it reads
  like a distance. ``unbiased=True`` gives MMD^2_u (eq. 3), which drops the K(x_i, x_i) terms: its
  expectation is 0 when both sets come from one distribution, but single values can be negative.

  Args:
    feats_a: (N_a, F) features.
    feats_b: (N_b, F) features.
    bandwidth: sigma; None takes the median heuristic over the pooled sets (median_bandwidth).
    unbiased: MMD^2_u instead of MMD^2_b.

  Returns:
    The squared MMD.
  """
  a, b = _pair(feats_a, feats_b)
  if bandwidth is None:
    bandwidth = median_bandwidth(a, b)
  if not bandwidth > 0:
    raise ValueError(f"bandwidth must be positive, got {bandwidth}")
  n = len(a)
  k = np.exp(-_squared_distances(np.concatenate([a, b])) / (2.0 * bandwidth**2))
  k_aa, k_bb, k_ab = k[:n, :n], k[n:, n:], k[:n, n:]
  if unbiased:
    m = len(b)
    within = ((k_aa.sum() - np.trace(k_aa)) / (n * (n - 1))
              + (k_bb.sum() - np.trace(k_bb)) / (m * (m - 1)))
  else:
    within = k_aa.mean() + k_bb.mean()
  return float(within - 2.0 * k_ab.mean())


def ms_ssim_scales(shape, max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
  """Number of MS-SSIM scales a volume supports: every scale must be wider than the window.

  Scale j has floor(size / 2^j) voxels along each axis; it is kept while its smallest side still
  exceeds the 7-voxel Gaussian window, so at least one full window fits without reflected
  padding dominating. 128^3 gets all 5 scales, 64^3 gets 4, 16^3 gets 2.

  Args:
    shape: (D, H, W).
    max_scales: upper limit (the five scales of Wang et al. 2003).

  Returns:
    The number of scales, >= 1.
  """
  smallest = min(shape)
  if smallest <= _WINDOW:
    raise ValueError(f"volume {tuple(shape)} is too small for the {_WINDOW}-voxel SSIM window")
  scales = 1
  while scales < max_scales and smallest // 2**scales > _WINDOW:
    scales += 1
  return scales


def _gauss(x):
  return ndimage.gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM7_RADIUS / SSIM_SIGMA,
                                 mode="reflect")


def _ssim_and_cs(x, y, data_range):
  """Mean SSIM and mean contrast-structure term of one scale (the window of metrics.ssim7)."""
  c1 = (SSIM_K1 * data_range) ** 2
  c2 = (SSIM_K2 * data_range) ** 2
  mu_x, mu_y = _gauss(x), _gauss(y)
  var_x = _gauss(x * x) - mu_x * mu_x
  var_y = _gauss(y * y) - mu_y * mu_y
  cov = _gauss(x * y) - mu_x * mu_y
  cs = (2.0 * cov + c2) / (var_x + var_y + c2)
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  return float(np.mean(luminance * cs)), float(np.mean(cs))


def _halve(x):
  """2x2x2 average pooling; an odd trailing voxel is dropped."""
  d, h, w = (s // 2 for s in x.shape)
  return x[:2 * d, :2 * h, :2 * w].reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))


def ms_ssim_3d(a, b, data_range=None, scales: int | None = None) -> float:
  """3D multi-scale SSIM of Wang et al. 2003.

  prod_{j < M} cs_j^{w_j} * ssim_M^{w_M}: the contrast-structure term at the M - 1 finer scales
  and the full SSIM (with luminance) at the coarsest, each averaged over the volume, with
  2x average pooling between scales. The window, constants and border handling are those of
  jaxvol.eval.metrics.ssim7, so one scale reproduces it. With fewer than five scales the first M
  weights are renormalised to sum to 1. Negative scale means (possible for unrelated volumes)
  are clipped to 0 before the fractional powers, so the result lies in [0, 1].

  Args:
    a: volume (D, H, W).
    b: volume, same shape.
    data_range: the dynamic range L; defaults to the joint max - min of a and b. Pass one fixed
      value when comparing many pairs.
    scales: number of scales; defaults to ms_ssim_scales(shape).

  Returns:
    MS-SSIM, 1.0 for identical volumes.
  """
  x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if x.shape != y.shape or x.ndim != 3:
    raise ValueError(f"expected two (D, H, W) volumes of one shape, got {x.shape} and {y.shape}")
  if data_range is None:
    data_range = float(max(x.max(), y.max()) - min(x.min(), y.min()))
  if not data_range > 0:
    raise ValueError(f"data_range must be positive, got {data_range}")
  supported = ms_ssim_scales(x.shape)
  scales = supported if scales is None else scales
  if not 1 <= scales <= supported:
    raise ValueError(f"{scales} scales requested; volume {x.shape} supports 1..{supported}")
  weights = np.asarray(MS_SSIM_WEIGHTS[:scales]) / np.sum(MS_SSIM_WEIGHTS[:scales])
  result = 1.0
  for j in range(scales):
    ssim, cs = _ssim_and_cs(x, y, data_range)
    value = ssim if j == scales - 1 else cs
    result *= max(value, 0.0) ** weights[j]
    x, y = _halve(x), _halve(y)
  return float(result)


def _volumes(volumes, name: str) -> np.ndarray:
  v = np.asarray(volumes)
  if v.ndim == 5 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim != 4:
    raise ValueError(f"{name}: expected (N, D, H, W) or (N, D, H, W, 1) volumes, got {v.shape}")
  return v


def ms_ssim_diversity(volumes, pairs: int = 100, rng=0, data_range=None) -> float:
  """Mean MS-SSIM over random distinct pairs of a set of volumes (lower = more diverse).

  Args:
    volumes: (N, D, H, W) or (N, D, H, W, 1), N >= 2.
    pairs: number of unordered pairs, drawn without replacement; all pairs when there are fewer.
    rng: numpy Generator or seed.
    data_range: range L shared by all pairs; defaults to the set's max - min, so every pair is
      scored on one scale. Pass the same value for the sets being compared.

  Returns:
    The mean MS-SSIM.
  """
  v = _volumes(volumes, "volumes")
  n = len(v)
  if n < 2:
    raise ValueError("MS-SSIM diversity needs at least two volumes")
  if data_range is None:
    data_range = float(v.max() - v.min())
    if data_range <= 0:  # All volumes are one constant: identical, whatever the range.
      data_range = 1.0
  rows, cols = np.triu_indices(n, 1)
  if pairs < len(rows):
    pick = np.random.default_rng(rng).choice(len(rows), size=pairs, replace=False)
    rows, cols = rows[pick], cols[pick]
  return float(np.mean([ms_ssim_3d(v[i], v[j], data_range) for i, j in zip(rows, cols)]))


def monai_ms_ssim_min_size(kernel_size: int = AUTHORS_MS_SSIM_KERNEL,
                           scales: int = len(MS_SSIM_WEIGHTS)) -> int:
  """Smallest side MONAI-generative's MultiScaleSSIMMetric accepts: 48 for kernel 3, 5 scales.

  MONAI requires side // max(1, scales - 1)^2 > kernel_size - 1 on every axis (a square where
  2^(scales - 1) would be the pooling factor; the two agree for five scales).
  """
  return max(1, scales - 1) ** 2 * kernel_size


def _gauss_taps(kernel_size: int, sigma: float) -> np.ndarray:
  """MONAI-generative's sampled 1D Gaussian: offsets (1 - k) / 2 ... (k - 1) / 2, sum 1."""
  offsets = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
  taps = np.exp(-0.5 * (offsets / sigma) ** 2)
  return (taps / taps.sum()).astype(np.float32)


def _valid_filter(x, taps):
  """Separable filter without padding over the last three axes (each shrinks by k - 1)."""
  k = len(taps)
  for axis in (-3, -2, -1):
    n = x.shape[axis] - k + 1
    x = sum(float(taps[t]) * jax.lax.slice_in_dim(x, t, t + n, axis=x.ndim + axis)
            for t in range(k))
  return x


def _pool2(x):
  """2x2x2 average pooling over the last three axes, stride 2; odd trailing voxels dropped."""
  *lead, d, h, w = x.shape
  d, h, w = d // 2, h // 2, w // 2
  x = x[..., :2 * d, :2 * h, :2 * w].reshape(*lead, d, 2, h, 2, w, 2)
  return x.mean(axis=(-5, -3, -1))


@functools.partial(jax.jit, static_argnames=("data_range", "kernel_size", "sigma", "weights"))
def _monai_ms_ssim_batch(x, y, data_range, kernel_size, sigma, weights):
  """(B, D, H, W) pairs -> (B,) MS-SSIM, MONAI-generative's computation (monai_ms_ssim)."""
  taps = _gauss_taps(kernel_size, sigma)
  c1 = (0.01 * data_range) ** 2
  c2 = (0.03 * data_range) ** 2
  values = []
  for j in range(len(weights)):
    mu_x, mu_y = _valid_filter(x, taps), _valid_filter(y, taps)
    var_x = _valid_filter(x * x, taps) - mu_x * mu_x
    var_y = _valid_filter(y * y, taps) - mu_y * mu_y
    cov = _valid_filter(x * y, taps) - mu_x * mu_y
    cs = (2.0 * cov + c2) / (var_x + var_y + c2)
    if j < len(weights) - 1:
      values.append(jnp.maximum(jnp.mean(cs, axis=(1, 2, 3)), 0.0))
      x, y = _pool2(x), _pool2(y)
    else:
      luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
      values.append(jnp.maximum(jnp.mean(luminance * cs, axis=(1, 2, 3)), 0.0))
  w = jnp.asarray(weights, jnp.float32)
  return jnp.prod(jnp.stack(values) ** w[:, None], axis=0)


@functools.partial(jax.jit, static_argnames=("data_range",))
def _score_pairs(volumes, rows, cols, data_range):
  """PRDiT's MS-SSIM of the pairs (volumes[rows], volumes[cols]), gathered on the device."""
  return _monai_ms_ssim_batch(volumes[rows], volumes[cols], data_range, AUTHORS_MS_SSIM_KERNEL,
                              AUTHORS_MS_SSIM_SIGMA, MS_SSIM_WEIGHTS)


def monai_ms_ssim(a, b, data_range: float = AUTHORS_MS_SSIM_DATA_RANGE,
                  kernel_size: int = AUTHORS_MS_SSIM_KERNEL,
                  sigma: float = AUTHORS_MS_SSIM_SIGMA, weights=MS_SSIM_WEIGHTS):
  """3D MS-SSIM as MONAI-generative's MultiScaleSSIMMetric computes it (PRDiT's diversity).

  Per scale: a k-tap sampled Gaussian (separable, no padding, so each side shrinks by k - 1),
  local means, variances and covariance, cs = (2 cov + C2) / (var_x + var_y + C2) averaged over
  the valid region and set to 0 where negative; the coarsest scale uses the full SSIM (with
  luminance) instead; then prod value_j^(w_j) with the weights as given (MONAI does not
  renormalise), and 2x average pooling between scales. C1 = (0.01 L)^2, C2 = (0.03 L)^2.
  float32, as MONAI computes.

  Args:
    a: (D, H, W) volume, or (B, D, H, W) volumes.
    b: same shape as a.
    data_range: L (PRDiT passes 1 for [-1, 1] volumes).
    kernel_size: window taps per axis (3 in PRDiT).
    sigma: Gaussian standard deviation in voxels (MONAI's default 1.5).
    weights: per-scale exponents, finest first; their count is the number of scales.

  Returns:
    A float for one pair, else a (B,) numpy array.
  """
  x, y = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if x.shape != y.shape or x.ndim not in (3, 4):
    raise ValueError(f"expected two (D, H, W) or (B, D, H, W) arrays of one shape, got {x.shape} "
                     f"and {y.shape}")
  minimum = monai_ms_ssim_min_size(kernel_size, len(weights))
  if min(x.shape[-3:]) < minimum:
    raise ValueError(f"volume {x.shape[-3:]} too small for MONAI's {len(weights)}-scale MS-SSIM "
                     f"with kernel {kernel_size}: every side must be >= {minimum}")
  if not data_range > 0:
    raise ValueError(f"data_range must be positive, got {data_range}")
  single = x.ndim == 3
  out = np.asarray(_monai_ms_ssim_batch(x.reshape(-1, *x.shape[-3:]), y.reshape(-1, *y.shape[-3:]),
                                        float(data_range), int(kernel_size), float(sigma),
                                        tuple(float(w) for w in weights)), np.float64)
  return float(out[0]) if single else out


def _all_or_random_pairs(n: int, pairs: int | None, rng):
  rows, cols = np.triu_indices(n, 1)
  if pairs and pairs < len(rows):
    pick = np.random.default_rng(rng).choice(len(rows), size=pairs, replace=False)
    rows, cols = rows[pick], cols[pick]
  return rows, cols


def monai_ms_ssim_diversity(volumes, pairs: int | None = None, rng=0,
                            data_range: float = AUTHORS_MS_SSIM_DATA_RANGE,
                            batch_size: int = 8) -> tuple[float, int]:
  """PRDiT's MS-SSIM diversity: mean monai_ms_ssim over pairs of distinct volumes.

  PRDiT's ms_ssim.py scores every ordered pair (i, j), i != j (self pairs skipped by file name),
  and averages: since SSIM is symmetric in its two arguments, that is the mean over the
  N (N - 1) / 2 unordered pairs i < j, which is what runs here. The volumes go to the
  accelerator once; pairs are gathered there, batch_size at a time (one compiled program).

  Args:
    volumes: (N, D, H, W) or (N, D, H, W, 1), N >= 2, every side >= monai_ms_ssim_min_size().
    pairs: None or 0 for all pairs (PRDiT); else that many unordered pairs drawn at random.
    rng: numpy Generator or seed for drawn pairs.
    data_range: L (1 in PRDiT).
    batch_size: pairs per call.

  Returns:
    (mean MS-SSIM, number of pairs scored).
  """
  v = _volumes(volumes, "volumes").astype(np.float32)
  if len(v) < 2:
    raise ValueError("MS-SSIM diversity needs at least two volumes")
  minimum = monai_ms_ssim_min_size()
  if min(v.shape[1:]) < minimum:
    raise ValueError(f"volumes {v.shape[1:]} too small for MONAI's 5-scale MS-SSIM with kernel "
                     f"{AUTHORS_MS_SSIM_KERNEL}: every side must be >= {minimum}")
  if not np.all(np.isfinite(v)):
    raise ValueError("volumes contain NaN/Inf")
  rows, cols = _all_or_random_pairs(len(v), pairs, rng)
  on_device = jnp.asarray(v)
  total = 0.0
  for start in range(0, len(rows), batch_size):
    r, c = rows[start:start + batch_size], cols[start:start + batch_size]
    short = batch_size - len(r)
    # The last batch repeats its final pair so every call has one shape.
    values = np.asarray(_score_pairs(on_device, np.pad(r, (0, short), mode="edge"),
                                     np.pad(c, (0, short), mode="edge"), float(data_range)),
                        np.float64)
    total += float(values[:len(r)].sum())
  return total / len(rows), len(rows)


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A frozen feature extractor for distribution metrics.

  Attributes:
    name: what the features are, e.g. 'MedicalNet ResNet-50'; reports carry it.
    fn: batch function, (B, D, H, W, 1) float32 -> (B, dim), typically jitted.
    pretrained: whether the weights are the published pretrained ones. Only then is the Frechet
      distance an "FID" comparable with other papers.
    dim: feature length.
    batch_size: volumes per call of fn; the last batch is padded so fn compiles once.
    standardize: whether fn z-scores each volume before the network (protocol "jaxvol") or
      takes it as given (protocol "authors").
    weights_file: the weights file the network was loaded from ("" for none).
    weights_sha256: that file's SHA-256 ("" when unknown).
  """

  name: str
  fn: Callable
  pretrained: bool
  dim: int
  batch_size: int = 4
  standardize: bool = False
  weights_file: str = ""
  weights_sha256: str = ""

  def __call__(self, volumes) -> np.ndarray:
    """(N, D, H, W) or (N, D, H, W, 1) volumes -> (N, dim) float64 features."""
    v = _volumes(volumes, "volumes").astype(np.float32)[..., None]
    if not np.all(np.isfinite(v)):
      raise ValueError("volumes contain NaN/Inf")
    out = []
    for start in range(0, len(v), self.batch_size):
      batch = v[start:start + self.batch_size]
      short = self.batch_size - len(batch)
      if short:
        batch = np.concatenate([batch, np.repeat(batch[-1:], short, axis=0)])
      out.append(np.asarray(self.fn(batch), np.float64)[:self.batch_size - short])
    return np.concatenate(out)


def _medicalnet_network(model, variables, name, pretrained, resize_to, batch_size, standardize,
                        weights_file="", weights_sha256=""):
  if isinstance(resize_to, int):
    resize_to = (resize_to,) * 3

  @jax.jit
  def features(variables, x):
    if resize_to is not None:
      x = jax.image.resize(x, (x.shape[0], *resize_to, 1), "trilinear")
    if standardize:
      # MedicalNet was trained on volumes standardised to zero mean and unit variance (over
      # the foreground), so a per-volume z-score makes HU, [-1, 1] or any affine scaling of
      # the intensities give the same features.
      mean = jnp.mean(x, axis=(1, 2, 3, 4), keepdims=True)
      std = jnp.std(x, axis=(1, 2, 3, 4), keepdims=True)
      x = (x - mean) / jnp.maximum(std, 1e-6)
    return model.apply(variables, x)

  # Weights go to the device once and are passed as an argument, not baked in as constants.
  fn = functools.partial(features, jax.device_put(variables))
  return FeatureNetwork(name=name, fn=fn, pretrained=pretrained,
                        dim=medicalnet.feature_dim(model), batch_size=batch_size,
                        standardize=bool(standardize), weights_file=weights_file,
                        weights_sha256=weights_sha256)


def medicalnet_features(variables, resize_to=None, batch_size: int = 4,
                        name: str | None = None, standardize: bool = False,
                        weights_file: str = "", weights_sha256: str = "") -> FeatureNetwork:
  """Pretrained MedicalNet features: pooled last-stage output (2048-d for ResNet-50).

  Volumes are optionally resized (trilinear), optionally z-scored per volume, and go into the
  network with their array axes as its (D, H, W): the same voxel order as PyTorch's
  (N, 1, D, H, W) input to MedicalNet. PRDiT feeds [-1, 1] volumes as they are
  (standardize=False, the default). MedicalNet's own preprocessing z-scores over the non-zero
  voxels and fills the background with noise; standardize=True is the deterministic whole-volume
  counterpart that suits CT, where air is not 0, and makes the features independent of the
  intensity scale.

  Args:
    variables: released MedicalNet weights, from medicalnet.load_medicalnet.
    resize_to: None, an int, or (D, H, W): the grid the network sees.
    batch_size: volumes per jitted call.
    name: report name; defaults to e.g. 'MedicalNet ResNet-50'.
    standardize: z-score each volume first (protocol "jaxvol").
    weights_file: where the variables came from, for reports.
    weights_sha256: that file's SHA-256, for reports.

  Returns:
    A FeatureNetwork with pretrained=True.
  """
  model = medicalnet.model_from_variables(variables)
  return _medicalnet_network(model, variables, name or medicalnet.describe(model), True,
                             resize_to, batch_size, standardize, weights_file, weights_sha256)


def random_medicalnet_features(seed: int = 0, width: int = 64, depth: int = 50, resize_to=None,
                               batch_size: int = 4, standardize: bool = False) -> FeatureNetwork:
  """Features of a randomly initialised MedicalNet ResNet, for when the weights are unavailable.

  Distances on random features still separate sample sets, but they are not FIDs and are not
  comparable with published numbers; the name says so and pretrained is False.

  Args:
    seed: initialisation seed.
    width: stem width (64 as in MedicalNet; smaller for fast tests).
    depth: network depth (medicalnet.DEPTHS).
    resize_to: as in medicalnet_features.
    batch_size: volumes per jitted call.
    standardize: as in medicalnet_features.

  Returns:
    A FeatureNetwork with pretrained=False.
  """
  model = medicalnet.resnet(depth, width=width)
  variables = medicalnet.init_variables(model, seed)
  name = f"random-init {medicalnet.describe(model)} (NOT pretrained, seed {seed})"
  return _medicalnet_network(model, variables, name, False, resize_to, batch_size, standardize)


def generation_report(real, fake, feature_net: FeatureNetwork, rng=0, *,
                      protocol: str = "authors", data_range=None,
                      diversity_pairs: int | None = None,
                      mmd_bandwidth: float | None = None) -> dict:
  """FID (or FD on random features), MMD and MS-SSIM diversity of generated against real volumes.

  The protocol (module docstring) fixes the estimators; the feature network must match it
  ("authors" takes volumes as given, "jaxvol" z-scores them), or this raises.

  Args:
    real: (N_real, D, H, W[, 1]) real volumes.
    fake: (N_fake, D, H, W[, 1]) generated volumes on the same grid and intensity scale
      (protocol "authors": the network's [-1, 1] range, as PRDiT feeds them).
    feature_net: the FeatureNetwork.
    rng: numpy Generator or seed for drawn MS-SSIM pairs.
    protocol: "authors" or "jaxvol".
    data_range: MS-SSIM range L for both sets; defaults to 1 ("authors", PRDiT's value) or the
      real volumes' max - min ("jaxvol").
    diversity_pairs: MS-SSIM pairs per set; None or 0 takes the protocol's default (all pairs
      for "authors", 100 random ones for "jaxvol").
    mmd_bandwidth: RBF sigma; None takes the protocol's median heuristic.

  Returns:
    Dict with 'protocol'; 'fid' (with 'fid_label': 'FID' only for pretrained features, else 'FD
    (random features)', and 'fid_method'); 'mmd' (sqrt(MMD^2) for "authors", MMD^2 for
    "jaxvol", as 'mmd_label' says), 'mmd_squared', 'mmd_bandwidth', 'mmd_bandwidth_rule';
    'ms_ssim_diversity' of the generated set and 'ms_ssim_diversity_real' (None, with
    'ms_ssim_note', when the volumes are below MONAI's minimum size), 'ms_ssim_pairs' and
    'ms_ssim_pairs_real' (pairs scored), 'ms_ssim_settings'; 'n_real', 'n_fake',
    'feature_network', 'feature_dim', 'feature_input', 'feature_weights',
    'feature_weights_sha256', 'pretrained' and 'data_range'.
  """
  _check_protocol(protocol)
  authors = protocol == "authors"
  if feature_net.standardize == authors:
    raise ValueError(
        f"protocol {protocol!r} {'feeds volumes as they are' if authors else 'z-scores volumes'}"
        f" but feature network {feature_net.name!r} was built with standardize="
        f"{feature_net.standardize}; build it with standardize={not authors}")
  real, fake = _volumes(real, "real"), _volumes(fake, "fake")
  if real.shape[1:] != fake.shape[1:]:
    raise ValueError(f"real {real.shape[1:]} and fake {fake.shape[1:]} volumes differ in shape")
  if data_range is None:
    data_range = AUTHORS_MS_SSIM_DATA_RANGE if authors else float(real.max() - real.min())
  feats_real, feats_fake = feature_net(real), feature_net(fake)
  if mmd_bandwidth is not None:
    bandwidth, rule = float(mmd_bandwidth), "given"
  elif authors:
    try:
      bandwidth = real_median_bandwidth(feats_real)
      rule = ("sqrt of the median of all N_real^2 real-real squared distances (diagonal "
              "included, lower middle value)")
    except ValueError:
      # With N_real <= 2 the diagonal's zeros are the median and PRDiT's mmd.py divides by 0.
      bandwidth = median_bandwidth(feats_real)
      rule = ("median distance over distinct real-real pairs (PRDiT's rule gives 0 here: "
              f"N_real = {len(real)} or coinciding features)")
  else:
    bandwidth = median_bandwidth(feats_real, feats_fake)
    rule = "median distance over distinct pairs of the pooled real and generated features"
  mmd2 = mmd_rbf(feats_real, feats_fake, bandwidth)
  suffix = "" if feature_net.pretrained else " (random features)"
  report = {
      "protocol": protocol,
      "fid": frechet_distance(feats_real, feats_fake, "sqrtm" if authors else "eigh"),
      "fid_label": ("FID" if feature_net.pretrained else "FD") + suffix,
      "fid_method": "scipy sqrtm(C_real C_fake)" if authors else "symmetric eigendecompositions",
      "mmd": float(np.sqrt(max(mmd2, 0.0))) if authors else mmd2,
      "mmd_label": ("MMD" if authors else "MMD^2") + suffix,
      "mmd_squared": mmd2,
      "mmd_bandwidth": bandwidth,
      "mmd_bandwidth_rule": rule,
      "n_real": len(real),
      "n_fake": len(fake),
      "feature_network": feature_net.name,
      "feature_dim": feature_net.dim,
      "feature_input": ("z-scored per volume" if feature_net.standardize
                        else "as given (no standardisation)"),
      "feature_weights": feature_net.weights_file or None,
      "feature_weights_sha256": feature_net.weights_sha256 or None,
      "pretrained": feature_net.pretrained,
      "data_range": data_range,
  }
  fake_rng, real_rng = np.random.default_rng(rng).spawn(2)
  if authors:
    report["ms_ssim_settings"] = {
        "implementation": "MONAI-generative MultiScaleSSIMMetric", "spatial_dims": 3,
        "kernel_size": AUTHORS_MS_SSIM_KERNEL, "kernel_sigma": AUTHORS_MS_SSIM_SIGMA,
        "weights": list(MS_SSIM_WEIGHTS), "data_range": data_range}
    minimum = monai_ms_ssim_min_size()
    if min(real.shape[1:]) < minimum:
      report.update(ms_ssim_diversity=None, ms_ssim_diversity_real=None, ms_ssim_pairs=0,
                    ms_ssim_pairs_real=0,
                    ms_ssim_note=f"volumes {real.shape[1:]} are below the {minimum}-voxel side "
                                 "MONAI's 5-scale, kernel-3 MS-SSIM accepts")
      return report
    fake_div, n_pairs = monai_ms_ssim_diversity(fake, diversity_pairs or None, fake_rng,
                                                data_range)
    real_div, n_real_pairs = monai_ms_ssim_diversity(real, diversity_pairs or None, real_rng,
                                                     data_range)
  else:
    pairs = diversity_pairs or JAXVOL_DIVERSITY_PAIRS
    report["ms_ssim_settings"] = {
        "implementation": "jaxvol ms_ssim_3d", "window": _WINDOW, "sigma": SSIM_SIGMA,
        "padding": "reflect", "weights": list(MS_SSIM_WEIGHTS), "data_range": data_range}
    fake_div = ms_ssim_diversity(fake, pairs, fake_rng, data_range)
    real_div = ms_ssim_diversity(real, pairs, real_rng, data_range)
    n_pairs = min(pairs, len(fake) * (len(fake) - 1) // 2)
    n_real_pairs = min(pairs, len(real) * (len(real) - 1) // 2)
  report.update(ms_ssim_diversity=fake_div, ms_ssim_diversity_real=real_div,
                ms_ssim_pairs=n_pairs, ms_ssim_pairs_real=n_real_pairs)
  return report
