"""Conditional latent diffusion (method `ldm`): full3d's diffusion in a frozen KL autoencoder's
latent space, the latent-compression approach PPDM is compared with.

Latent diffusion: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models"
(CVPR 2022); the 3D design of MAISI (Guo et al., WACV 2025): a KL autoencoder
(jaxvol.methods.autoencoder, trained first on the task) compresses the volume `factor` x per axis
to `latent_channels` channels, and a diffusion model works on whole latents. Here the input and
the target are both encoded (the posterior mean, times `ldm.latent_scale`), the condition's latent
is concatenated to the noisy target latent, and the denoiser is the project's U-Net with full3d's
objectives and samplers (DDPM/DDIM, or flow matching with `diffusion.objective = "flow"`); the
sample is decoded back to the target's units through the autoencoder (in blended latent windows
with `autoencoder.decode_window`), so evaluate, predict and the curves work unchanged.

Parameters: {"params": {"unet": ..., "encoder": ..., "decoder": ...}}. The autoencoder's are
copied from the run `ldm.autoencoder_workdir` before the first step (its EMA weights; every leaf
must match, and the architecture fields must agree with its saved config) and frozen, so the LDM
checkpoint carries the exact autoencoder it was trained with, and its model fields (the
autoencoder's architecture included) refuse a config that names another.
"""

import jax
import jax.numpy as jnp

from jaxvol.methods import autoencoder as ae_method
from jaxvol.methods import base
from jaxvol.methods import baselines
from jaxvol.models import autoencoder as ae_lib

AE_PREFIXES = (("params", "encoder"), ("params", "decoder"))


class LatentDiffusion(baselines.Full3D):

  MODEL_FIELDS = baselines.Full3D.MODEL_FIELDS + ae_method.AUTOENCODER_FIELDS + (
      "ldm.latent_scale",)
  CLAMPS_X0 = False  # a latent has no [-1, 1] range to clamp to
  LOW_RESOLUTION = True  # the U-Net sees the latent: 1/factor of the crop per axis
  OBJECTIVES = ("diffusion", "flow")
  RESIDUAL = False  # (a latent and the image condition live in different spaces)

  def __post_init__(self):
    super().__post_init__()
    self.ae = ae_method.build_network(self.config, self.target_channels, self.dtype)

  def _out_channels(self):
    return int(self.config.autoencoder.latent_channels)

  def _domain_scale(self):
    return int(self.config.autoencoder.factor)

  def spatial_multiple(self):
    d = self.net.divisor * int(self.config.autoencoder.factor)
    return (d, d, d)

  def _clip(self):
    return None

  def _ae(self, params):
    return {"params": {k: params["params"][k] for k in ("encoder", "decoder")}}

  def _encode(self, params, x):
    mean = self.ae.apply(self._ae(params), x, method=ae_lib.KLAutoencoder.encode)[0]
    return jax.lax.stop_gradient(mean) * float(self.config.ldm.latent_scale)

  def _decode(self, params, z, shape):
    del shape
    fn = lambda w: self.ae.apply(self._ae(params), w / float(self.config.ldm.latent_scale),
                                 method=ae_lib.KLAutoencoder.decode)
    window = tuple(self.config.autoencoder.get("decode_window", ()))
    if not window:
      return fn(z)
    return ae_lib.decode_windows(fn, z, window, int(self.config.autoencoder.factor))

  def _apply(self, params, z_t, zy, t, train=False, rng=None):
    return super()._apply({"params": params["params"]["unet"]}, z_t, zy, t, train, rng)

  def init(self, rng, batch):
    k_unet, k_ae = jax.random.split(rng)
    ae = self.ae.init(k_ae, batch["target"])
    zy = self.ae.apply(ae, batch["cond"], method=ae_lib.KLAutoencoder.encode)[0]
    z = jnp.zeros(zy.shape[:4] + (self._out_channels(),), zy.dtype)
    unet = self.net.init(k_unet, jnp.concatenate([z, zy], -1),
                         jnp.zeros((zy.shape[0],), jnp.int32),
                         structure=zy if self.net.stm else None)
    return {"params": {"unet": unet["params"], **ae["params"]}}

  def frozen_prefixes(self):
    return AE_PREFIXES

  def param_sources(self):
    workdir = self.config.ldm.autoencoder_workdir
    if not workdir:
      return ()
    return (base.ParamSource("autoencoder", workdir, prefix=("params",), require_all=True,
                             exclude=(("params", "unet"),),
                             same_fields=("data.target",) + ae_method.AUTOENCODER_FIELDS),)
