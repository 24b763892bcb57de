"""Sparse-timestep diffusion: level sets, velocity loss, Heun-DDIM, STM, the method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as config_lib
from jaxvol import methods
from jaxvol.diffusion import gaussian
from jaxvol.diffusion import sparse
from jaxvol.models import unet3d


@pytest.mark.parametrize("f,expected", [
    (5, [0, 199, 399, 599, 799, 999]),
    (10, [0, 99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
    (1, [0, 999]),
    (4, [0, 249, 499, 749, 999]),
])
def test_sparse_timesteps(f, expected):
  ts = sparse.sparse_timesteps(1000, f)
  assert ts.tolist() == expected
  assert sparse.nfe(ts) == 2 * f - 1 and sparse.nfe(ts, heun=False) == f
  assert sparse.nfe(ts, final_denoise=True) == 2 * f


def test_sparse_timesteps_bad_args():
  with pytest.raises(ValueError):
    sparse.sparse_timesteps(1000, 0)
  with pytest.raises(ValueError):
    sparse.check_timesteps([5, 5, 10], 1000)
  with pytest.raises(ValueError):
    sparse.check_timesteps([0, 1000], 1000)
  assert sparse.check_timesteps([999, 0, 500], 1000).tolist() == [0, 500, 999]


def test_velocity_loss_is_noise_weighted_x0_error():
  d = gaussian.GaussianDiffusion(parameterization="x0")
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jax.random.normal(k[0], (6, 4, 4, 4, 1))
  x0_hat = x0 + 0.3 * jax.random.normal(k[1], x0.shape)
  eps = jax.random.normal(k[2], x0.shape)
  for t in (0, 199, 599, 999):
    tv = jnp.full((6,), t, jnp.int32)
    lhs = sparse.velocity_loss(d, x0_hat, x0, eps, tv)
    rhs = (1.0 - d.alphas_cumprod[t]) * jnp.mean(jnp.square(x0 - x0_hat))
    np.testing.assert_allclose(lhs, rhs, rtol=5e-4)  # float32 cancellation at t = 0
  # per-example levels
  tv = jnp.asarray([0, 199, 399, 599, 799, 999])
  w = jnp.asarray(1.0 - d.alphas_cumprod[np.asarray(tv)], jnp.float32)
  per = jnp.mean(jnp.square(x0 - x0_hat), axis=(1, 2, 3, 4))
  np.testing.assert_allclose(sparse.velocity_loss(d, x0_hat, x0, eps, tv), jnp.mean(w * per),
                             rtol=1e-5)


def _gaussian_denoiser(d, mu, s):
  """The exact x0 = E[x0 | x_t] for x0 ~ N(mu, s^2) per voxel."""
  def fn(x, t):
    a = d.abar(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return mu + jnp.sqrt(a) * s**2 / (a * s**2 + 1 - a) * (x - jnp.sqrt(a) * mu)
  return fn


@pytest.mark.parametrize("f,tol", [(5, 0.04), (10, 0.02)])
def test_heun_ddim_reproduces_gaussian_data_mean_and_variance(f, tol):
  d = gaussian.GaussianDiffusion(parameterization="x0")
  mu, s = 0.3, 1.0
  x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 32, 1))
  ts = sparse.sparse_timesteps(1000, f)
  out = jax.jit(lambda x: sparse.heun_ddim_sample(d, _gaussian_denoiser(d, mu, s), x, ts))(x_T)
  assert abs(float(out.mean()) - mu) < 0.01
  assert abs(float(out.std()) / s - 1.0) < tol
  plain = sparse.heun_ddim_sample(d, _gaussian_denoiser(d, mu, s), x_T, ts, heun=False)
  assert abs(float(plain.std()) / s - 1.0) > 3 * abs(float(out.std()) / s - 1.0)


def test_heun_counts_network_evaluations():
  d = gaussian.GaussianDiffusion(parameterization="x0")
  calls = []

  def fn(x, t):
    calls.append(1)
    return x
  ts = sparse.sparse_timesteps(1000, 5)
  jax.make_jaxpr(lambda x: sparse.heun_ddim_sample(d, fn, x, ts))(jnp.zeros((1, 4)))
  # traced once inside the scan body (predict + corrector) and once for the last move
  assert len(calls) == 3
  assert sparse.nfe(ts) == 4 * 2 + 1
  calls.clear()
  jax.make_jaxpr(lambda x: sparse.heun_ddim_sample(d, fn, x, ts, final_denoise=True))(
      jnp.zeros((1, 4)))
  assert len(calls) == 4 and sparse.nfe(ts, final_denoise=True) == 10


def _unet(stm):
  return unet3d.UNet3D(out_channels=1, base_width=8, channel_mults=(1, 2), groups=4,
                       time_embed_dim=16, stm=stm, stm_dim=8)


def test_stm_at_init_leaves_output_unchanged():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 16, 2))
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 16, 1))
  t = jnp.asarray([3, 700])
  with_stm = _unet(True)
  params = with_stm.init(jax.random.PRNGKey(2), x, t, structure=y)
  p = params["params"]
  assert "stm_encoder" in p and "stm" in p["down0_0"]
  out = with_stm.apply(params, x, t, structure=y)
  plain = {k: ({kk: vv for kk, vv in v.items() if kk != "stm"} if isinstance(v, dict) else v)
           for k, v in p.items() if k != "stm_encoder"}
  ref = _unet(False).apply({"params": plain}, x, t)
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # Once the zero-initialised layers (FiLM and each ResBlock's last conv) move, structure matters.
  bumped = jax.tree_util.tree_map_with_path(
      lambda path, v: v + 0.1 if any(k in jax.tree_util.keystr(path) for k in ("film", "conv2"))
      else v, params)
  a = with_stm.apply(bumped, x, t, structure=y)
  b = with_stm.apply(bumped, x, t, structure=-y)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  with pytest.raises(ValueError, match="structure"):
    with_stm.apply(params, x, t)


def _cfg(**kw):
  c = config_lib.smoke_overrides(config_lib.set_method(config_lib.base_config(), "sparse"))
  c.model.base_width = 4
  c.model.stm_dim = 8
  for k, v in kw.items():
    sec, name = k.split("__")
    c[sec][name] = v
  return c


@pytest.mark.parametrize("param", ["x0", "eps", "v"])
def test_sparse_method_trains_on_its_levels_only(param):
  m = methods.build(_cfg(diffusion__parameterization=param))
  batch = {"cond": jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 16, 1)),
           "target": jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 16, 1))}
  params = m.init(jax.random.PRNGKey(2), batch)
  seen = []
  orig = m._apply  # pylint: disable=protected-access

  def spy(p, z, zy, t, **kw):
    seen.append(t)
    return orig(p, z, zy, t, **kw)
  m._apply = spy  # pylint: disable=protected-access
  for i in range(8):
    loss, aux = m.loss(params, batch, jax.random.PRNGKey(10 + i))
    assert np.isfinite(float(loss))
  levels = set(np.concatenate([np.asarray(t) for t in seen]).tolist())
  assert levels <= {0, 199, 399, 599, 799, 999} and len(levels) >= 3
  assert ("x0_mse" in aux) == (param == "x0")
  out = jax.jit(m.sample)(params, batch["cond"][:1], jax.random.PRNGKey(3))
  assert out.shape == (1, 16, 16, 16, 1) and np.all(np.isfinite(out))


def test_sparse_method_explicit_levels_and_stm_switch():
  m = methods.build(_cfg(sparse__timesteps=(0, 500, 999), model__stm=False))
  assert m.timesteps.tolist() == [0, 500, 999] and m.nfe == 3 and not m.net.stm
  m = methods.build(_cfg(sparse__f_steps=10))
  assert len(m.timesteps) == 11 and m.net.stm
