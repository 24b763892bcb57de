"""Gaussian (DDPM) diffusion: schedule, parameterisations, losses and a compiled DDIM sampler.

DDPM: Ho et al., "Denoising Diffusion Probabilistic Models" (2020), linear beta schedule.
DDIM: Song et al., "Denoising Diffusion Implicit Models" (2021).
Used by the full-resolution conditional 3D baseline and the wavelet (WDM) baseline.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The network output is read as eps, x0 or
v = sqrt(abar) eps - sqrt(1 - abar) x0 depending on `parameterization`.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def _bcast(v, x):
  """Broadcasts a per-example (B,) vector against a (B, ...) array."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class GaussianDiffusion:
  """Discrete-time DDPM with T steps indexed 0..T-1 (t = 0 is the least noisy)."""

  num_steps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02
  parameterization: str = "eps"  # eps | x0 | v

  def __post_init__(self):
    if self.parameterization not in ("eps", "x0", "v"):
      raise ValueError(f"unknown parameterization {self.parameterization!r}: use eps, x0 or v")

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - linear_betas(self.num_steps, self.beta_start, self.beta_end))

  def abar(self, t):
    return jnp.asarray(self.alphas_cumprod, jnp.float32)[t]

  def q_sample(self, x0, t, eps):
    a = _bcast(self.abar(t), x0)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps

  def split_output(self, out, x_t, t):
    """Network output -> (x0_hat, eps_hat) whatever the parameterisation."""
    a = _bcast(self.abar(t), x_t)
    sa, s1 = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if self.parameterization == "eps":
      return (x_t - s1 * out) / sa, out
    if self.parameterization == "x0":
      return out, (x_t - sa * out) / s1
    # v = sa * eps - s1 * x0  =>  x0 = sa * x_t - s1 * v, eps = s1 * x_t + sa * v
    return sa * x_t - s1 * out, s1 * x_t + sa * out

  def target(self, x0, eps, t):
    """The regression target of the network for this parameterisation."""
    if self.parameterization == "eps":
      return eps
    if self.parameterization == "x0":
      return x0
    a = _bcast(self.abar(t), x0)
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0

  def ddim_timesteps(self, num_sample_steps: int) -> np.ndarray:
    """Descending pairs (t, t_prev) of a K-step skipped schedule; t_prev = -1 means 'clean'."""
    if not 1 <= num_sample_steps <= self.num_steps:
      raise ValueError(f"num_sample_steps must be in [1, {self.num_steps}], got {num_sample_steps}")
    ts = np.round(np.linspace(self.num_steps - 1, 0, num_sample_steps)).astype(np.int32)
    prev = np.append(ts[1:], -1).astype(np.int32)
    return np.stack([ts, prev], axis=1)

  def ddim_sample(self, denoise_fn: Callable, x_T, num_sample_steps: int, rng=None, eta: float = 0.0,
                  clip_x0: float | None = None):
    """DDIM from x_T over a K-step schedule as one `lax.scan`; eta = 1 gives DDPM-like noise.

    denoise_fn(x_t, t) returns the raw network output for an int32 (B,) timestep vector.
    """
    pairs = jnp.asarray(self.ddim_timesteps(num_sample_steps))
    abar_ext = jnp.concatenate([jnp.asarray(self.alphas_cumprod, jnp.float32), jnp.ones((1,))])
    batch = x_T.shape[0]
    if rng is None:
      rng = jax.random.PRNGKey(0)

    def step(x, inputs):
      i, (t, t_prev) = inputs
      tv = jnp.full((batch,), t, jnp.int32)
      x0, eps = self.split_output(denoise_fn(x, tv), x, tv)
      if clip_x0 is not None:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
        a_t = abar_ext[t]
        eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1.0 - a_t)
      a_t, a_p = abar_ext[t], abar_ext[t_prev]  # index -1 is the appended 1.0
      sigma = eta * jnp.sqrt((1.0 - a_p) / (1.0 - a_t)) * jnp.sqrt(jnp.maximum(1.0 - a_t / a_p, 0.0))
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      x_prev = (jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_p - sigma**2, 0.0)) * eps
                + sigma * noise)
      return x_prev, None

    x, _ = jax.lax.scan(step, x_T, (jnp.arange(pairs.shape[0]), (pairs[:, 0], pairs[:, 1])))
    return x
