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
    structural similarity for image quality assessment", Asilomar 2003) between random pairs of
    generated volumes; lower means more diverse samples, and the same number on real volumes is
    the reference.

Features come from a FeatureNetwork, which records whether its weights are pretrained. A Frechet
distance on randomly initialised features ranks sample sets but is not comparable with published
FIDs, so generation_report labels it "FD (random features)" and keeps "FID" for pretrained
MedicalNet weights.

Statistics run on the host in float64 (numpy), like jaxvol.eval.metrics; only the feature
network runs on the accelerator.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from jaxvol.eval.metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA
from jaxvol.models import medicalnet

__all__ = [
    "MS_SSIM_WEIGHTS",
    "frechet_distance",
    "median_bandwidth",
    "mmd_rbf",
    "ms_ssim_scales",
    "ms_ssim_3d",
    "ms_ssim_diversity",
    "FeatureNetwork",
    "medicalnet_features",
    "random_medicalnet_features",
    "generation_report",
]

# Per-scale exponents of Wang et al. 2003, finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# The Gaussian window of jaxvol.eval.metrics.ssim (sigma 1.5, radius 3: 7 voxels across).
_WINDOW = 2 * SSIM_RADIUS + 1


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


def frechet_distance(feats_a, feats_b) -> float:
  """Frechet distance between Gaussians fitted to two feature sets.

  ||mu_a - mu_b||^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^(1/2)). The trace of the matrix square
  root equals that of (C_a^(1/2) C_b C_a^(1/2))^(1/2), a symmetric positive semi-definite matrix,
  so both roots come from symmetric eigendecompositions: no complex parts, and singular
  covariances (fewer samples than features, usual with 2048-d features) need no regulariser.
  With N < F the estimate is still biased upwards; compare numbers only at equal sample counts.

  Args:
    feats_a: (N_a, F) features.
    feats_b: (N_b, F) features.

  Returns:
    The distance, >= 0.
  """
  a, b = _pair(feats_a, feats_b)
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a = np.atleast_2d(np.cov(a, rowvar=False))
  cov_b = np.atleast_2d(np.cov(b, rowvar=False))
  w, v = np.linalg.eigh(cov_a)
  root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_root = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
  fd = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root
  # Rounding can push the distance of (near-)identical sets a hair below zero.
  return max(float(fd), 0.0)


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
  return ndimage.gaussian_filter(x, sigma=SSIM_SIGMA, truncate=SSIM_RADIUS / SSIM_SIGMA,
                                 mode="reflect")


