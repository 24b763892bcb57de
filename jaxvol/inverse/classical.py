"""Classical reference reconstructions for the inverse problems of `jaxvol.inverse.operators`.

The baselines a diffusion prior has to beat (DESIGN 2.4): the zero-filled / adjoint image and
total-variation regularised least squares

  min_x 1/2 ||A x - y||^2 + lam TV(x),   TV(x) = sum_voxels sqrt(|d_D x|^2 + |d_H x|^2 + |d_W x|^2)

(isotropic 3D TV, Rudin, Osher and Fatemi 1992), solved by the primal-dual hybrid gradient method
of Chambolle and Pock ("A first-order primal-dual algorithm for convex problems with applications
to imaging", JMIV 2011) with K = [A; grad] and both terms dualised, so only forward/adjoint are
needed and every operator works (MRI single/multi-coil, super-resolution, denoising). Step sizes
tau = sigma = 0.99 / sqrt(||A||^2 + 12): 12 bounds ||grad||^2 for forward differences in 3D and
||A|| comes from `operator_norm` (power iteration). By default the image is REAL (real=True, the
magnitude volumes of our data sets): the primal variable stays real and the data term's adjoint is
Re(A^H), the adjoint of A on real images, so the minimiser is over real images and fits the
measured k-space with any mask (the real part of a complex minimiser does not, unless the mask is
point-symmetric; see `jaxvol.inverse.operators`). With real=False, TV acts on complex images:
|d x| is the complex modulus, so the penalty does not depend on a global phase.

Everything is pure JAX; each solver is one compiled `lax.fori_loop` / `lax.scan`.
"""

import functools

import jax
import jax.numpy as jnp

from jaxvol.inverse.operators import Downsample, Operator

# ||grad||^2 <= 4 per axis for forward differences: 12 in 3D.
GRAD_NORM_SQ = 12.0


@functools.partial(jax.jit, static_argnames=("shape", "n_iter", "dtype"))
def operator_norm(op: Operator, shape: tuple[int, ...], n_iter: int = 50, dtype=jnp.complex64,
                  key=None):
  """Largest singular value ||A|| by power iteration on A^H A from a random start.

  Args:
    op: any operator of `jaxvol.inverse.operators`.
    shape: image shape the operator acts on, e.g. (D, H, W) (static).
    n_iter: power iterations (static); converges at once for projections (mask operators,
      block means) and from below for multi-coil operators.
    dtype: dtype of the probe vector (static); complex works for every operator.
    key: `jax.random` key of the start; a fixed key when None.

  Returns:
    Scalar estimate of ||A||.
  """
  key = jax.random.key(0) if key is None else key
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    kr, ki = jax.random.split(key)
    rdt = jnp.finfo(dtype).dtype
    v = jax.random.normal(kr, shape, rdt) + 1j * jax.random.normal(ki, shape, rdt)
  else:
    v = jax.random.normal(key, shape, dtype)
  v = v.astype(dtype)

  def unit(u):
    return u / jnp.maximum(jnp.linalg.norm(u.ravel()), 1e-30)

  v = jax.lax.fori_loop(0, n_iter, lambda _, u: unit(op.normal(u).astype(dtype)), unit(v))
  return jnp.sqrt(jnp.linalg.norm(op.normal(v).ravel()))


@functools.partial(jax.jit, static_argnames=("magnitude", "upsampling"))
def zero_filled(op: Operator, y, magnitude: bool = False, upsampling: str = "nearest"):
  """The adjoint reconstruction A^H y, scaled to an upsampling for super-resolution.

  Args:
    op: operator.
    y: measurement.
    magnitude: return |x| (for MRI, whose A^H y is complex).
    upsampling: for `Downsample` only: "nearest" returns n A^H y (each low-resolution voxel
      repeated over its block, the pseudo-inverse A^+ y since A A^H = I / n) or "trilinear"
      (`jax.image.resize`, half-voxel-aligned with the block centres, edges clamped).

  Returns:
    For MRI the coil-combined F^H M y (sum_c conj(S_c) F^H M y_c for several coils), for
    super-resolution the upsampled volume, for denoising y itself.
  """
  if isinstance(op, Downsample):
    if upsampling == "nearest":
      x = op.adjoint(y) * op.block_size
    elif upsampling == "trilinear":
      shape = y.shape[:-3] + tuple(s * f for s, f in zip(y.shape[-3:], op.factor))
      resize = functools.partial(jax.image.resize, shape=shape, method="linear")
      x = resize(y) if not jnp.iscomplexobj(y) else resize(y.real) + 1j * resize(y.imag)
    else:
      raise ValueError(f"upsampling must be 'nearest' or 'trilinear', got {upsampling!r}")
  else:
    x = op.adjoint(y)
  return jnp.abs(x) if magnitude else x


