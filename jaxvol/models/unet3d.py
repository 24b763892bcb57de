"""A 3D diffusion U-Net in Flax linen.

The network of DDPM (Ho et al., 2020) in 3D, as used by the 3D medical diffusion literature
(PPDM, WDM, sparse voxel-space diffusion): ResBlocks with GroupNorm and a time embedding, strided
convolution down, nearest-neighbour up, self-attention at chosen levels. Everything is set from
config: widths (base width x multipliers), res blocks per level, attention levels and heads,
GroupNorm groups, dropout, time-embedding width, compute dtype and rematerialisation.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvol.models import layers
from jaxvol.models import stm as stm_lib

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class UNet3D(nn.Module):
  """(x: (B, D, H, W, C_in), t: (B,)) -> (B, D, H, W, out_channels).

  Spatial sizes must be divisible by 2 ** (len(channel_mults) - 1); callers pad. With `stm`, the
  call also takes `structure`, the (B, D', H', W', C') degraded input the structure code is
  computed from.
  """

  out_channels: int
  base_width: int = 32
  channel_mults: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 1
  attention_levels: Sequence[int] = ()
  num_heads: int = 4
  groups: int = 8
  dropout: float = 0.0
  time_embed_dim: int = 128
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"  # none | full | dots: rematerialise each ResBlock's activations
  stm: bool = False  # STM (jaxvol.models.stm): modulate every ResBlock's time embedding
  stm_dim: int = 128

  @property
  def divisor(self) -> int:
    return 2 ** (len(self.channel_mults) - 1)

  @nn.compact
  def __call__(self, x, t, train: bool = False, structure=None):
    if x.ndim != 5:
      raise ValueError(f"UNet3D expects (B, D, H, W, C), got {x.shape}")
    if any(s % self.divisor for s in x.shape[1:4]):
      raise ValueError(f"spatial shape {x.shape[1:4]} must be divisible by {self.divisor}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}: {sorted(REMAT_POLICIES)}")
    block_cls = layers.ResBlock
    if self.remat != "none":
      block_cls = nn.remat(layers.ResBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
    det = not train
    code = None
    if self.stm:
      if structure is None:
        raise ValueError("a UNet3D with stm=True needs the `structure` input")
      code = stm_lib.StructureEncoder(self.stm_dim, self.dtype, name="stm_encoder")(structure)
    x = x.astype(self.dtype)
    emb = layers.timestep_embedding(t, self.base_width)
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="temb0")(emb)
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="temb1")(nn.silu(emb))

    def block(h, width, name):
      return block_cls(width, self.groups, self.dropout, self.dtype, name=name)(h, emb, det, code)

    def attn(h, name):
      return layers.SpatialAttention(self.num_heads, self.groups, self.dtype, name=name)(h)

    h = layers.Conv3D(self.base_width, dtype=self.dtype, name="stem")(x)
    skips = [h]
    for lvl, mult in enumerate(self.channel_mults):
      width = self.base_width * mult
      for i in range(self.num_res_blocks):
        h = block(h, width, f"down{lvl}_{i}")
        if lvl in self.attention_levels:
          h = attn(h, f"down{lvl}_attn{i}")
        skips.append(h)
      if lvl < len(self.channel_mults) - 1:
        h = layers.Conv3D(width, strides=(2, 2, 2), dtype=self.dtype,
                          name=f"downsample{lvl}")(h)
        skips.append(h)

    mid = self.base_width * self.channel_mults[-1]
    h = block(h, mid, "mid0")
    if (len(self.channel_mults) - 1) in self.attention_levels:
      h = attn(h, "mid_attn")
    h = block(h, mid, "mid1")

    for lvl in reversed(range(len(self.channel_mults))):
      width = self.base_width * self.channel_mults[lvl]
      for i in range(self.num_res_blocks + 1):
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), width, f"up{lvl}_{i}")
        if lvl in self.attention_levels:
          h = attn(h, f"up{lvl}_attn{i}")
      if lvl > 0:
        h = layers.upsample_nearest(h, 2)
        h = layers.Conv3D(width, dtype=self.dtype, name=f"upsample{lvl}")(h)

    h = nn.silu(layers.group_norm(h.shape[-1], self.groups, self.dtype, "out_norm")(h))
    out = layers.Conv3D(self.out_channels, dtype=self.dtype, name="out")(h)
    return out.astype(jnp.float32)
