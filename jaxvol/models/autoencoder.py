"""A 3D KL autoencoder: the latent space of latent diffusion, built as MAISI builds its own.

Latent diffusion: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models"
(CVPR 2022); the 3D medical design follows MAISI (Guo et al., "MAISI: Medical AI for Synthetic
Imaging", WACV 2025; NVIDIA's NV-Generate-CTMR): a convolutional encoder and decoder with
residual blocks, `latent_channels` (4) latent channels and `factor` (4) times downsampling per
axis, a Gaussian posterior N(mean, exp(logvar)) per latent voxel, and its KL divergence to N(0, I)
as a small regulariser beside the L1 reconstruction loss, and optionally a 3D patch discriminator
(`PatchDiscriminator`, least-squares adversarial terms) switched on after a warm-up.

Encoder: Conv(width) -> per level [ResBlock x num_res_blocks, strided Conv (stride 2) except at
the last level] -> ResBlock -> GN-SiLU-Conv(2 latent_channels) = (mean, logvar). Decoder: the
mirror: Conv(top width) from the latent -> ResBlock -> per level [ResBlock x num_res_blocks,
nearest x2 + Conv except at the last] -> GN-SiLU-Conv(channels). The number of levels is
log2(factor) + 1, widths `width * channel_mults[level]`.

`kl_divergence` is the closed form KL(N(mean, exp(logvar)) || N(0, 1)), averaged over latent
voxels and channels. Decoding a latent larger than a training crop's runs in Gaussian-blended
latent windows (`decode_windows`), so the decoder's peak memory is one window's.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvol.models import layers
from jaxvol.ops import windows as windows_lib


class _Block(nn.Module):
  """GN-SiLU-Conv, GN-SiLU-Conv, residual (1x1 Conv when widths differ)."""

  width: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.Conv3D(self.width, dtype=self.dtype, name="conv1")(
        nn.silu(layers.group_norm(x.shape[-1], self.groups, self.dtype, "norm1")(x)))
    h = layers.Conv3D(self.width, dtype=self.dtype, name="conv2")(
        nn.silu(layers.group_norm(self.width, self.groups, self.dtype, "norm2")(h)))
    if x.shape[-1] != self.width:
      x = layers.Conv3D(self.width, (1, 1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


def levels_of(factor: int) -> int:
  """Levels of an autoencoder that downsamples by `factor` (a power of 2) per axis."""
  n = int(round(math.log2(factor)))
  if factor < 1 or 2 ** n != factor:
    raise ValueError(f"the autoencoder's downsampling factor must be a power of 2, got {factor}")
  return n + 1


def level_mults(factor: int, channel_mults) -> tuple[int, ...]:
  """The width multiplier of each of the log2(factor) + 1 levels (() = all 1); a clear error for a
  list of another length."""
  n = levels_of(factor)
  mults = tuple(channel_mults) or (1,) * n
  if len(mults) != n:
    raise ValueError(f"channel_mults {mults} must have log2(factor) + 1 = {n} entries")
  return mults


class Encoder(nn.Module):
  latent_channels: int = 4
  factor: int = 4
  width: int = 32
  channel_mults: tuple[int, ...] = ()
  num_res_blocks: int = 1
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    mults = level_mults(self.factor, self.channel_mults)
    n = len(mults)
    h = layers.Conv3D(self.width * mults[0], dtype=self.dtype, name="stem")(x)
    for level, mult in enumerate(mults):
      for i in range(self.num_res_blocks):
        h = _Block(self.width * mult, self.groups, self.dtype, name=f"down{level}_{i}")(h)
      if level < n - 1:
        h = layers.Conv3D(h.shape[-1], strides=(2, 2, 2), dtype=self.dtype,
                          name=f"downsample{level}")(h)
    h = _Block(h.shape[-1], self.groups, self.dtype, name="mid")(h)
    h = nn.silu(layers.group_norm(h.shape[-1], self.groups, self.dtype, "norm_out")(h))
    moments = layers.Conv3D(2 * self.latent_channels, dtype=self.dtype, name="moments")(h)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


class Decoder(nn.Module):
  channels: int = 1
  factor: int = 4
  width: int = 32
  channel_mults: tuple[int, ...] = ()
  num_res_blocks: int = 1
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    mults = level_mults(self.factor, self.channel_mults)
    n = len(mults)
    h = layers.Conv3D(self.width * mults[-1], dtype=self.dtype, name="stem")(z.astype(self.dtype))
    h = _Block(h.shape[-1], self.groups, self.dtype, name="mid")(h)
    for level in reversed(range(n)):
      for i in range(self.num_res_blocks):
        h = _Block(self.width * mults[level], self.groups, self.dtype, name=f"up{level}_{i}")(h)
      if level > 0:
        h = layers.Conv3D(h.shape[-1], dtype=self.dtype, name=f"upsample{level}")(
            layers.upsample_nearest(h, 2))
    h = nn.silu(layers.group_norm(h.shape[-1], self.groups, self.dtype, "norm_out")(h))
    return layers.Conv3D(self.channels, dtype=self.dtype, name="out")(h).astype(jnp.float32)


class KLAutoencoder(nn.Module):
  """Encoder + decoder (module docstring). `__call__(x, rng)` returns (reconstruction, mean,
  logvar), decoding a posterior sample (the mean when rng is None)."""

  channels: int = 1
  latent_channels: int = 4
  factor: int = 4
  width: int = 32
  channel_mults: tuple[int, ...] = ()
  num_res_blocks: int = 1
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(factor=self.factor, width=self.width, channel_mults=tuple(self.channel_mults),
              num_res_blocks=self.num_res_blocks, groups=self.groups, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(channels=self.channels, **kw)

  def encode(self, x):
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x, rng=None):
    mean, logvar = self.encode(x)
    z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(
        rng, mean.shape, mean.dtype)
    return self.decode(z), mean, logvar


class PatchDiscriminator(nn.Module):
  """A 3D patch discriminator (pix2pix's PatchGAN, as MAISI's first stage uses it through MONAI):
  Conv(4, stride 2) + LeakyReLU(0.2), then `layers - 1` blocks of Conv(4, stride 2) + GroupNorm +
  LeakyReLU with doubling widths, then Conv(3) to one logit per patch."""

  width: int = 32
  layers: int = 3
  groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.leaky_relu(layers.Conv3D(self.width, (4, 4, 4), strides=(2, 2, 2), dtype=self.dtype,
                                    name="conv0")(x), 0.2)
    for i in range(1, self.layers):
      h = layers.Conv3D(self.width * 2 ** i, (4, 4, 4), strides=(2, 2, 2), dtype=self.dtype,
                        name=f"conv{i}")(h)
      h = nn.leaky_relu(layers.group_norm(h.shape[-1], self.groups, self.dtype, f"norm{i}")(h),
                        0.2)
    return layers.Conv3D(1, (3, 3, 3), dtype=self.dtype, name="logits")(h).astype(jnp.float32)


def least_squares_losses(real_logits, fake_logits_for_d, fake_logits_for_g):
  """LSGAN terms (MONAI's PatchAdversarialLoss "least_squares"): the discriminator's
  mean (D(x) - 1)^2 + mean D(x_hat)^2 (on a reconstruction with no gradient to the generator) and
  the generator's mean (D(x_hat) - 1)^2 (through a discriminator with no gradient to it)."""
  d_loss = 0.5 * (jnp.mean(jnp.square(real_logits - 1.0)) + jnp.mean(jnp.square(fake_logits_for_d)))
  g_loss = jnp.mean(jnp.square(fake_logits_for_g - 1.0))
  return d_loss, g_loss


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, 1)) per latent element, averaged: the closed form
  0.5 (mean^2 + exp(logvar) - 1 - logvar)."""
  return 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)


def decode_windows(decode, z, window: tuple[int, int, int], factor: int,
                   overlap: float = 0.25):
  """decode(z) of a (B, d, h, w, C) latent in Gaussian-blended latent windows of `window`
  latent voxels, blended at image resolution (each window's output weighted by a Gaussian over
  its factor x window image voxels, divided by the sum of weights), so the peak memory is one
  window's decode. With one window covering the latent it equals decode(z) exactly."""
  spatial = z.shape[1:4]
  window = tuple(min(w, s) for w, s in zip(window, spatial))
  starts = [windows_lib.window_starts(s, w, overlap) for s, w in zip(spatial, window)]
  image_window = tuple(w * factor for w in window)
  weight = jnp.asarray(windows_lib.gaussian_weights(image_window))[None, ..., None]
  out, norm = None, jnp.zeros((1,) + tuple(s * factor for s in spatial) + (1,), jnp.float32)
  for a in starts[0]:
    for b in starts[1]:
      for c in starts[2]:
        piece = decode(z[:, a:a + window[0], b:b + window[1], c:c + window[2]])
        if out is None:
          out = jnp.zeros((z.shape[0],) + tuple(s * factor for s in spatial) + (piece.shape[-1],),
                          jnp.float32)
        box = (slice(None), slice(a * factor, (a + window[0]) * factor),
               slice(b * factor, (b + window[1]) * factor),
               slice(c * factor, (c + window[2]) * factor))
        out = out.at[box].add(piece * weight)
        norm = norm.at[box].add(weight)
  return out / norm


def latent_shape(spatial, factor: int) -> tuple[int, int, int]:
  """The latent's spatial shape of a volume whose sides are multiples of `factor`."""
  if any(int(s) % factor for s in spatial):
    raise ValueError(f"volume {tuple(spatial)} is not a multiple of the factor {factor} per axis")
  return tuple(int(s) // factor for s in spatial)
