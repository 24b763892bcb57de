"""Brownian-bridge diffusion that starts from the conditional input.

PPDM ("PPDM: Pixel Puzzling Diffusion Model for Speed and Memory Efficient Volumetric Medical Image
Translation", 2026) diffuses directly between the target x0 and the condition y. We use the
Brownian bridge of BBDM (Li et al., "BBDM: Image-to-image Translation with Brownian Bridge
Diffusion Models", CVPR 2023):

  x_t = (1 - m_t) x0 + m_t y + sqrt(delta_t) eps,   m_t = t / T,   delta_t = 2 s (m_t - m_t^2),

so x_0 = x0 and x_T = y exactly. `max_var` s = 0 gives the plain (deterministic) interpolation
bridge behind the same interface.

Sampling walks a skipped schedule of K steps T = t_K > ... > t_0 = 0 from x_T = y, in the
DDIM form: with the network's x0 estimate, mu_t = (1 - m_t) x0_hat + m_t y and
eps_hat = (x_t - mu_t) / sqrt(delta_t),

  x_s = mu_s + sqrt(delta_s - sigma_s^2) eps_hat + sigma_s z,
  sigma_s^2 = eta^2 * 2 s m_s (m_t - m_s) / m_t.

At t = T the bridge has no noise (delta_T = 0, x_T = y), so eps_hat is undefined there and
the first move draws fresh noise, x_s = mu_s + sqrt(delta_s) z, as training saw it. With that,
every eta keeps the bridge's marginals: eta = 1 is exactly the Markov posterior q(x_s | x_t, x0, y)
(its x_t coefficient reduces to m_s / m_t), eta = 0 is deterministic after the first move (the
DDIM analogue). At s = 0 both return x0_hat.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _bcast(v, x):
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v))).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class BrownianBridge:
  num_steps: int = 1000
  max_var: float = 1.0

  def m(self, t):
    return jnp.asarray(t, jnp.float32) / self.num_steps

  def delta(self, t):
    m = self.m(t)
    return 2.0 * self.max_var * (m - m * m)

  def q_sample(self, x0, y, t, eps):
    m = _bcast(self.m(t), x0)
    d = _bcast(self.delta(t), x0)
    return (1.0 - m) * x0 + m * y + jnp.sqrt(d) * eps

  def sample_timesteps(self, num_sample_steps: int) -> np.ndarray:
    """Descending integer times T = t_K > ... > t_0 = 0 (K + 1 entries)."""
    if not 1 <= num_sample_steps <= self.num_steps:
      raise ValueError(f"num_sample_steps must be in [1, {self.num_steps}], got {num_sample_steps}")
    ts = np.round(np.linspace(self.num_steps, 0, num_sample_steps + 1)).astype(np.int32)
    if len(np.unique(ts)) != len(ts):
      raise ValueError("skipped schedule has repeated steps")
    return ts

  def step(self, x_t, x0_hat, y, t, s, noise, eta: float):
    """One sampler move from time t to s < t (scalars) given the x0 estimate."""
    m_t, m_s = self.m(t), self.m(s)
    d_t, d_s = self.delta(t), self.delta(s)
    mu_t = (1.0 - m_t) * x0_hat + m_t * y
    mu_s = (1.0 - m_s) * x0_hat + m_s * y
    var = (eta**2) * 2.0 * self.max_var * m_s * (m_t - m_s) / m_t
    # Where delta_t = 0 (t = T: x_t = mu_t = y) there is no eps to carry over: draw it afresh.
    var = jnp.where(d_t > 0, var, d_s)
    coef = jnp.where(d_t > 0, jnp.sqrt(jnp.maximum(d_s - var, 0.0) / jnp.maximum(d_t, 1e-20)), 0.0)
    return mu_s + coef * (x_t - mu_t) + jnp.sqrt(var) * noise

  def sample(self, denoise_fn: Callable, y, num_sample_steps: int, rng, eta: float = 0.0):
    """Runs the K-step sampler from x_T = y as one `lax.scan`; returns the final x0 estimate.

    denoise_fn(x_t, t) returns the x0 estimate for an int32 (B,) time vector.
    """
    ts = self.sample_timesteps(num_sample_steps)
    batch = y.shape[0]

    def body(x, inputs):
      i, t, s = inputs
      x0_hat = denoise_fn(x, jnp.full((batch,), t, jnp.int32))
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
      return self.step(x, x0_hat, y, t, s, noise, eta).astype(x.dtype), None

    xs = (jnp.arange(num_sample_steps), jnp.asarray(ts[:-1]), jnp.asarray(ts[1:]))
    x, _ = jax.lax.scan(body, y, xs)
    return x
