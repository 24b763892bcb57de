"""Orthonormal 3D Haar wavelet transform, one level.

Used by the wavelet-domain diffusion baseline (WDM: "WDM: 3D Wavelet Diffusion Models for
High-Resolution Medical Image Synthesis", Friedrich et al., 2024): (B, D, H, W, C) becomes the 8
sub-bands at half resolution, (B, D/2, H/2, W/2, 8C), low-pass (LLL) first. Implemented as a 2x
pixel puzzle followed by an orthogonal 8x8 mix of the pieces, so the inverse is the transpose.
"""

import numpy as np
import jax.numpy as jnp

from jaxvol.ops import puzzle as puzzle_lib


def _haar_matrix() -> np.ndarray:
  h = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
  return np.kron(np.kron(h, h), h)  # rows: sub-bands (LLL first), columns: puzzle offsets (i,j,k)


_H8 = _haar_matrix()


def dwt3(x, pad_mode: str = "edge"):
  """(B, D, H, W, C) -> (B, D/2, H/2, W/2, 8C) sub-band channels, band-major: index = band*C + c."""
  p = puzzle_lib.puzzle(x, 2, pad_mode)
  b, d, h, w, c8 = p.shape
  p = p.reshape(b, d, h, w, 8, c8 // 8)
  out = jnp.einsum("sp,bdhwpc->bdhwsc", jnp.asarray(_H8, p.dtype), p)
  return out.reshape(b, d, h, w, c8)


def idwt3(y, spatial_shape=None):
  """Inverse of `dwt3`; crops to `spatial_shape` when the forward transform padded."""
  b, d, h, w, c8 = y.shape
  if c8 % 8:
    raise ValueError(f"idwt3 expects 8*C channels, got {c8}")
  y = y.reshape(b, d, h, w, 8, c8 // 8)
  p = jnp.einsum("sp,bdhwsc->bdhwpc", jnp.asarray(_H8, y.dtype), y)
  return puzzle_lib.unpuzzle(p.reshape(b, d, h, w, c8), 2, spatial_shape)
