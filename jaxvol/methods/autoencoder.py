"""The KL autoencoder as a method: trained like any other, scored by its reconstructions.

The first stage of latent diffusion (Rombach et al., CVPR 2022; MAISI, Guo et al., WACV 2025):
jaxvol.models.autoencoder. Training crops of the target modality are encoded, a posterior sample
decoded, and scored by L1 reconstruction plus `autoencoder.kl_weight` x the KL divergence of the
posterior to N(0, I), and, with `autoencoder.adv_weight` > 0, from step `autoencoder.adv_start`
on, a 3D patch discriminator's least-squares adversarial terms (MAISI's recipe without its
perceptual loss, which needs pretrained network weights that cannot be fetched here). The
discriminator's parameters live beside the autoencoder's ({"params": {"encoder", "decoder",
"discriminator"}}) and train in the same step with the same optimizer: each player's term stops
the gradient to the other (the generator's term sees a frozen discriminator, the discriminator's
term a frozen reconstruction), so one gradient step updates both as alternating steps would. Its
"prediction" of a volume is decode(mean(encode(volume))) of its input, the same modality
(`data.inputs = (target,)`), so `jaxvol evaluate` reports the reconstruction PSNR/SSIM: the
ceiling of any model that works in this latent space. Volumes are decoded whole, or in
Gaussian-blended latent windows of `autoencoder.decode_window` latent voxels
(jaxvol.models.autoencoder.decode_windows), which bounds the decoder's peak memory.
"""

import jax
import jax.numpy as jnp

from jaxvol.methods import base
from jaxvol.models import autoencoder as ae_lib

# The fields that fix what the parameters mean.
AE_PARTS = ("encoder", "decoder")
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

  @property
  def adversarial(self) -> bool:
    return float(self.config.autoencoder.get("adv_weight", 0.0)) > 0

  def _discriminator(self):
    a = self.config.autoencoder
    return ae_lib.PatchDiscriminator(width=a.disc_width, layers=a.disc_layers, groups=a.groups,
                                     dtype=self.dtype)

  @staticmethod
  def _ae(params):
    return {"params": {k: params["params"][k] for k in AE_PARTS}}

  def init(self, rng, batch):
    k_ae, k_d = jax.random.split(rng)
    params = self.net.init(k_ae, batch["target"])
    if self.adversarial:
      disc = self._discriminator().init(k_d, batch["target"])
      params = {"params": {**params["params"], "discriminator": disc["params"]}}
    return params

  def loss(self, params, batch, rng):
    return self.loss_at(params, batch, rng, jnp.int32(0))

  def loss_at(self, params, batch, rng, step):
    a = self.config.autoencoder
    x = batch["target"]
    recon, mean, logvar = self.net.apply(self._ae(params), x, rng)
    l1 = jnp.mean(jnp.abs(recon - x))
    kl = ae_lib.kl_divergence(mean, logvar)
    loss = l1 + float(a.kl_weight) * kl
    aux = {"l1": l1, "kl": kl}
    if self.adversarial:
      disc = self._discriminator()
      d_params = {"params": params["params"]["discriminator"]}
      frozen_d = jax.lax.stop_gradient(d_params)
      d_loss, g_loss = ae_lib.least_squares_losses(
          disc.apply(d_params, x), disc.apply(d_params, jax.lax.stop_gradient(recon)),
          disc.apply(frozen_d, recon))
      on = (step >= int(a.adv_start)).astype(jnp.float32)  # after the warm-up
      loss = loss + on * (float(a.adv_weight) * g_loss + d_loss)
      aux.update(adv_g=g_loss, adv_d=d_loss)
    return loss, aux

  def encode(self, params, x):
    """The posterior mean of a (B, D, H, W, C) volume whose sides are multiples of the factor."""
    return self.net.apply(self._ae(params), x, method=ae_lib.KLAutoencoder.encode)[0]

  def decode(self, params, z):
    """A latent back to the image: whole, or in blended latent windows (module docstring)."""
    fn = lambda w: self.net.apply(self._ae(params), w, method=ae_lib.KLAutoencoder.decode)
    window = tuple(self.config.autoencoder.get("decode_window", ()))
    if not window:
      return fn(z)
    return ae_lib.decode_windows(fn, z, window, int(self.config.autoencoder.factor))

  def sample(self, params, cond, rng):
    del rng  # the posterior mean: deterministic
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    return base.crop_spatial(self.decode(params, self.encode(params, y)), shape)
