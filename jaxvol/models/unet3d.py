"""A 3D diffusion U-Net in Flax linen.

The network of DDPM (Ho et al., 2020) in 3D, as used by the 3D medical diffusion literature
(PPDM, WDM, sparse voxel-space diffusion): ResBlocks with GroupNorm and a time embedding, strided
convolution down, nearest-neighbour up, self-attention at chosen levels. Everything is set from
config: widths (base width x multipliers), res blocks per level, attention levels and heads,
GroupNorm groups, dropout, time-embedding width, compute dtype and rematerialisation.

Two layouts (`UNet3D.layout`):
  "jaxvol" (default): ResBlocks scale and shift their second GroupNorm with the time embedding,
    the decoder mirrors the encoder's widths (base x mult at every block of a level), strided
    downsampling pads SAME ((0, 1) per axis), the output convolution is LeCun-initialised,
    GroupNorm eps 1e-6, attention in the middle block when the deepest level has attention.
  "authors": the network of the sparse-diffusion authors' code (mirthAI/sparse-3d-diffusion,
    `UNetModel` with `use_scale_shift_norm: False`, DESIGN.md 2.2): ResBlocks ADD the projected
    time embedding; the decoder is narrower: each decoder block outputs the width of the next skip
    it will be concatenated with (for 64 x (1, 1, 2, 2, 4), 2 blocks: 256/128/128 at the deepest
    level, 128/128/128, 128/64/64, then 64s), so it "pops two skips, pushes one"; strided
    downsampling pads symmetrically ((1, 1) per axis, PyTorch `padding=1`); the output
    convolution is zero-initialised; GroupNorm eps 1e-5 (two-pass variance); no attention in the
    middle block; the stem is base x mults[0] wide; the STM encoder is their `HybridCondEncoder`
    (jaxvol.models.stm) and STM's MLP is as wide as the time embedding.
    jaxvol.models.convert_sparse maps their PyTorch state dicts onto this layout.
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
  layout: str = "jaxvol"  # jaxvol | authors (module docstring)

  @property
  def divisor(self) -> int:
    return 2 ** (len(self.channel_mults) - 1)

  def encoder_widths(self) -> list[int]:
    """Widths of the encoder outputs kept as skips, in order (stem, blocks, downsamplings)."""
    stem = self.base_width * (self.channel_mults[0] if self.layout == "authors" else 1)
    widths = [stem]
    for lvl, mult in enumerate(self.channel_mults):
      widths += [self.base_width * mult] * self.num_res_blocks
      if lvl < len(self.channel_mults) - 1:
        widths.append(self.base_width * mult)
    return widths

  def decoder_widths(self) -> list[int]:
    """Output width of every decoder block, deepest level first ((num_res_blocks + 1) a level)."""
    if self.layout == "authors":
      skips = self.encoder_widths()
      return skips[-2::-1] + [skips[0]]
    return [self.base_width * self.channel_mults[lvl]
            for lvl in reversed(range(len(self.channel_mults)))
            for _ in range(self.num_res_blocks + 1)]

  @nn.compact
  def __call__(self, x, t, train: bool = False, structure=None):
    if x.ndim != 5:
      raise ValueError(f"UNet3D expects (B, D, H, W, C), got {x.shape}")
    if any(s % self.divisor for s in x.shape[1:4]):
      raise ValueError(f"spatial shape {x.shape[1:4]} must be divisible by {self.divisor}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {self.remat!r}: {sorted(REMAT_POLICIES)}")
    if self.layout not in stm_lib.LAYOUTS:
      raise ValueError(f"unknown U-Net layout {self.layout!r}: use one of {stm_lib.LAYOUTS}")
    authors = self.layout == "authors"
    eps = 1e-5 if authors else 1e-6
    block_cls = layers.ResBlock
    if self.remat != "none":
      block_cls = nn.remat(layers.ResBlock, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
    det = not train
    code = None
    if self.stm:
      if structure is None:
        raise ValueError("a UNet3D with stm=True needs the `structure` input")
      code = stm_lib.StructureEncoder(self.stm_dim, self.dtype, self.layout,
                                      name="stm_encoder")(structure)
    x = x.astype(self.dtype)
    emb = layers.timestep_embedding(t, self.base_width)
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="temb0")(emb)
    emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="temb1")(nn.silu(emb))

    def block(h, width, name):
      return block_cls(width, self.groups, self.dropout, self.dtype,
                       time_embedding="add" if authors else "scale_shift", epsilon=eps,
                       fast_variance=not authors,
                       stm_hidden=self.time_embed_dim if authors else 256,
                       name=name)(h, emb, det, code)

    def attn(h, name):
      return layers.SpatialAttention(self.num_heads, self.groups, self.dtype, epsilon=eps,
                                     fast_variance=not authors, name=name)(h)

    skip_widths = self.encoder_widths()
    h = layers.Conv3D(skip_widths[0], dtype=self.dtype, name="stem")(x)
    skips = [h]
    down_pad = ((1, 1),) * 3 if authors else "SAME"
    for lvl, mult in enumerate(self.channel_mults):
      width = self.base_width * mult
      for i in range(self.num_res_blocks):
        h = block(h, width, f"down{lvl}_{i}")
        if lvl in self.attention_levels:
          h = attn(h, f"down{lvl}_attn{i}")
        skips.append(h)
      if lvl < len(self.channel_mults) - 1:
        h = layers.Conv3D(width, strides=(2, 2, 2), dtype=self.dtype, padding=down_pad,
                          name=f"downsample{lvl}")(h)
        skips.append(h)

    mid = self.base_width * self.channel_mults[-1]
    h = block(h, mid, "mid0")
    if (len(self.channel_mults) - 1) in self.attention_levels and not authors:
      h = attn(h, "mid_attn")
    h = block(h, mid, "mid1")

    up_widths = iter(self.decoder_widths())
    for lvl in reversed(range(len(self.channel_mults))):
      for i in range(self.num_res_blocks + 1):
        width = next(up_widths)
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), width, f"up{lvl}_{i}")
        if lvl in self.attention_levels:
          h = attn(h, f"up{lvl}_attn{i}")
      if lvl > 0:
        h = layers.upsample_nearest(h, 2)
        h = layers.Conv3D(h.shape[-1], dtype=self.dtype, name=f"upsample{lvl}")(h)

    h = nn.silu(layers.group_norm(h.shape[-1], self.groups, self.dtype, "out_norm", eps,
                                  not authors)(h))
    out_init = nn.initializers.zeros if authors else nn.initializers.lecun_normal()
    out = layers.Conv3D(self.out_channels, dtype=self.dtype, kernel_init=out_init, name="out")(h)
    return out.astype(jnp.float32)
