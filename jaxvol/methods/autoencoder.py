"""The KL autoencoder as a method: trained like any other, scored by its reconstructions.

The first stage of latent diffusion (Rombach et al., CVPR 2022; MAISI, Guo et al., WACV 2025):
jaxvol.models.autoencoder. Training crops of the target modality are encoded, a posterior sample
decoded, and scored by L1 reconstruction plus `autoencoder.kl_weight` x the KL divergence of the
posterior to N(0, I) (MAISI's recipe without its perceptual and adversarial terms: the perceptual
loss needs pretrained network weights, and the patch discriminator is not built yet). Its
"prediction" of a volume is decode(mean(encode(volume))) of its input, the same modality
(`data.inputs = (target,)`), so `jaxvol evaluate` reports the reconstruction PSNR/SSIM: the
ceiling of any model that works in this latent space. Volumes are decoded whole, or in
Gaussian-blended latent windows of `autoencoder.decode_window` latent voxels
(jaxvol.models.autoencoder.decode_windows), which bounds the decoder's peak memory.
"""

import jax.numpy as jnp

from jaxvol.methods import base
from jaxvol.models import autoencoder as ae_lib

# The fields that fix what the parameters mean.
AUTOENCODER_FIELDS = ("autoencoder.latent_channels", "autoencoder.factor", "autoencoder.width",
                      "autoencoder.channel_mults", "autoencoder.num_res_blocks",
                      "autoencoder.groups")


def build_network(config, channels: int, dtype) -> ae_lib.KLAutoencoder:
  a = config.autoencoder
  return ae_lib.KLAutoencoder(channels=channels, latent_channels=a.latent_channels,
                              factor=a.factor, width=a.width,
                              channel_mults=tuple(a.channel_mults),
                              num_res_blocks=a.num_res_blocks, groups=a.groups, dtype=dtype)


class Autoencoder(base.Method):

  MODEL_FIELDS = base.RUN_FIELDS + ("data.target",) + AUTOENCODER_FIELDS

  def __post_init__(self):
    if tuple(self.config.data.inputs) != (self.config.data.target,):
      raise ValueError(f"the autoencoder reconstructs its input: data.inputs must be "
                       f"({self.config.data.target!r},), the target, got "
                       f"{tuple(self.config.data.inputs)}")
    self.net = build_network(self.config, self.target_channels, self.dtype)

  def spatial_multiple(self):
    f = int(self.config.autoencoder.factor)
    return (f, f, f)

  def init(self, rng, batch):
    return self.net.init(rng, batch["target"])

  def loss(self, params, batch, rng):
    x = batch["target"]
    recon, mean, logvar = self.net.apply(params, x, rng)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = ae_lib.kl_divergence(mean, logvar)
    return l1 + float(self.config.autoencoder.kl_weight) * kl, {"l1": l1, "kl": kl}

  def encode(self, params, x):
    """The posterior mean of a (B, D, H, W, C) volume whose sides are multiples of the factor."""
    return self.net.apply(params, x, method=ae_lib.KLAutoencoder.encode)[0]

  def decode(self, params, z):
    """A latent back to the image: whole, or in blended latent windows (module docstring)."""
    fn = lambda w: self.net.apply(params, w, method=ae_lib.KLAutoencoder.decode)
    window = tuple(self.config.autoencoder.get("decode_window", ()))
    if not window:
      return fn(z)
    return ae_lib.decode_windows(fn, z, window, int(self.config.autoencoder.factor))

  def sample(self, params, cond, rng):
    del rng  # the posterior mean: deterministic
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    return base.crop_spatial(self.decode(params, self.encode(params, y)), shape)
