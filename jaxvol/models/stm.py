"""STM: structure-aware trajectory modulation of the time embedding.

"Structure-adaptive sparse diffusion for 3D medical image enhancement" (MICCAI 2026). A small
encoder maps the degraded input patch to a structure code; in every ResBlock a zero-initialised
two-layer MLP turns the code into (gamma, beta) and the time embedding becomes
emb * (1 + gamma) + beta (layers.Modulation). At initialisation gamma = beta = 0, so a network with STM computes
exactly what the same network without it computes.

Two layouts of the encoder (`StructureEncoder.layout`):

"jaxvol" (default; SAME padding so any patch size >= 1 works):
  3D branch: conv 4^3 stride 4 (-> 32), SiLU, conv 4^3 stride 4 (-> 64), SiLU, conv 3^3 stride 3
    (-> 96), GroupNorm + SiLU, global average pool -> 96;
  two 2D branches on the mean projections along the first two (in-plane, RAS x and y) axes: conv
    4^2 stride 4 (-> 16), SiLU, conv 4^2 stride 4 (-> 16), SiLU, global average pool -> 16 each;
  concat (128) -> Dense(code_dim) -> SiLU.

"authors" (the authors' `HybridCondEncoder`, mirthAI/sparse-3d-diffusion): the same convolutions,
  unpadded (VALID), EACH followed by GroupNorm + SiLU (8 groups after the 3D convs, 4 after the 2D
  ones, eps 1e-5). Their tensors are (B, C, D, H, W) and ours (B, D, H, W, C) with D, H, W in the
  same order, and their 2D branches average over their H axis ("coronal") and then over their W
  axis ("sagittal"): here axes 2 and 3 of (B, D, H, W, C), in that order. (For arrays stored
  (z, y, x), as SimpleITK reads them, those are the anatomical coronal and sagittal projections;
  a RAS (x, y, z) volume has them along its axes 2 and 1, so a volume must be transposed to
  (z, y, x) for their released weights to see what they were trained on.) Unpadded, the 3D branch
  needs >= 4 * 4 * 3 = 48 voxels per axis (128^3 -> 32 -> 8 -> 2^3 before pooling); a smaller
  patch (our CPU variants) is first padded at its far end with -1, as their data loader pads
  patches that overrun a volume.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxvol.models import layers

LAYOUTS = ("jaxvol", "authors")
AUTHORS_MIN_SIZE = 48  # 4 * 4 * 3: the unpadded 3D branch's smallest input
AUTHORS_PAD_VALUE = -1.0


class StructureEncoder(nn.Module):
  """(B, D, H, W, C) degraded patch -> (B, code_dim) structure code."""

  code_dim: int = 128
  dtype: jnp.dtype = jnp.float32
  layout: str = "jaxvol"

  @nn.compact
  def __call__(self, y):
    if self.layout not in LAYOUTS:
      raise ValueError(f"unknown STM encoder layout {self.layout!r}: use one of {LAYOUTS}")
    if y.ndim != 5:
      raise ValueError(f"StructureEncoder expects (B, D, H, W, C), got {y.shape}")
    y = y.astype(self.dtype)
    if self.layout == "authors":
      return self._authors(y)
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

  def _authors(self, y):
    short = [max(0, AUTHORS_MIN_SIZE - s) for s in y.shape[1:4]]
    if any(short):
      y = jnp.pad(y, [(0, 0)] + [(0, p) for p in short] + [(0, 0)],
                  constant_values=AUTHORS_PAD_VALUE)

    def block(h, c, k, groups, name):
      n = h.ndim - 2  # kernel = stride: non-overlapping k^n cells
      h = nn.Conv(c, (k,) * n, strides=(k,) * n, padding="VALID", dtype=self.dtype, name=name)(h)
      norm = nn.GroupNorm(num_groups=groups, epsilon=1e-5, use_fast_variance=False,
                          dtype=self.dtype, name=f"{name}_norm")
      return nn.silu(norm(h))

    h = block(y, 32, 4, 8, "vol0")
    h = block(h, 64, 4, 8, "vol1")
    h = block(h, 96, 3, 8, "vol2")
    feats = [jnp.mean(h, axis=(1, 2, 3))]
    for axis, name in ((2, "coronal"), (3, "sagittal")):
      p = jnp.mean(y, axis=axis)  # (B, D, W, C) then (B, D, H, C)
      p = block(p, 16, 4, 4, f"{name}0")
      p = block(p, 16, 4, 4, f"{name}1")
      feats.append(jnp.mean(p, axis=(1, 2)))
    code = nn.Dense(self.code_dim, dtype=self.dtype, name="code")(jnp.concatenate(feats, -1))
    return nn.silu(code)
