"""The WDM baseline as pfriedri/wdm-3d does it: LLL band / 3 as the diffusion target, and the
sampler's x0 estimate clamped to [-1, 1] in image space (idwt -> clamp -> dwt)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as base
from jaxvol import methods
from jaxvol.ops import haar


def _config(parameterization="x0", clip_x0=1.0, lll_scale=3.0):
  c = base.smoke_overrides(base.set_method(base.base_config(), "wdm"))
  c.data.inputs = ("a",)
  c.model.base_width, c.model.groups, c.model.time_embed_dim = 4, 4, 8
  c.diffusion.parameterization = parameterization
  c.diffusion.clip_x0 = clip_x0
  c.diffusion.sample_steps = 4
  c.wdm.lll_scale = lll_scale
  return c


@pytest.fixture(scope="module")
def volumes():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  target = jax.random.uniform(k1, (2, 8, 8, 8, 1), minval=-1.0, maxval=1.0)
  cond = jax.random.uniform(k2, (2, 8, 8, 8, 1), minval=-1.0, maxval=1.0)
  return {"cond": cond, "target": target}


def _scaled_bands(x):
  """Reference: LLL = sum of each 2x2x2 block / sqrt(8), then / 3; the other 7 bands as dwt3."""
  b, d, h, w, c = x.shape
  blocks = np.asarray(x).reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
  lll = blocks.sum(axis=(2, 4, 6)) / np.sqrt(8.0)
  bands = np.asarray(haar.dwt3(x))
  np.testing.assert_allclose(bands[..., :c], lll, atol=1e-5)  # LLL first, orthonormal
  return np.concatenate([lll / 3.0, bands[..., c:]], axis=-1)


def test_default_is_wdm3d():
  c = base.mri_t1_t2_config("wdm", None)
  # The image-space clamp of wdm-3d, at the bound that covers the MRI preset's range (its data
  # are in [-1, 1]; the unclipped MRI preset reaches about 1.5: jaxvol.config.clamp_for_preset).
  assert c.wdm.lll_scale == 3.0 and c.diffusion.clip_x0 == base.UNCLIPPED_CLAMP
  assert c.diffusion.parameterization == "x0"


def test_training_target_is_the_scaled_bands(volumes):
  m = methods.build(_config())
  expected = _scaled_bands(volumes["target"])
  np.testing.assert_allclose(np.asarray(m._to_domain(volumes["target"])), expected, atol=1e-6)
  # The loss vanishes for a network that outputs exactly the scaled bands (x0 prediction) ...
  m._apply = lambda params, z_t, zy, t, train=False, rng=None: jnp.asarray(expected)
  loss, _ = m.loss(None, volumes, jax.random.PRNGKey(1))
  assert float(loss) < 1e-10
  # ... and not for the unscaled ones.
  unscaled = np.asarray(haar.dwt3(volumes["target"]))
  m._apply = lambda params, z_t, zy, t, train=False, rng=None: jnp.asarray(unscaled)
  assert float(m.loss(None, volumes, jax.random.PRNGKey(1))[0]) > 1e-3


def test_domain_round_trip(volumes):
  m = methods.build(_config())
  z = m._to_domain(volumes["target"])
  np.testing.assert_allclose(np.asarray(m._from_domain(z, (8, 8, 8))),
                             np.asarray(volumes["target"]), atol=1e-6)


def _wild(params, z_t, zy, t, train=False, rng=None):
  """An analytic denoiser whose x0 estimates leave [-1, 1] by far, in every band."""
  del params, zy, t, train, rng
  return 4.0 * z_t + 2.5 * jnp.sign(jnp.sin(7.0 * z_t)) + 1.5


@pytest.mark.parametrize("parameterization", ["x0", "eps", "v"])
def test_every_sample_lies_in_the_image_range(volumes, parameterization):
  m = methods.build(_config(parameterization))
  m._apply = _wild
  out = np.asarray(m.sample(None, volumes["cond"][:, :7, :6, :5], jax.random.PRNGKey(2)))
  assert out.shape == (2, 7, 6, 5, 1)
  assert np.abs(out).max() <= 1.0 + 1e-5
  # Without the clamp the same denoiser does leave the range (the test is not vacuous).
  free = methods.build(_config(parameterization, clip_x0=0.0))
  free._apply = _wild
  assert np.abs(np.asarray(free.sample(None, volumes["cond"], jax.random.PRNGKey(2)))).max() > 1.5


@pytest.mark.slow
def test_tiny_network_samples_lie_in_the_image_range(volumes):
  m = methods.build(_config())
  params = m.init(jax.random.PRNGKey(3), volumes)
  out = np.asarray(jax.jit(m.sample)(params, volumes["cond"], jax.random.PRNGKey(4)))
  assert out.shape == volumes["cond"].shape and np.isfinite(out).all()
  assert np.abs(out).max() <= 1.0 + 1e-5