def _ssim_and_cs(x, y, data_range):
  """Mean SSIM and mean contrast-structure term of one scale (the window of metrics.ssim)."""
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
  jaxvol.eval.metrics.ssim, so one scale reproduces it. With fewer than five scales the first M
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
  """

  name: str
  fn: Callable
  pretrained: bool
  dim: int
  batch_size: int = 4

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


def _medicalnet_network(model, variables, name, pretrained, resize_to, batch_size):
  if isinstance(resize_to, int):
    resize_to = (resize_to,) * 3

  @jax.jit
  def features(variables, x):
    if resize_to is not None:
      x = jax.image.resize(x, (x.shape[0], *resize_to, 1), "trilinear")
    # MedicalNet was trained on volumes standardised to zero mean and unit variance (over
    # the foreground), so a per-volume z-score makes HU, [-1, 1] or any affine scaling of the
    # intensities give the same features.
    mean = jnp.mean(x, axis=(1, 2, 3, 4), keepdims=True)
    std = jnp.std(x, axis=(1, 2, 3, 4), keepdims=True)
    return model.apply(variables, (x - mean) / jnp.maximum(std, 1e-6))

  # Weights go to the device once and are passed as an argument, not baked in as constants.
  fn = functools.partial(features, jax.device_put(variables))
  return FeatureNetwork(name=name, fn=fn, pretrained=pretrained,
                        dim=medicalnet.feature_dim(model), batch_size=batch_size)


def medicalnet_features(variables, resize_to=None, batch_size: int = 4,
                        name: str | None = None) -> FeatureNetwork:
  """Pretrained MedicalNet features: pooled last-stage output (2048-d for ResNet-50).

  Volumes are optionally resized (trilinear) and then z-scored per volume. MedicalNet's own
  preprocessing z-scores over the non-zero voxels and fills the background with noise; a
  whole-volume z-score is the deterministic counterpart that suits CT, where air is not 0.

  Args:
    variables: released MedicalNet weights, from medicalnet.load_medicalnet.
    resize_to: None, an int, or (D, H, W): the grid the network sees.
    batch_size: volumes per jitted call.
    name: report name; defaults to e.g. 'MedicalNet ResNet-50'.

  Returns:
    A FeatureNetwork with pretrained=True.
  """
  model = medicalnet.model_from_variables(variables)
  return _medicalnet_network(model, variables, name or medicalnet.describe(model), True,
                             resize_to, batch_size)


def random_medicalnet_features(seed: int = 0, width: int = 64, depth: int = 50, resize_to=None,
                               batch_size: int = 4) -> FeatureNetwork:
  """Features of a randomly initialised MedicalNet ResNet, for when the weights are unavailable.

  Distances on random features still separate sample sets, but they are not FIDs and are not
  comparable with published numbers; the name says so and pretrained is False.

  Args:
    seed: initialisation seed.
    width: stem width (64 as in MedicalNet; smaller for fast tests).
    depth: network depth (medicalnet.DEPTHS).
    resize_to: as in medicalnet_features.
    batch_size: volumes per jitted call.

  Returns:
    A FeatureNetwork with pretrained=False.
  """
  model = medicalnet.resnet(depth, width=width)
  variables = medicalnet.init_variables(model, seed)
  name = f"random-init {medicalnet.describe(model)} (NOT pretrained, seed {seed})"
  return _medicalnet_network(model, variables, name, False, resize_to, batch_size)


def generation_report(real, fake, feature_net: FeatureNetwork, rng=0, *, data_range=None,
                      diversity_pairs: int = 100, mmd_bandwidth: float | None = None) -> dict:
  """FID (or FD on random features), MMD and MS-SSIM diversity of generated against real volumes.

  Args:
    real: (N_real, D, H, W[, 1]) real volumes.
    fake: (N_fake, D, H, W[, 1]) generated volumes on the same grid and intensity scale.
    feature_net: the FeatureNetwork.
    rng: numpy Generator or seed for the MS-SSIM pairs.
    data_range: MS-SSIM range L for both sets; defaults to the real volumes' max - min.
    diversity_pairs: pairs per MS-SSIM diversity estimate.
    mmd_bandwidth: RBF sigma; defaults to the median heuristic on the pooled features.

  Returns:
    Dict with 'fid' (and 'fid_label': 'FID' only for pretrained features, else 'FD (random
    features)'), 'mmd' (biased MMD^2, with 'mmd_label' and 'mmd_bandwidth'), 'ms_ssim_diversity'
    of the generated set and 'ms_ssim_diversity_real', 'n_real', 'n_fake', 'feature_network',
    'feature_dim' and 'pretrained'.
  """
  real, fake = _volumes(real, "real"), _volumes(fake, "fake")
  if real.shape[1:] != fake.shape[1:]:
    raise ValueError(f"real {real.shape[1:]} and fake {fake.shape[1:]} volumes differ in shape")
  if data_range is None:
    data_range = float(real.max() - real.min())
  feats_real, feats_fake = feature_net(real), feature_net(fake)
  bandwidth = (median_bandwidth(feats_real, feats_fake) if mmd_bandwidth is None
               else float(mmd_bandwidth))
  fake_rng, real_rng = np.random.default_rng(rng).spawn(2)
  suffix = "" if feature_net.pretrained else " (random features)"
  return {
      "fid": frechet_distance(feats_real, feats_fake),
      "fid_label": ("FID" if feature_net.pretrained else "FD") + suffix,
      "mmd": mmd_rbf(feats_real, feats_fake, bandwidth),
      "mmd_label": "MMD" + suffix,
      "mmd_bandwidth": bandwidth,
      "ms_ssim_diversity": ms_ssim_diversity(fake, diversity_pairs, fake_rng, data_range),
      "ms_ssim_diversity_real": ms_ssim_diversity(real, diversity_pairs, real_rng, data_range),
      "n_real": len(real),
      "n_fake": len(fake),
      "feature_network": feature_net.name,
      "feature_dim": feature_net.dim,
      "pretrained": feature_net.pretrained,
      "data_range": data_range,
  }
