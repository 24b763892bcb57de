"""STM: structure-aware trajectory modulation of the time embedding.

"Structure-adaptive sparse diffusion for 3D medical image enhancement" (MICCAI 2026). A small
encoder maps the degraded input patch to a structure code; in every ResBlock a zero-initialised
two-layer MLP turns the code into (gamma, beta) and the time embedding becomes
emb * (1 + gamma) + beta (layers.Modulation). At initialisation gamma = beta = 0, so a network with STM computes
exactly what the same network without it computes.

Encoder (sizes from the paper's code; SAME padding so any patch size >= 1 works):
  3D branch: conv 4^3 stride 4 (-> 32), SiLU, conv 4^3 stride 4 (-> 64), SiLU, conv 3^3 stride 3
    (-> 96), GroupNorm + SiLU, global average pool -> 96;
  two 2D branches on the mean projections along the first two (in-plane, RAS x and y) axes: conv
    4^2 stride 4 (-> 16), SiLU, conv 4^2 stride 4 (-> 16), SiLU, global average pool -> 16 each;
  concat (128) -> Dense(code_dim) -> SiLU.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxvol.models import layers


class StructureEncoder(nn.Module):
  """(B, D, H, W, C) degraded patch -> (B, code_dim) structure code."""

  code_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, y):
    y = y.astype(self.dtype)
    conv = lambda c, k, s, name: nn.Conv(c, k, strides=s, padding="SAME", dtype=self.dtype, name=name)
    h = nn.silu(conv(32, (4, 4, 4), (4, 4, 4), "vol0")(y))
    h = nn.silu(conv(64, (4, 4, 4), (4, 4, 4), "vol1")(h))
    h = conv(96, (3, 3, 3), (3, 3, 3), "vol2")(h)
    h = nn.silu(layers.group_norm(96, 8, self.dtype, "vol_norm")(h))
    feats = [jnp.mean(h, axis=(1, 2, 3))]
    for axis, name in ((1, "proj_x"), (2, "proj_y")):
      p = jnp.mean(y, axis=axis)  # (B, ., ., C) mean projection along one in-plane axis
      p = nn.silu(conv(16, (4, 4), (4, 4), f"{name}0")(p))
      p = nn.silu(conv(16, (4, 4), (4, 4), f"{name}1")(p))
      feats.append(jnp.mean(p, axis=(1, 2)))
    code = nn.Dense(self.code_dim, dtype=self.dtype, name="code")(jnp.concatenate(feats, -1))
    return nn.silu(code)
