"""Sparse-timestep diffusion: level sets, velocity loss, Heun-DDIM, STM, the method."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as config_lib
from jaxvol import methods
from jaxvol.diffusion import gaussian
from jaxvol.diffusion import sparse
from jaxvol.models import stm
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


@pytest.mark.slow
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


# --- The authors' layout, sampler and recipe as options (parity: test_authors_parity.py) ---


def test_authors_sampler_is_ddim_plus_averaged_ending():
  """Their corrections change nothing; their ending averages D(x_0, 0) and D(D(x_0, 0), -1)."""
  d = gaussian.GaussianDiffusion(parameterization="x0")
  ts = sparse.sparse_timesteps(1000, 5, "arange")
  seen = []

  def fn(x, t):  # an x0 "network" that also depends on t (and sees t = -1)
    seen.append(t)
    return 0.6 * jnp.tanh(x) + 1e-4 * t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 6, 1))
  out = jax.jit(lambda x: sparse.authors_sample(d, fn, x, ts))(x_T)
  x_0 = sparse.heun_ddim_sample(d, fn, x_T, ts, heun=False, clip_x0=1.0)  # plain DDIM to t = 0
  x0 = jnp.clip(fn(x_0, jnp.zeros((2,), jnp.int32)), -1, 1)
  ref = 0.5 * (x0 + jnp.clip(fn(x0, jnp.full((2,), -1, jnp.int32)), -1, 1))
  np.testing.assert_allclose(out, ref, atol=2e-5)
  assert sparse.nfe(ts, sampler="authors") == 11 and sparse.nfe(ts) == 9
  with pytest.raises(ValueError, match="sampler"):
    sparse.nfe(ts, sampler="dpm")


def _authors_unet(**kw):
  args = dict(out_channels=1, base_width=8, channel_mults=(1, 2, 2), num_res_blocks=1,
              attention_levels=(2,), num_heads=2, groups=4, time_embed_dim=16, stm=True,
              stm_dim=8, layout="authors")
  args.update(kw)
  return unet3d.UNet3D(**args)


def test_authors_layout_structure():
  net = _authors_unet()
  x = jnp.zeros((1, 16, 16, 16, 2))
  p = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                                      structure=x[..., :1]))["params"]
  # Decoder blocks output the width of the skip they meet next: 8 (not 16) at level 1.
  assert net.encoder_widths() == [8, 8, 8, 16, 16, 16]
  assert net.decoder_widths() == [16, 16, 8, 8, 8, 8]
  assert p["up2_1"]["conv1"]["kernel"].shape == (3, 3, 3, 32, 16)
  assert p["up1_0"]["conv1"]["kernel"].shape == (3, 3, 3, 32, 8)
  assert p["down0_0"]["emb_proj"]["kernel"].shape == (16, 8)  # added, not scale + shift
  assert p["down0_0"]["stm"]["hidden"]["kernel"].shape == (8, 16)  # STM MLP as wide as the emb
  assert "mid_attn" not in p and "up2_attn0" in p
  enc = p["stm_encoder"]
  assert {"vol0_norm", "vol1_norm", "vol2_norm", "coronal0_norm", "coronal1_norm",
          "sagittal0_norm", "sagittal1_norm"} <= set(enc)
  # Unpadded encoder: 128^3 -> 32 -> 8 -> a 2^3 map before pooling (SAME would give 3^3).
  y = jnp.zeros((1, 128, 128, 128, 1))
  for layout, side in (("authors", 2), ("jaxvol", 3)):
    encoder = stm.StructureEncoder(8, layout=layout)
    v = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), y)
    _, inter = jax.eval_shape(lambda v, y, e=encoder: e.apply(v, y, capture_intermediates=True),
                              v, y)
    assert inter["intermediates"]["vol2"]["__call__"][0].shape == (1, side, side, side, 96)
  with pytest.raises(ValueError, match="layout"):
    jax.eval_shape(lambda: _authors_unet(layout="torch").init(
        jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), structure=x[..., :1]))


def test_authors_blocks_time_embedding_downsampling_and_norm():
  from jaxvol.models import layers  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8, 4))
  emb = jax.random.normal(jax.random.PRNGKey(1), (2, 6))
  block = layers.ResBlock(4, groups=2, time_embedding="add", epsilon=1e-5, fast_variance=False)
  v = block.init(jax.random.PRNGKey(2), x, emb, True)
  v = jax.tree.map(lambda a: a + 0.1, v)  # move the zero-initialised conv
  got = block.apply(v, x, emb, True)
  p = v["params"]
  gn = nn.GroupNorm(2, epsilon=1e-5, use_fast_variance=False)
  h = nn.silu(gn.apply({"params": p["norm1"]}, x))
  h = nn.Conv(4, (3, 3, 3)).apply({"params": p["conv1"]}, h)
  h = h + nn.Dense(4).apply({"params": p["emb_proj"]}, nn.silu(emb))[:, None, None, None]
  h = nn.silu(gn.apply({"params": p["norm2"]}, h))
  ref = x + nn.Conv(4, (3, 3, 3)).apply({"params": p["conv2"]}, h)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  with pytest.raises(ValueError, match="time_embedding"):
    layers.ResBlock(4, time_embedding="film").init(jax.random.PRNGKey(2), x, emb, True)
  # Symmetric stride-2 padding: output i sees inputs 2i - 1 .. 2i + 1 (SAME: 2i .. 2i + 2).
  conv = layers.Conv3D(1, strides=(2, 2, 2), padding=((1, 1),) * 3,
                       kernel_init=nn.initializers.ones)
  ramp = jnp.arange(8.0)[None, :, None, None, None] * jnp.ones((1, 8, 4, 4, 1))
  out = conv.apply(conv.init(jax.random.PRNGKey(0), ramp), ramp)
  assert out.shape == (1, 4, 2, 2, 1)
  # Depth sums of taps (-1, 0, 1), (1, 2, 3), ... with the zero pad at -1 (SAME: 0+1+2 = 3 first).
  np.testing.assert_allclose(out[0, :, 1, 1, 0] / 9, [1.0, 6.0, 12.0, 18.0])


def test_authors_method_options_and_optimizer_recipe():
  import optax  # pylint: disable=import-outside-toplevel
  from jaxvol.train import state as state_lib  # pylint: disable=import-outside-toplevel
  c = _cfg(model__layout="authors", sparse__sampler="authors", sparse__levels="arange")
  m = methods.build(c)
  assert m.net.layout == "authors" and m.nfe == 11 and m.timesteps[-1] == 999
  assert methods.build(_cfg(sparse__levels="arange", sparse__f_steps=3)).timesteps.tolist() == [
      0, 332, 665, 999]
  batch = {"cond": jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 16, 1)),
           "target": jax.random.normal(jax.random.PRNGKey(1), (1, 16, 16, 16, 1))}
  params = jax.jit(m.init)(jax.random.PRNGKey(2), batch)  # STM input padded to 48^3 with -1
  assert not np.any(params["params"]["out"]["kernel"])  # zero-initialised output conv
  loss, _ = jax.jit(m.loss)(params, batch, jax.random.PRNGKey(3))
  out = jax.jit(m.sample)(params, batch["cond"], jax.random.PRNGKey(4))
  assert np.isfinite(float(loss)) and out.shape == (1, 16, 16, 16, 1)
  with pytest.raises(ValueError, match="sampler"):
    methods.build(_cfg(sparse__sampler="euler"))
  # No clipping and no warm-up: the first update is plain AdamW at the full rate.
  c.train.grad_clip, c.train.warmup_steps, c.train.learning_rate = 0.0, 0, 0.5
  opt = state_lib.make_optimizer(c.train)
  g = {"w": jnp.full((3,), 100.0)}
  w = {"w": jnp.ones((3,))}
  upd, _ = opt.update(g, opt.init(w), w)
  ref, _ = optax.adamw(0.5, weight_decay=c.train.weight_decay).update(g, optax.adamw(
      0.5, weight_decay=c.train.weight_decay).init(w), w)
  np.testing.assert_allclose(upd["w"], ref["w"], rtol=1e-6)
