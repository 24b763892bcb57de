"""Baselines measured against PPDM with the same U-Net.

- `Full3D`: full-resolution conditional 3D DDPM (Ho et al., 2020) with the condition concatenated
  to x_t, DDIM sampling (Song et al., 2021). The reference PPDM's memory and quality claims are
  measured against.
- `Wavelet`: WDM-style diffusion (Friedrich et al., "WDM: 3D Wavelet Diffusion Models for
  High-Resolution Medical Image Synthesis", 2024): DDPM on the 8 Haar sub-bands at half
  resolution, condition transformed the same way, inverse transform after sampling.
- `Regression`: the same network trained as a direct L1/L2 regressor (one forward pass), because
  users ask whether diffusion earns its cost ("Regression is all you need for medical image
  translation", 2025).
"""

import jax
import jax.numpy as jnp

from jaxvol.diffusion import gaussian
from jaxvol.methods import base
from jaxvol.models import layers
from jaxvol.ops import haar


class Full3D(base.Method):

  def __post_init__(self):
    c = self.config.diffusion
    self.diffusion = gaussian.GaussianDiffusion(c.num_steps, c.beta_start, c.beta_end,
                                                c.parameterization)
    self.net = base.build_unet(self.config.model, self._out_channels(), self.dtype)

  def _out_channels(self):
    return self.target_channels

  def _to_domain(self, x):
    return x

  def _domain_scale(self):
    """Image voxels per network-domain voxel along each axis."""
    return 1

  def _clip_bound(self, c):
    return c

  def _from_domain(self, z, shape):
    return z

  def _apply(self, params, z_t, zy, t, train=False, rng=None):
    rngs = {"dropout": rng} if train else None
    structure = zy if self.net.stm else None
    return self.net.apply(params, jnp.concatenate([z_t, zy], -1), t, train=train, rngs=rngs,
                          structure=structure)

  def init(self, rng, batch):
    zy = self._to_domain(batch["cond"])
    z = jnp.zeros(zy.shape[:4] + (self._out_channels(),), zy.dtype)
    return self.net.init(rng, jnp.concatenate([z, zy], -1), jnp.zeros((zy.shape[0],), jnp.int32),
                         structure=zy if self.net.stm else None)

  def loss(self, params, batch, rng):
    z0, zy = self._to_domain(batch["target"]), self._to_domain(batch["cond"])
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, self.diffusion.num_steps)
    eps = jax.random.normal(k_eps, z0.shape, z0.dtype)
    out = self._apply(params, self.diffusion.q_sample(z0, t, eps), zy, t, train=True, rng=k_drop)
    loss = jnp.mean(jnp.square(out - self.diffusion.target(z0, eps, t)))
    return loss, {}

  def _denoiser(self, params, zy):
    """(z_t, t) -> network output over the whole volume (windowed when configured).

    The output keeps the volume layout of the active sharding rules (a no-op without them), so a
    spatially sharded sampling loop carries a sharded state.
    """
    net = lambda z, zyw, t: self._apply(params, z, zyw, t)
    return lambda z, t: layers.constrain_volume(
        self.windowed(net, (z, zy), (t,), self._domain_scale()))

  def _prepare(self, cond, rng):
    """Padded condition in the network domain, starting noise and the sampling-loop key."""
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    zy = self._to_domain(y)
    k_init, k_loop = jax.random.split(rng)
    z_T = jax.random.normal(k_init, zy.shape[:4] + (self._out_channels(),), zy.dtype)
    return y, shape, layers.constrain_volume(zy), layers.constrain_volume(z_T), k_loop

  def sample(self, params, cond, rng):
    c = self.config.diffusion
    y, shape, zy, z_T, k_loop = self._prepare(cond, rng)
    clip = self._clip_bound(c.clip_x0) if c.clip_x0 > 0 else None
    z0 = self.diffusion.ddim_sample(self._denoiser(params, zy), z_T, c.sample_steps, k_loop,
                                    eta=c.eta, clip_x0=clip)
    return base.crop_spatial(self._from_domain(z0, y.shape[1:4]), shape)


class Wavelet(Full3D):
  """Full3D's diffusion on one level of orthonormal 3D Haar sub-bands."""

  def _out_channels(self):
    return 8 * self.target_channels

  def spatial_multiple(self):
    d = 2 * self.net.divisor
    return (d, d, d)

  def _to_domain(self, x):
    return haar.dwt3(x)

  def _domain_scale(self):
    return 2

  def _clip_bound(self, c):
    # An image in [-c, c] has orthonormal Haar coefficients within [-sqrt(8) c, sqrt(8) c].
    return c * 8 ** 0.5

  def _from_domain(self, z, shape):
    return haar.idwt3(z, shape)


class Regression(base.Method):
  """The same U-Net as a one-pass regressor (time input fixed at 0)."""

  def __post_init__(self):
    self.net = base.build_unet(self.config.model, self.target_channels, self.dtype)

  def _apply(self, params, y, train=False, rng=None):
    t = jnp.zeros((y.shape[0],), jnp.int32)
    return self.net.apply(params, y, t, train=train, rngs={"dropout": rng} if train else None)

  def init(self, rng, batch):
    return self.net.init(rng, batch["cond"], jnp.zeros((batch["cond"].shape[0],), jnp.int32))

  def loss(self, params, batch, rng):
    pred = self._apply(params, batch["cond"], train=True, rng=rng)
    return base.regression_loss(pred, batch["target"], self.config.regression.loss), {}

  def sample(self, params, cond, rng):
    del rng
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    return base.crop_spatial(self.windowed(lambda yw: self._apply(params, yw), (y,)), shape)
