"""Building blocks shared by the 3D networks: time embedding, GroupNorm, ResBlock, attention."""

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxvol.models import attention

# Logical names of a (B, D, H, W, C) volume's axes; jaxvol.train.sharding maps them onto the mesh.
VOLUME_AXES = ("batch", "depth", "height", "width", "channels")


def constrain_volume(x):
  """Keeps a (B, D, H, W, C) array in the volume layout of the active logical axis rules.

  A no-op unless the rules are active (jaxvol.train.sharding.activated); there it pins, e.g., a
  sampling loop's carry to the depth-sharded layout instead of leaving it to propagation.
  """
  return nn.with_logical_constraint(x, VOLUME_AXES)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of (B,) timesteps (any real values) into (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def upsample_nearest(x, factor: int = 2):
  """Nearest-neighbour upsampling of (B, D, H, W, C) by an integer factor per spatial axis.

  The same values as `jax.image.resize(..., method="nearest")`, written as broadcast + reshape:
  the resize lowers to a gather, which XLA cannot split along a sharded depth axis, so a
  spatially sharded U-Net would all-gather the whole feature map at every upsampling.
  """
  b, d, h, w, c = x.shape
  f = factor
  x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, d, f, h, f, w, f, c))
  return x.reshape(b, d * f, h * f, w * f, c)


def group_norm(channels: int, groups: int, dtype, name=None):
  """GroupNorm with the largest group count <= `groups` that divides `channels`."""
  g = max(1, min(groups, channels))
  while channels % g:
    g -= 1
  return nn.GroupNorm(num_groups=g, dtype=dtype, name=name)


class Modulation(nn.Module):
  """STM's zero-initialised MLP (jaxvol.models.stm): code -> (gamma, beta); returns emb * (1 + gamma) + beta."""

  hidden: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb, code):
    h = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(code))
    gb = nn.Dense(2 * emb.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  bias_init=nn.initializers.zeros, name="film")(h)
    gamma, beta = jnp.split(gb, 2, axis=-1)
    return emb * (1.0 + gamma) + beta


class ResBlock(nn.Module):
  """GN-SiLU-Conv, time-embedding scale/shift, GN-SiLU-Dropout-Conv, residual (1x1 when widths differ).

  With a `structure` code (B, code_dim), the time embedding is first modulated by STM.
  """

  out_channels: int
  groups: int = 32
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, deterministic: bool, structure=None):
    if structure is not None:  # STM (jaxvol.models.stm): modulate the time embedding
      emb = Modulation(dtype=self.dtype, name="stm")(emb, structure)
    conv = lambda c, k, name: nn.Conv(c, (k,) * 3, padding="SAME", dtype=self.dtype, name=name)
    h = nn.silu(group_norm(x.shape[-1], self.groups, self.dtype, "norm1")(x))
    h = conv(self.out_channels, 3, "conv1")(h)
    scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, None, :], 2, axis=-1)
    h = group_norm(self.out_channels, self.groups, self.dtype, "norm2")(h) * (1.0 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = nn.Conv(self.out_channels, (3,) * 3, padding="SAME", dtype=self.dtype,
                kernel_init=nn.initializers.zeros, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "skip")(x)
    return x + h


class SpatialAttention(nn.Module):
  """Multi-head self-attention over all voxels of a (B, D, H, W, C) feature map.

  `backend` is a `jaxvol.models.attention` backend; the default "xla" materialises the logits,
  "chunked" (or "auto") keeps memory linear in the voxel count.
  """

  num_heads: int = 4
  groups: int = 32
  dtype: jnp.dtype = jnp.float32
  backend: str = "xla"

  @nn.compact
  def __call__(self, x):
    b, d, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention width {c} not divisible by {self.num_heads} heads")
    hd = c // self.num_heads
    y = group_norm(c, self.groups, self.dtype, "norm")(x).reshape(b, d * h * w, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y).reshape(b, d * h * w, 3, self.num_heads, hd)
    o = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                        backend=self.backend)
    o = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out")(
        o.reshape(b, d * h * w, c))
    return x + o.reshape(b, d, h, w, c)
