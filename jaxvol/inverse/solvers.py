"""Plug-and-play diffusion solvers for linear inverse problems y = A x + n; each one compiled loop.

Any prior of jaxvol.inverse.priors ((x_t, t, key) -> x0 estimate, with `.diffusion`) and any
operator of jaxvol.inverse.operators (forward, adjoint, data_consistency) plug into every solver.
Images are real volumes (D, H, W) in the prior's intensity range; measurements follow the operator.

DiffPIR (Zhu et al., "Denoising Diffusion Models for Plug-and-Play Image Restoration", CVPR 2023):
on K skipped DDPM levels t_K > ... > t_1, each step denoises x_t with the prior, solves the data
sub-problem  argmin_x 1/2 ||A x - y||^2 + rho_t / 2 ||x - x0_hat||^2  over REAL images with
rho_t = lam * sigma_n^2 / sigma_t^2  (sigma_t^2 = (1 - abar_t) / abar_t, the noise-to-signal
ratio of x_t / sqrt(abar_t)) through the operator's data-consistency step (closed form where the
operator has one, CG otherwise; the real-image minimiser, not the real part of the complex one,
which misses the measured k-space unless the mask is point-symmetric), and moves to the next level
with the noise estimate implied by the corrected x0, mixed with fresh noise by zeta (0:
deterministic, 1: fully stochastic). The last step returns the corrected x0. sigma_n^2 is the
noise variance per REAL component of y: noise_std^2 for real measurements, noise_std^2 / 2 for
complex ones (circular complex noise with E|n|^2 = noise_std^2, as `simulate_measurement` draws
it), because the likelihood of a complex y is exp(-||y - A x||^2 / noise_std^2) =
exp(-||y - A x||^2 / (2 sigma_n^2)). lam = 1 makes rho_t the ratio of the two noise variances (on
Gaussian data the Monte-Carlo mean of the samples then matches the posterior mean, see tests).

DPS (Chung et al., "Diffusion Posterior Sampling for General Noisy Inverse Problems", ICLR 2023):
ancestral DDPM moves (eta = 1 DDIM between the K levels) followed by a likelihood step
x_{t-1} -= zeta_t * grad_{x_t} ||y - A x0_hat(x_t)||^2, the gradient taken through the prior
(memory: one backward pass of the network per step). step="paper" (default) uses the paper's
zeta_t = zeta / ||y - A x0_hat(x_t)|| (Algorithm 1 and its appendix on step sizes);
step="official" uses the authors' released code, which descends grad ||y - A x0_hat|| (the norm,
not its square) scaled by zeta: zeta_t = zeta / (2 ||y - A x0_hat||), half the paper's step for
the same zeta. The last move goes to the clean level (abar = 1, x = x0_hat) and takes its
likelihood step too, so the returned image is x_0 of Algorithm 1, not the last x0_hat.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _levels(num_levels: int, num_sample_steps: int) -> np.ndarray:
  if not 1 <= num_sample_steps <= num_levels:
    raise ValueError(f"num_steps must be in [1, {num_levels}], got {num_sample_steps}")
  return np.round(np.linspace(num_levels - 1, 0, num_sample_steps)).astype(np.int32)


def _abar(prior):
  return jnp.asarray(prior.diffusion.alphas_cumprod, jnp.float32)


def diffpir(prior, op, y, shape, key, num_steps: int = 20, noise_std: float = 0.0,
            lam: float = 1.0, zeta: float = 1.0, min_rho: float = 0.0):
  """DiffPIR from pure noise; returns the (D, H, W) reconstruction.

  Args:
    prior: (x_t, t, key) -> x0 estimate, with `.diffusion`.
    op: the forward operator.
    y: the measurement.
    shape: the image shape (D, H, W).
    key: PRNG key (noise, prior shifts).
    num_steps: K prior evaluations.
    noise_std: measurement noise std (0: data enforced exactly where the operator allows); for
      complex y, E|n|^2 = noise_std^2 (sigma_n^2 = noise_std^2 / 2 per real component).
    lam: regularisation weight lambda.
    zeta: noise mixing in [0, 1].
    min_rho: lower bound on rho_t (keeps CG-based data steps well conditioned).
  """
  ts = _levels(prior.diffusion.num_steps, num_steps)
  nxt = np.append(ts[1:], ts[-1]).astype(np.int32)
  abar = _abar(prior)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, tuple(shape), jnp.float32)
  # Per real component: complex k-space noise splits E|n|^2 = noise_std^2 over two components.
  noise_var = noise_std**2 / (2.0 if jnp.iscomplexobj(y) else 1.0)

  def step(x, inp):
    i, t, t_next = inp
    k_prior, k_noise = jax.random.split(jax.random.fold_in(k_loop, i))
    a, a_next = abar[t], abar[t_next]
    x0 = prior(x, t, k_prior)
    rho = jnp.maximum(lam * noise_var * a / (1.0 - a), min_rho)
    x0 = op.data_consistency(x0.astype(jnp.float32), y, rho).astype(jnp.float32)
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    x_next = jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * (
        jnp.sqrt(1.0 - zeta) * eps + jnp.sqrt(zeta) * noise)
    return x_next, x0

  _, x0s = jax.lax.scan(step, x_T, (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(nxt)))
  return x0s[-1]


def dps(prior, op, y, shape, key, num_steps: int = 100, zeta: float = 1.0, step: str = "paper"):
  """DPS from pure noise; returns the (D, H, W) reconstruction x_0 (after the last likelihood step).

  Args:
    prior: (x_t, t, key) -> x0 estimate, with `.diffusion`.
    op: the forward operator.
    y: the measurement.
    shape: the image shape (D, H, W).
    key: PRNG key (noise, prior shifts).
    num_steps: K prior evaluations (K likelihood steps).
    zeta: step-size constant zeta' of the likelihood step.
    step: "paper": x -= zeta grad ||r||^2 / ||r|| (Chung et al. 2023, zeta_i = zeta' / ||r||);
      "official": x -= zeta grad ||r|| (the authors' code; half the paper's step), r = y - A x0_hat.
  """
  if step not in ("paper", "official"):
    raise ValueError(f"DPS step must be 'paper' or 'official', got {step!r}")
  scale = zeta if step == "paper" else 0.5 * zeta
  ts = _levels(prior.diffusion.num_steps, num_steps)
  abar = _abar(prior)
  # The level after the last one is the clean image (abar = 1): the final move lands on x0_hat.
  abar_next = jnp.append(abar[ts[1:]], 1.0)
  k_init, k_loop = jax.random.split(key)
  x_T = jax.random.normal(k_init, tuple(shape), jnp.float32)

  def residual(x, t, k):
    x0 = prior(x, t, k)
    r = y - op.forward(x0)
    return jnp.sum(jnp.real(r * jnp.conj(r))), x0

  def step_fn(x, inp):
    i, t, a_next = inp
    k_prior, k_noise = jax.random.split(jax.random.fold_in(k_loop, i))
    (loss, x0), g = jax.value_and_grad(residual, has_aux=True)(x, t, k_prior)
    a = abar[t]
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
    sigma = jnp.sqrt((1.0 - a_next) / (1.0 - a)) * jnp.sqrt(jnp.maximum(1.0 - a / a_next, 0.0))
    noise = jax.random.normal(k_noise, x.shape, x.dtype)
    x_next = (jnp.sqrt(a_next) * x0 + jnp.sqrt(jnp.maximum(1.0 - a_next - sigma**2, 0.0)) * eps
              + sigma * noise)
    x_next = x_next - scale * g / jnp.sqrt(jnp.maximum(loss, 1e-12))
    return x_next, None

  x0, _ = jax.lax.scan(step_fn, x_T, (jnp.arange(len(ts)), jnp.asarray(ts), abar_next))
  return x0


SOLVERS = {"diffpir": diffpir, "dps": dps}