def gradient(x):
  """Forward differences along the last three axes, zero at the far edge: (3, ..., D, H, W)."""
  def diff(axis):
    d = jnp.diff(x, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, 1)
    return jnp.pad(d, pad)

  return jnp.stack([diff(x.ndim - 3), diff(x.ndim - 2), diff(x.ndim - 1)])


def divergence(g):
  """The negative adjoint of `gradient`: <gradient(x), g> = -<x, divergence(g)>."""
  out = 0.0
  for i in range(3):
    q = g[i]
    axis = q.ndim - 3 + i
    n = q.shape[axis]
    q = jax.lax.slice_in_dim(q, 0, n - 1, axis=axis)  # the last difference is identically zero
    pad_after, pad_before = [(0, 0)] * q.ndim, [(0, 0)] * q.ndim
    pad_after[axis], pad_before[axis] = (0, 1), (1, 0)
    out = out + jnp.pad(q, pad_after) - jnp.pad(q, pad_before)
  return out


def _pointwise_norm(g):
  return jnp.sqrt(jnp.sum(jnp.real(g * jnp.conj(g)), axis=0))


def total_variation(x):
  """Isotropic TV: sum over voxels of the modulus of the (complex) gradient vector."""
  return jnp.sum(_pointwise_norm(gradient(x)))


def tv_objective(op: Operator, x, y, lam):
  """1/2 ||A x - y||^2 + lam TV(x)."""
  r = op.forward(x) - y
  return 0.5 * jnp.sum(jnp.real(r * jnp.conj(r))) + lam * total_variation(x)


@functools.partial(jax.jit, static_argnames=("n_iter", "return_objective", "real"))
def tv_reconstruction(op: Operator, y, lam, n_iter: int = 200, x0=None, tau=None, sigma=None,
                      op_norm=None, return_objective: bool = False, real: bool = True):
  """TV-regularised least squares by Chambolle-Pock, one compiled `lax.scan`.

  Iteration (dual p for the data term, q for the gradient, both of the extrapolated x_bar):
    p <- (p + sigma (A x_bar - y)) / (1 + sigma)
    q <- project_{|q_voxel| <= lam}(q + sigma grad x_bar)
    x <- x - tau (A^H p - div q);  x_bar <- 2 x - x_prev   (Re(A^H p) for real images)
  Convergence needs tau sigma (||A||^2 + 12) < 1.

  Args:
    op: any operator.
    y: measurement.
    lam: TV weight (lam = 0 gives plain least squares).
    n_iter: iterations (static).
    x0: start; the zero-filled reconstruction when None.
    tau, sigma: primal and dual steps; 0.99 / sqrt(||A||^2 + 12) each when None.
    op_norm: ||A||; estimated with `operator_norm` when None.
    return_objective: also return the objective after every iteration (static; costs one more
      forward per iteration).
    real: minimise over real images (static; the start's imaginary part is dropped); False
      minimises over images of the start's dtype (complex for MRI).

  Returns:
    x, or (x, objectives of shape (n_iter,)) with return_objective.
  """
  x = zero_filled(op, y) if x0 is None else x0
  dtype = jnp.result_type(x.dtype, y.dtype)
  x, y = x.astype(dtype), y.astype(dtype)
  if real:
    x = jnp.real(x)
  if op_norm is None:  # the complex norm bounds the norm on real images
    op_norm = operator_norm(op, x.shape, dtype=jnp.result_type(dtype, jnp.complex64))
  step = 0.99 / jnp.sqrt(op_norm ** 2 + GRAD_NORM_SQ)
  tau = step if tau is None else tau
  sigma = step if sigma is None else sigma
  p = jnp.zeros(jax.eval_shape(op.forward, x).shape, dtype)
  q = jnp.zeros((3, *x.shape), x.dtype)
  adjoint = (lambda v: jnp.real(op.adjoint(v))) if real else op.adjoint

  def body(carry, _):
    x, x_bar, p, q = carry
    p = (p + sigma * (op.forward(x_bar) - y)) / (1.0 + sigma)
    q = q + sigma * gradient(x_bar)
    q = q * jnp.minimum(1.0, lam / jnp.maximum(_pointwise_norm(q), 1e-12))
    x_new = x - tau * (adjoint(p) - divergence(q))
    obj = tv_objective(op, x_new, y, lam) if return_objective else None
    return (x_new, 2.0 * x_new - x, p, q), obj

  (x, _, _, _), objectives = jax.lax.scan(body, (x, x, p, q), None, length=n_iter)
  return (x, objectives) if return_objective else x
