"""Pixel puzzle: a reversible 3D space-to-depth operator.

From "PPDM: Pixel Puzzling Diffusion Model for Speed and Memory Efficient Volumetric Medical Image
Translation" (2026). A volume of shape (B, D, H, W, C) becomes (B, D/r0, H/r1, W/r2, C*r0*r1*r2):
voxel (d, h, w) goes to cell (d//r0, h//r1, w//r2) at channel offset (d%r0, h%r1, w%r2). Put
differently, the r0*r1*r2 strided sub-volumes x[i::r0, j::r1, k::r2] are stacked as channels, so
every piece still covers the whole field of view. Only reshapes and transposes: zero FLOPs.

Channel layout of the puzzled array: index = ((i * r1 + j) * r2 + k) * C + c.
Shapes that are not divisible by the factor are padded at the end of each axis and cropped back by
`unpuzzle`; nothing is ever resized.
"""

from collections.abc import Sequence

import jax.numpy as jnp

Factor = int | Sequence[int]


def as_factor(factor: Factor) -> tuple[int, int, int]:
  """Normalises an int or a 3-sequence into a per-axis factor, validating it."""
  f = (factor,) * 3 if isinstance(factor, int) else tuple(int(v) for v in factor)
  if len(f) == 1:  # "(4,)", as a command-line override gives it: isotropic
    f = f * 3
  if len(f) != 3 or any(v < 1 for v in f):
    raise ValueError(f"puzzle factor must be a positive int or 3 positive ints, got {factor!r}")
  return f


def padded_shape(spatial: Sequence[int], factor: Factor) -> tuple[int, int, int]:
  """Spatial shape after padding each axis up to a multiple of its factor."""
  f = as_factor(factor)
  return tuple(-(-int(s) // r) * r for s, r in zip(spatial, f))


def pad_to_multiple(x, multiple: Factor, mode: str = "edge"):
  """Pads the spatial axes of (B, D, H, W, C) at their end up to a multiple per axis."""
  target = padded_shape(x.shape[1:4], multiple)
  pads = [(0, 0)] + [(0, t - s) for s, t in zip(x.shape[1:4], target)] + [(0, 0)]
  if all(p == (0, 0) for p in pads):
    return x
  return jnp.pad(x, pads, mode=mode)


def puzzle(x, factor: Factor, pad_mode: str = "edge"):
  """(B, D, H, W, C) -> (B, D/r0, H/r1, W/r2, C*r0*r1*r2); pads non-divisible axes first."""
  if x.ndim != 5:
    raise ValueError(f"puzzle expects (B, D, H, W, C), got shape {x.shape}")
  r0, r1, r2 = as_factor(factor)
  x = pad_to_multiple(x, (r0, r1, r2), pad_mode)
  b, d, h, w, c = x.shape
  x = x.reshape(b, d // r0, r0, h // r1, r1, w // r2, r2, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, d // r0, h // r1, w // r2, r0 * r1 * r2 * c)


def unpuzzle(y, factor: Factor, spatial_shape: Sequence[int] | None = None):
  """Exact inverse of `puzzle`; crops back to `spatial_shape` when the input was padded."""
  if y.ndim != 5:
    raise ValueError(f"unpuzzle expects (B, d, h, w, C*r^3), got shape {y.shape}")
  r0, r1, r2 = as_factor(factor)
  b, d, h, w, cr = y.shape
  n = r0 * r1 * r2
  if cr % n:
    raise ValueError(f"channel count {cr} is not a multiple of the puzzle size {n} ({r0},{r1},{r2})")
  c = cr // n
  x = y.reshape(b, d, h, w, r0, r1, r2, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  x = x.reshape(b, d * r0, h * r1, w * r2, c)
  if spatial_shape is not None:
    sd, sh, sw = (int(s) for s in spatial_shape)
    if sd > d * r0 or sh > h * r1 or sw > w * r2:
      raise ValueError(f"cannot crop {x.shape[1:4]} to larger shape {tuple(spatial_shape)}")
    x = x[:, :sd, :sh, :sw]
  return x
