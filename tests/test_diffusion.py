"""Bridge marginals and samplers against closed-form Gaussian answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.diffusion import bridge as bridge_lib
from jaxvol.diffusion import gaussian


def test_bridge_marginals_at_ends_and_middle():
  br = bridge_lib.BrownianBridge(num_steps=1000, max_var=1.0)
  key = jax.random.PRNGKey(0)
  x0 = jax.random.normal(key, (4, 8, 8, 8, 1))
  y = x0 * 0.5 + 2.0
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t0 = jnp.zeros((4,), jnp.int32)
  tT = jnp.full((4,), 1000, jnp.int32)
  np.testing.assert_array_equal(np.asarray(br.q_sample(x0, y, t0, eps)), np.asarray(x0))
  np.testing.assert_allclose(np.asarray(br.q_sample(x0, y, tT, eps)), np.asarray(y), atol=1e-6)
  # middle: mean (1-m) x0 + m y, variance 2 s (m - m^2) = 0.5 at m = 1/2
  eps = jax.random.normal(jax.random.PRNGKey(2), (200000,))
  xt = br.q_sample(jnp.full((1, 200000), 1.0), jnp.full((1, 200000), 3.0), jnp.array([500]), eps[None])
  assert abs(float(xt.mean()) - 2.0) < 0.01
  assert abs(float(xt.var()) - 0.5) < 0.01


def _gaussian_bridge_denoiser(br, mu, var, y):
  """E[x0 | x_t] for x0 ~ N(mu, var) and a fixed condition y."""

  def denoise(x_t, t):
    m = br.m(t)[:, None]
    d = br.delta(t)[:, None]
    k = (1 - m) * var / ((1 - m) ** 2 * var + d)
    return mu + k * (x_t - (1 - m) * mu - m * y)

  return denoise


@pytest.mark.slow
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_bridge_sampler_recovers_gaussian_data(eta):
  # A sampler fed only E[x0 | x_t] misses Var(x0 | x_t) in each move, an error that vanishes as
  # the steps shrink (about 4% of the variance at T = K = 1000), so test with fine steps.
  br = bridge_lib.BrownianBridge(num_steps=4000, max_var=1.0)
  mu, var = 0.7, 0.25
  y = jnp.full((1, 50000), -1.0)
  out = br.sample(_gaussian_bridge_denoiser(br, mu, var, y), y, 4000, jax.random.PRNGKey(3), eta=eta)
  assert abs(float(out.mean()) - mu) < 0.02
  assert abs(float(out.var()) - var) / var < 0.03


def test_bridge_first_move_has_training_noise():
  """From x_T = y the first move must land on the bridge marginal at s, noise included."""
  br = bridge_lib.BrownianBridge(num_steps=1000, max_var=1.0)
  y = jnp.zeros((200000,))
  x0_hat = jnp.ones_like(y)
  noise = jax.random.normal(jax.random.PRNGKey(0), y.shape)
  for eta in (0.0, 0.5, 1.0):
    x_s = br.step(y, x0_hat, y, 1000, 900, noise, eta)
    assert abs(float(x_s.mean()) - 0.1) < 0.01  # (1 - m_s) x0 + m_s y at m_s = 0.9
    assert abs(float(x_s.var()) - float(br.delta(900))) < 0.01


def test_bridge_schedule_validation():
  br = bridge_lib.BrownianBridge(num_steps=10)
  assert list(br.sample_timesteps(5)) == [10, 8, 6, 4, 2, 0]
  with pytest.raises(ValueError):
    br.sample_timesteps(11)


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_parameterisations_are_consistent(param):
  diff = gaussian.GaussianDiffusion(parameterization=param)
  key = jax.random.PRNGKey(0)
  x0 = jax.random.normal(key, (3, 4, 4, 4, 1))
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 400, 999])
  xt = diff.q_sample(x0, t, eps)
  x0_hat, eps_hat = diff.split_output(diff.target(x0, eps, t), xt, t)
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-3)
  np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-3)


# Like the bridge, a sampler fed E[x0 | x_t] alone is exact only as steps shrink: the variance
# is 17% low at 50 DDIM steps and within 3% at the full 1000.
@pytest.mark.parametrize("eta,steps", [(0.0, 1000), (1.0, 1000)])
def test_ddim_recovers_gaussian_data(eta, steps):
  diff = gaussian.GaussianDiffusion(parameterization="x0")
  mu, var = 0.5, 0.09

  def denoise(x_t, t):  # exact E[x0 | x_t] for Gaussian data, returned as the x0 output
    a = diff.abar(t)[:, None]
    return mu + jnp.sqrt(a) * var / (a * var + 1 - a) * (x_t - jnp.sqrt(a) * mu)

  x_T = jax.random.normal(jax.random.PRNGKey(4), (1, 50000))
  out = diff.ddim_sample(denoise, x_T, steps, jax.random.PRNGKey(5), eta=eta)
  assert abs(float(out.mean()) - mu) < 0.01
  assert abs(float(out.var()) - var) / var < 0.04
