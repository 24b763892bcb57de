"""Forward operators of the plug-and-play inverse problems: MRI, super-resolution, denoising.

For the patch-based diffusion priors of "Investigating the Feasibility of Patch-based Inference for
Generalized Diffusion Priors in Inverse Problems for Medical Images" (2025) and for the classical
references in `jaxvol.inverse.classical`. Every operator acts on the last three axes of a real or
complex (..., D, H, W) volume (leading batch axes pass through) and is a frozen dataclass registered
as a pytree (arrays are leaves, configuration is static), so it can be an argument of `jax.jit`:

  forward(x)                   A x
  adjoint(y)                   A^H y, the adjoint under <a, b> = sum(conj(a) * b)
  normal(x)                    A^H A x
  data_consistency(x, y, rho)  argmin_u 1/2 ||A u - y||^2 + rho/2 ||u - x||^2, the data step of
                               half-quadratic splitting (DiffPIR, Zhu et al., CVPR 2023); rho = 0
                               is the projection of x onto {u : A u = y}. The minimum is taken
                               over images of x's kind: REAL u when x is real (the volumes of our
                               data sets and of every solver), complex u when x is complex.

Real images matter for MRI: A maps real volumes to complex k-space, and the complex minimiser's
real part is not the real minimiser unless the mask is point-symmetric (a random 3D mask leaves
most samples without their mirror sample), so it would miss the measured k-space. The real-image
step is the prox of the real-linear map A: R^n -> C^m, whose adjoint is Re(A^H).

Exact closed forms (`exact_data_consistency = True`):
  * SingleCoilMRI, A = M F (F unitary, M a 0/1 mask). Complex u: A A^H = M, so u = x + A^H (y -
    A x) / (1 + rho): sampled k-space becomes (rho F x + y) / (1 + rho), the rest is kept. Real u:
    U = F u is conjugate-symmetric, U(-k) = conj(U(k)), so k-space splits into conjugate pairs
    {k, -k} that the objective couples and nothing else does. With a = U(k), Z = F x and the
    mask m, a pair contributes |m_k a - y_k|^2 + |m_-k conj(a) - y_-k|^2 + 2 rho |a - Z_k|^2 (by
    Parseval ||u - x|| = ||U - Z||, and both halves of the pair carry |a - Z_k|^2), minimised by
        U(k) = (m_k y_k + m_-k conj(y_-k) + 2 rho Z_k) / (m_k^2 + m_-k^2 + 2 rho),
    which is conjugate-symmetric again. Self-paired frequencies (k = -k: DC and, along even sides,
    the Nyquist index 0) must stay real; the same formula gives (m Re(y) + rho Z) / (m^2 + rho),
    their real minimiser. A pair with no sample at rho = 0 keeps Z (the limit rho -> 0).
    On the centred grid the mirror of index i is (2 (n // 2) - i) mod n per axis (`mirror_kspace`).
  * Downsample, A = block mean over n voxels, A A^H = I / n: u = x + A^H (y - A x) / (rho + 1/n).
  * Identity: u = (y + rho x) / (1 + rho).
(For the real operators the real and the complex minimisers coincide when x and y are real.)
MultiCoilMRI has none (A^H A = S^H F^H M F S is diagonal in no basis we can apply cheaply): its
step runs `cg_iters` conjugate-gradient iterations from u = x on the normal equations, (A^H A +
rho I) u = A^H y + rho x for complex u, (Re(A^H A) + rho I) u = Re(A^H y) + rho x for real u.

MRI conventions (3D Cartesian acquisition):
  * k-space is the orthonormal 3D DFT (norm="ortho"), centred: fft3c = fftshift . fftn . ifftshift
    on the last three axes, so DC sits at index (D//2, H//2, W//2) and ||F x|| = ||x||.
  * Undersampling is over the two phase-encode axes, the last two (H, W); the readout axis D is
    always fully sampled (it costs no scan time). Masks are (H, W) arrays of 0/1 broadcast over D;
    a full (D, H, W) mask also works but breaks that convention.
  * Measurements are full-grid arrays with zeros where nothing was sampled (static shapes):
    (..., D, H, W) single-coil, (..., C, D, H, W) multi-coil.
  * Coil sensitivities are (C, D, H, W) complex maps normalised to sum_c |S_c|^2 = 1 at every voxel
    (SENSE, Pruessmann et al., MRM 1999, with normalised sensitivities), so the fully sampled
    multi-coil A^H A is the identity and A^H is a left inverse of A.
  * Measurements are simulated from magnitude images (the real, non-negative volumes of our data
    sets): the ground truth has no phase; coil maps and noise make the data complex.

Masks (both over the (H, W) phase-encode grid, with a fully sampled centre block of
round(center_fraction * H) x round(center_fraction * W) points around DC, as in fastMRI,
Zbontar et al. 2018, with the centre fraction applied per axis):
  * `equispaced_mask`: a separable lattice with the same spacing s ~ sqrt(R) along both axes,
    anchored at DC; s may be fractional (positions rounded) and is tuned so that lattice + centre
    hold the sample count closest to H W / R. Close to, not exactly, 1/R: see
    `effective_acceleration`.
  * `random_mask`: variable-density random sampling (Lustig, Donoho and Pauly, "Sparse MRI", MRM
    2007): exactly round(H W / R) points, the centre plus points drawn without replacement with
    weights (1 - r)^density_power in the normalised k-space radius r (0 at DC, 1 at the corners);
    density_power = 0 is uniform.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

_AXES = (-3, -2, -1)


def fft3c(x):
  """Centred orthonormal 3D DFT of the last three axes (DC in the middle)."""
  x = jnp.fft.ifftshift(x, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.fftn(x, axes=_AXES, norm="ortho"), axes=_AXES)


def ifft3c(k):
  """Inverse of `fft3c` (and its adjoint: the transform is unitary)."""
  k = jnp.fft.ifftshift(k, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.ifftn(k, axes=_AXES, norm="ortho"), axes=_AXES)


def _vdot(a, b):
  """Real part of the complex inner product over all elements (batch axes included)."""
  return jnp.real(jnp.vdot(a, b))


def conjugate_gradient(apply_a: Callable, b, x0, n_iter: int):
  """`n_iter` CG iterations on A x = b for a Hermitian positive (semi-)definite A, from x0.

  One `lax.fori_loop`. Batch axes are treated as one block-diagonal system (shared step sizes),
  which is still Hermitian positive definite, so the iteration stays valid. Steps stop (alpha =
  beta = 0) once the residual is at rounding level (||r|| <= eps max(||b||, ||r_0||)): on a
  consistent singular system (a rho = 0 projection) further steps would divide rounding noise by
  rounding noise.
  """
  dtype = jnp.result_type(x0.dtype, b.dtype)
  x0, b = x0.astype(dtype), b.astype(dtype)
  r = b - apply_a(x0)
  rs = _vdot(r, r)
  tol = jnp.finfo(dtype).eps ** 2 * jnp.maximum(_vdot(b, b), rs)

  def body(_, carry):
    x, r, p, rs = carry
    ap = apply_a(p)
    pap = _vdot(p, ap)
    ok = (pap > 0) & (rs > tol)
    alpha = jnp.where(ok, rs / jnp.where(ok, pap, 1.0), 0.0)
    x = x + alpha * p
    r = r - alpha * ap
    rs_new = _vdot(r, r)
    beta = jnp.where(ok, rs_new / jnp.where(ok, rs, 1.0), 0.0)
    return x, r, r + beta * p, rs_new

  return jax.lax.fori_loop(0, n_iter, body, (x0, r, r, rs))[0]


def mirror_kspace(k):
  """k-space at -k for every k of the centred grid (last three axes): k_mirror[i] = k[-i].

  Index i holds frequency i - n // 2, so -k sits at (2 (n // 2) - i) mod n: a plain flip for odd
  n, a flip then a roll by one for even n (index 0, the Nyquist frequency -n/2, is its own
  mirror, as is DC). For a real image x, mirror_kspace(fft3c(x)) = conj(fft3c(x)).
  """
  for axis in _AXES:
    k = jnp.roll(jnp.flip(k, axis), 1 - k.shape[axis] % 2, axis)
  return k


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SingleCoilMRI:
  """A = M F: centred orthonormal 3D FFT, then a 0/1 k-space mask (broadcast over readout D).

  Attributes:
    mask: (H, W) 0/1 phase-encode mask (or anything broadcastable to (D, H, W)).
  """

  mask: jax.Array
  exact_data_consistency: ClassVar[bool] = True

  def forward(self, x):
    return self.mask * fft3c(x)

  def adjoint(self, y):
    return ifft3c(self.mask * y)

  def normal(self, x):
    return self.adjoint(self.forward(x))

  def data_consistency(self, x, y, rho=0.0):
    """Exact prox over images of x's kind (module docstring).

    Complex x: sampled k-space -> (rho F x + y) / (1 + rho), the rest kept; rho = 0 replaces.
    Real x: the conjugate-pair closed form, U(k) = (m_k y_k + m_-k conj(y_-k) + 2 rho Z_k) /
    (m_k^2 + m_-k^2 + 2 rho) with Z = F x, so the result is real and, at rho = 0 with data of a
    real image, A u = y exactly for any mask.
    """
    if jnp.iscomplexobj(x):
      return x + self.adjoint(y - self.forward(x)) / (1.0 + rho)
    z = fft3c(x)
    m = jnp.broadcast_to(self.mask, x.shape[-3:]).astype(x.dtype)
    my = m * y
    num = my + jnp.conj(mirror_kspace(my)) + 2.0 * rho * z
    den = m * m + mirror_kspace(m) ** 2 + 2.0 * rho
    u = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), z)
    return jnp.real(ifft3c(u)).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultiCoilMRI:
  """A x = M F (S_c x) for every coil c, the SENSE model with normalised sensitivities.

  Attributes:
    mask: (H, W) 0/1 phase-encode mask (or broadcastable to (D, H, W)).
    maps: (C, D, H, W) complex coil sensitivities with sum_c |S_c|^2 = 1 (`synthetic_coil_maps`).
    cg_iters: conjugate-gradient iterations of `data_consistency` (static).
  """

  mask: jax.Array
  maps: jax.Array
  cg_iters: int = dataclasses.field(default=10, metadata=dict(static=True))
  exact_data_consistency: ClassVar[bool] = False

  def forward(self, x):
    return self.mask * fft3c(jnp.expand_dims(x, -4) * self.maps)

  def adjoint(self, y):
    return jnp.sum(jnp.conj(self.maps) * ifft3c(self.mask * y), axis=-4)

  def normal(self, x):
    return self.adjoint(self.forward(x))

  def data_consistency(self, x, y, rho=0.0, n_iter: int | None = None):
    """Approximate prox over images of x's kind: CG from u = x.

    Complex x: (A^H A + rho I) u = A^H y + rho x. Real x: the real-image normal equations
    (Re(A^H A) + rho I) u = Re(A^H y) + rho x (Re(A^H) is the adjoint of A on real images), so u
    stays real and fits the measured k-space with any mask. No closed form exists for several
    coils. A^H A has eigenvalues in [0, 1], so the system's condition number is at most (1 + rho)
    / rho and a handful of iterations suffice for the rho of a diffusion sampler's late steps;
    with rho = 0 CG converges to a least-squares solution (more iterations: see `cg_iters`).
    """
    n_iter = self.cg_iters if n_iter is None else n_iter
    if jnp.iscomplexobj(x):
      return conjugate_gradient(lambda u: self.normal(u) + rho * u, self.adjoint(y) + rho * x, x,
                                n_iter)
    return conjugate_gradient(lambda u: jnp.real(self.normal(u)) + rho * u,
                              jnp.real(self.adjoint(y)) + rho * x, x, n_iter)


def _as_factor(factor) -> tuple[int, int, int]:
  f = (int(factor),) * 3 if np.ndim(factor) == 0 else tuple(int(v) for v in factor)
  if len(f) != 3 or any(v < 1 for v in f):
    raise ValueError(f"downsampling factor must be a positive int or 3 positive ints: {factor!r}")
  return f


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Downsample:
  """Super-resolution: A = block mean (average pooling) by an integer factor per axis.

  The adjoint is nearest-neighbour upsampling divided by the block size n = f0 f1 f2 (the true
  adjoint of the mean), so A A^H = I / n, ||A|| = 1 / sqrt(n), and the prox is closed-form.
  Spatial sizes must be multiples of the factor.

  Attributes:
    factor: (f0, f1, f2) along (D, H, W); an int means isotropic (static).
  """

  factor: tuple[int, int, int] = dataclasses.field(default=(2, 2, 2), metadata=dict(static=True))
  exact_data_consistency: ClassVar[bool] = True

  def __post_init__(self):
    object.__setattr__(self, "factor", _as_factor(self.factor))

  @property
  def block_size(self) -> int:
    return math.prod(self.factor)

  def forward(self, x):
    lead, spatial = x.shape[:-3], x.shape[-3:]
    if any(s % f for s, f in zip(spatial, self.factor)):
      raise ValueError(f"spatial shape {spatial} is not a multiple of the factor {self.factor}")
    split = [v for s, f in zip(spatial, self.factor) for v in (s // f, f)]
    return x.reshape(*lead, *split).mean(axis=(-5, -3, -1))

  def adjoint(self, y):
    lead, (d, h, w) = y.shape[:-3], y.shape[-3:]
    f0, f1, f2 = self.factor
    up = jnp.broadcast_to(y[..., :, None, :, None, :, None], (*lead, d, f0, h, f1, w, f2))
    return up.reshape(*lead, d * f0, h * f1, w * f2) / self.block_size

  def normal(self, x):
    return self.adjoint(self.forward(x))

  def data_consistency(self, x, y, rho=0.0):
    """Exact prox: u = x + A^H (y - A x) / (rho + 1/n); rho = 0 makes every block mean equal y."""
    return x + self.adjoint(y - self.forward(x)) / (rho + 1.0 / self.block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Identity:
  """Denoising: A = I, prox u = (y + rho x) / (1 + rho)."""

  exact_data_consistency: ClassVar[bool] = True

  def forward(self, x):
    return x

  def adjoint(self, y):
    return y

  def normal(self, x):
    return x

  def data_consistency(self, x, y, rho=0.0):
    return (y + rho * x) / (1.0 + rho)


Operator = SingleCoilMRI | MultiCoilMRI | Downsample | Identity


def simulate_measurement(op: Operator, x, noise_std, key):
  """y = A x + n, with x a magnitude image (real, non-negative; no phase is simulated).

  Complex measurements (MRI k-space) get circularly symmetric complex Gaussian noise with
  E|n|^2 = noise_std^2 (noise_std / sqrt(2) per real and imaginary part), only at sampled
  locations; with the orthonormal FFT a fully sampled single-coil zero-filled image then carries
  complex noise of the same per-voxel power. Real measurements (super-resolution, denoising) get
  real Gaussian noise of standard deviation noise_std.
  """
  y = op.forward(x)
  if jnp.iscomplexobj(y):
    kr, ki = jax.random.split(key)
    rdt = y.real.dtype
    noise = (jax.random.normal(kr, y.shape, rdt) + 1j * jax.random.normal(ki, y.shape, rdt))
    noise = noise * (noise_std / math.sqrt(2.0))
  else:
    noise = jax.random.normal(key, y.shape, y.dtype) * noise_std
  mask = getattr(op, "mask", None)
  if mask is not None:
    noise = noise * mask
  return y + noise.astype(y.dtype)


# ------------------------------------------------------------------------------------------------
# Masks and coil maps (built once, outside the compiled solvers).


def _phase_encode_shape(shape: Sequence[int]) -> tuple[int, int]:
  if len(shape) < 2:
    raise ValueError(f"need at least the two phase-encode sizes (H, W), got shape {tuple(shape)}")
  return int(shape[-2]), int(shape[-1])


def _centre_range(n: int, center_fraction: float) -> tuple[int, int]:
  nc = min(n, max(1, int(round(n * center_fraction))))
  start = n // 2 - nc // 2
  return start, start + nc


def centre_mask(shape: Sequence[int], center_fraction: float) -> np.ndarray:
  """Boolean (H, W) block of round(cf H) x round(cf W) points (at least one) around DC."""
  h, w = _phase_encode_shape(shape)
  (h0, h1), (w0, w1) = _centre_range(h, center_fraction), _centre_range(w, center_fraction)
  m = np.zeros((h, w), bool)
  m[h0:h1, w0:w1] = True
  return m


def _budget(h: int, w: int, acceleration: float, n_centre: int) -> int:
  if acceleration < 1:
    raise ValueError(f"acceleration must be >= 1, got {acceleration}")
  target = int(round(h * w / acceleration))
  if target < n_centre:
    raise ValueError(f"the fully sampled centre ({n_centre} points) exceeds the budget of "
                     f"{target} points for R={acceleration}; lower center_fraction")
  return target


def _lattice(n: int, spacing: float) -> np.ndarray:
  """Indices n//2 + round(k * spacing) inside [0, n), for all integers k (anchored at DC).

  Rounds half up (not to even), so spacings >= 1 never map two k to one index.
  """
  k = np.arange(-int(n / spacing) - 2, int(n / spacing) + 3)
  pos = n // 2 + np.floor(k * spacing + 0.5).astype(int)
  return pos[(pos >= 0) & (pos < n)]


def equispaced_mask(shape: Sequence[int], acceleration: float, center_fraction: float = 0.08):
  """Deterministic 2D lattice of phase-encode lines plus a fully sampled centre.

  Args:
    shape: (..., H, W); only the two phase-encode sizes are used.
    acceleration: target R; the sampled fraction is the closest to 1/R this lattice family reaches
      (within about 5% on grids of 32^2 or more; `effective_acceleration` gives it).
    center_fraction: side of the fully sampled centre block as a fraction of each axis.

  Returns:
    (H, W) float32 0/1 mask.
  """
  h, w = _phase_encode_shape(shape)
  centre = centre_mask((h, w), center_fraction)
  target = _budget(h, w, acceleration, int(centre.sum()))
  (h0, h1), (w0, w1) = _centre_range(h, center_fraction), _centre_range(w, center_fraction)
  best = None
  # Same spacing s on both axes; the count n_c + |Lh||Lw| - |Lh in centre||Lw in centre| is cheap.
  for s in np.arange(1.0, 2.0 * math.sqrt(acceleration) + 1.0, 0.005):
    lh, lw = _lattice(h, s), _lattice(w, s)
    inside = np.sum((lh >= h0) & (lh < h1)) * np.sum((lw >= w0) & (lw < w1))
    err = abs(int(centre.sum()) + lh.size * lw.size - int(inside) - target)
    if best is None or err < best[0]:
      best = (err, lh, lw)
  _, lh, lw = best
  m = centre.copy()
  m[np.ix_(lh, lw)] = True
  return jnp.asarray(m, jnp.float32)


def random_mask(shape: Sequence[int], acceleration: float, center_fraction: float = 0.08,
                key=0, density_power: float = 2.0):
  """Variable-density random phase-encode mask with a fully sampled centre.

  Exactly round(H W / R) points: the centre block plus points drawn without replacement with
  weights (1 - r)^density_power, r the k-space radius normalised to 1 at the grid corners (floored
  at 1e-3 so every point can be drawn); density_power = 0 gives uniform random sampling.

  Args:
    shape: (..., H, W); only the two phase-encode sizes are used.
    acceleration: R.
    center_fraction: side of the fully sampled centre block as a fraction of each axis.
    key: a `jax.random` key or an int seed; the same key gives the same mask.
    density_power: exponent of the variable-density weights.

  Returns:
    (H, W) float32 0/1 mask.
  """
  h, w = _phase_encode_shape(shape)
  centre = centre_mask((h, w), center_fraction)
  n_draw = _budget(h, w, acceleration, int(centre.sum())) - int(centre.sum())
  ky = (np.arange(h) - h // 2) / max(h / 2, 1)
  kz = (np.arange(w) - w // 2) / max(w / 2, 1)
  r = np.sqrt(ky[:, None] ** 2 + kz[None, :] ** 2) / math.sqrt(2.0)
  weight = np.clip(1.0 - r, 1e-3, None) ** density_power
  weight[centre] = 0.0
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(key)
  idx = jax.random.choice(key, h * w, shape=(n_draw,), replace=False,
                          p=jnp.asarray(weight.ravel() / weight.sum()))
  m = jnp.asarray(centre.ravel(), jnp.float32).at[idx].set(1.0)
  return m.reshape(h, w)


def effective_acceleration(mask) -> float:
  """Actual R = (number of phase-encode points) / (number sampled)."""
  mask = np.asarray(mask)
  return float(mask.size / mask.sum())


def synthetic_coil_maps(shape: Sequence[int], n_coils: int, radius: float = 1.5,
                        width: float = 1.0, phase_slope: float = 0.5 * math.pi,
                        dtype=jnp.complex64):
  """Smooth complex coil sensitivities normalised to sum_c |S_c|^2 = 1 at every voxel.

  Coordinates are normalised to (-1, 1) per axis. Coil c sits on a ring of `radius` in the (H, W)
  phase-encode plane through the volume centre, at angle theta_c = 2 pi c / C, so the coils differ
  along the undersampled axes. Its raw sensitivity is a Gaussian profile of `width` in the distance
  to the coil times a linear phase theta_c + phase_slope * (position . coil direction). Dividing by
  sqrt(sum_c |S_c|^2) makes the fully sampled multi-coil A^H A the identity.

  Args:
    shape: (..., D, H, W); the last three sizes are used.
    n_coils: C.
    radius, width, phase_slope: geometry of the ring, profile width, linear phase (rad per unit).
    dtype: complex dtype of the result.

  Returns:
    (C, D, H, W) complex maps.
  """
  d, h, w = (int(s) for s in shape[-3:])
  z, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in (d, h, w)],
                          indexing="ij")
  maps = []
  for c in range(n_coils):
    theta = 2.0 * math.pi * c / n_coils
    cy, cx = math.cos(theta), math.sin(theta)
    dist2 = z ** 2 + (yy - radius * cy) ** 2 + (xx - radius * cx) ** 2
    phase = theta + phase_slope * (yy * cy + xx * cx)
    maps.append(np.exp(-dist2 / (2.0 * width ** 2)) * np.exp(1j * phase))
  maps = np.stack(maps)
  maps /= np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
  return jnp.asarray(maps, dtype)
