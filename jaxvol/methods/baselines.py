"""Baselines measured against PPDM with the same U-Net.

- `Full3D`: full-resolution conditional 3D DDPM (Ho et al., 2020) with the condition concatenated
  to x_t, DDIM sampling (Song et al., 2021). The reference PPDM's memory and quality claims are
  measured against.
- `Wavelet`: WDM (Friedrich et al., "WDM: 3D Wavelet Diffusion Models for High-Resolution
  Medical Image Synthesis", 2024; their code, pfriedri/wdm-3d): DDPM on the 8 orthonormal Haar
  sub-bands at half resolution with the LLL band divided by 3 (`wdm.lll_scale`), the condition
  transformed the same way (as in the authors' conditional cWDM, pfriedri/cwdm); while sampling,
  the x0 estimate is clamped in image space (idwt -> clamp(-c, c) -> dwt, c = config.diffusion.
  clip_x0: wdm-3d's 1 for data in [-1, 1]; the PET/MRI configs use 2, the range of their
  unclipped presets, jaxvol.config.clamp_for_preset), and the sample is rescaled and inverse
  transformed at the end.
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

  # The Gaussian schedule fixes what the time input and x_t mean; the parameterisation what the
  # output means. STM reads the condition when model.stm is on.
  # With flow matching (diffusion.objective = "flow") the network predicts a velocity at the
  # scaled time flow.embed_t_scale * t, and the Gaussian schedule's fields do not matter.
  MODEL_FIELDS = base.Method.MODEL_FIELDS + base.UNET_FIELDS + base.STM_FIELDS + (
      "diffusion.objective", "diffusion.num_steps", "diffusion.beta_start", "diffusion.beta_end",
      "diffusion.parameterization", "flow.embed_t_scale")
  SWITCHED_FIELDS = {**base.Method.SWITCHED_FIELDS, **base.objective_switches(
      ("diffusion.num_steps", "diffusion.beta_start", "diffusion.beta_end",
       "diffusion.parameterization"))}
  CLAMPS_X0 = True  # DDPM/DDIM clip x0_hat to config.diffusion.clip_x0 (also WDM, sparse)
  OBJECTIVES = ("diffusion", "flow")
  RESIDUAL = True  # x0 = condition + network output (x0 parameterisation, noise diffusion only)

  def __post_init__(self):
    c = self.config.diffusion
    self.diffusion = gaussian.GaussianDiffusion(c.num_steps, c.beta_start, c.beta_end,
                                                c.parameterization)
    self.flow = base.flow_of(self.config)
    self.net = base.build_unet(self.config.model, self._out_channels(), self.dtype)
    if self.residual and (self.flow is not None or c.parameterization != "x0"):
      raise ValueError("config.model.residual adds the condition to an x0 estimate: it needs "
                       "diffusion.parameterization='x0' and diffusion.objective='diffusion' (got "
                       f"{c.parameterization!r}, {base.objective_of(self.config)!r})")

  def _out_channels(self):
    return self.target_channels

  def _to_domain(self, x):
    return x

  def _domain_scale(self):
    """Image voxels per network-domain voxel along each axis."""
    return 1

  def _from_domain(self, z, shape):
    return z

  def _apply(self, params, z_t, zy, t, train=False, rng=None):
    rngs = {"dropout": rng} if train else None
    structure = zy if self.net.stm else None
    out = self.net.apply(params, jnp.concatenate([z_t, zy], -1), t, train=train, rngs=rngs,
                         structure=structure)
    return base.add_input(out, zy) if self.residual else out

  def init(self, rng, batch):
    zy = self._to_domain(batch["cond"])
    z = jnp.zeros(zy.shape[:4] + (self._out_channels(),), zy.dtype)
    params = self.net.init(rng, jnp.concatenate([z, zy], -1),
                           jnp.zeros((zy.shape[0],), jnp.int32),
                           structure=zy if self.net.stm else None)
    if self.config.model.get("init", "flax") == "torch":  # the authors' PyTorch starting point
      params = layers.torch_default_init(params, jax.random.fold_in(rng, 1))
    return params

  def _encode(self, params, x):
    """An image into the network's domain (the latent of `LatentDiffusion`, which reads params)."""
    del params
    return self._to_domain(x)

  def _decode(self, params, z, shape):
    del params
    return self._from_domain(z, shape)

  def _clip(self):
    """The x0 clamp of the sampler, or None."""
    c = self.config.diffusion
    return c.clip_x0 if c.clip_x0 > 0 else None

  def loss(self, params, batch, rng):
    z0, zy = self._encode(params, batch["target"]), self._encode(params, batch["cond"])
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    if self.flow is not None:  # the velocity at t * embed_t_scale (jaxvol.diffusion.flow)
      velocity = lambda z, t: self._apply(params, z, zy, t, train=True, rng=k_drop)
      return self.flow.training_loss(velocity, z0, k_t)[0], {}
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

  def _prepare(self, cond, rng, params=None):
    """Padded condition in the network domain, starting noise and the sampling-loop key."""
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    zy = self._encode(params, y)
    k_init, k_loop = jax.random.split(rng)
    z_T = jax.random.normal(k_init, zy.shape[:4] + (self._out_channels(),), zy.dtype)
    return y, shape, layers.constrain_volume(zy), layers.constrain_volume(z_T), k_loop

  def sample(self, params, cond, rng):
    c = self.config.diffusion
    y, shape, zy, z_T, k_loop = self._prepare(cond, rng, params)
    if self.flow is not None:  # the ODE from noise (t = 0) to data (t = 1); no x0 clamp
      f = self.config.flow
      z0 = self.flow.sample(self._denoiser(params, zy), z_T, f.sample_steps, f.solver)
      return base.crop_spatial(self._decode(params, z0, y.shape[1:4]), shape)
    z0 = self.diffusion.ddim_sample(self._denoiser(params, zy), z_T, c.sample_steps, k_loop,
                                    eta=c.eta, clip_x0=self._clip())
    return base.crop_spatial(self._decode(params, z0, y.shape[1:4]), shape)


def _output_from_x0(diffusion, x0, x_t, t):
  """The network output that `diffusion.split_output` reads as this x0 estimate at (x_t, t)."""
  if diffusion.parameterization == "x0":
    return x0
  a = diffusion.abar(t).reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(x_t.dtype)
  eps = (x_t - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
  return eps if diffusion.parameterization == "eps" else jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0


class Wavelet(Full3D):
  """Full3D's diffusion on one level of orthonormal 3D Haar sub-bands, scaled as in wdm-3d.

  An image in [-1, 1] has an LLL band within [-sqrt(8), sqrt(8)]; divided by 3 (wdm-3d's factor)
  it lies within [-0.943, 0.943], about the [-1, 1] range the noise schedule is made for.
  """

  MODEL_FIELDS = Full3D.MODEL_FIELDS + ("wdm.lll_scale",)  # the scale of the bands it sees
  OBJECTIVES = ("diffusion",)
  RESIDUAL = False  # (the bands' channel order differs from the condition's)
  # WDM (Friedrich et al., 2024) predicts the clean wavelet bands rather than the noise.
  CONFIG_DEFAULTS = {"diffusion.parameterization": "x0"}
  LOW_RESOLUTION = True  # the Haar bands are half the crop per axis

  def _out_channels(self):
    return 8 * self.target_channels

  def spatial_multiple(self):
    d = 2 * self.net.divisor
    return (d, d, d)

  def _band_scale(self, channels, dtype):
    """Per-channel factor from Haar bands to the diffusion domain: 1/lll_scale on LLL, else 1."""
    c = channels // 8
    return jnp.concatenate([jnp.full((c,), 1.0 / self.config.wdm.lll_scale, dtype),
                            jnp.ones((channels - c,), dtype)])

  def _to_domain(self, x):
    z = haar.dwt3(x)
    return z * self._band_scale(z.shape[-1], z.dtype)

  def _domain_scale(self):
    return 2

  def _from_domain(self, z, shape):
    return haar.idwt3(z / self._band_scale(z.shape[-1], z.dtype), shape)

  def _image_clamped(self, denoise, bound):
    """`denoise` with its x0 estimate clamped to [-bound, bound] in image space.

    idwt -> clamp -> dwt, then re-expressed in the network's parameterisation, so DDIM derives
    its eps from the clamped x0 as it does for Full3D's voxel clamp.
    """
    d = self.diffusion

    def fn(z, t):
      x0, _ = d.split_output(denoise(z, t), z, t)
      x0 = self._to_domain(jnp.clip(self._from_domain(x0, None), -bound, bound))
      return layers.constrain_volume(_output_from_x0(d, x0, z, t))
    return fn

  def sample(self, params, cond, rng):
    c = self.config.diffusion
    y, shape, zy, z_T, k_loop = self._prepare(cond, rng)
    denoise = self._denoiser(params, zy)
    if c.clip_x0 > 0:
      denoise = self._image_clamped(denoise, c.clip_x0)
    z0 = self.diffusion.ddim_sample(denoise, z_T, c.sample_steps, k_loop, eta=c.eta)
    return base.crop_spatial(self._from_domain(z0, y.shape[1:4]), shape)


class Regression(base.Method):
  """The same U-Net as a one-pass regressor (time input fixed at 0); with config.model.residual
  it predicts the difference to the first input, added back."""

  # no diffusion, no STM
  MODEL_FIELDS = base.Method.MODEL_FIELDS + base.UNET_FIELDS
  RESIDUAL = True

  def __post_init__(self):
    self.net = base.build_unet(self.config.model, self.target_channels, self.dtype)

  def _apply(self, params, y, train=False, rng=None):
    t = jnp.zeros((y.shape[0],), jnp.int32)
    out = self.net.apply(params, y, t, train=train, rngs={"dropout": rng} if train else None)
    return base.add_input(out, y) if self.residual else out

  def init(self, rng, batch):
    return self.net.init(rng, batch["cond"], jnp.zeros((batch["cond"].shape[0],), jnp.int32))

  def loss(self, params, batch, rng):
    pred = self._apply(params, batch["cond"], train=True, rng=rng)
    return base.regression_loss(pred, batch["target"], self.config.regression.loss), {}

  def sample(self, params, cond, rng):
    del rng
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    return base.crop_spatial(self.windowed(lambda yw: self._apply(params, yw), (y,)), shape)
