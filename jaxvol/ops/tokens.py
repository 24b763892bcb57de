"""PRDiT tokeniser: overlapping p^3 windows in, non-overlapping s^3 blocks out.

From "Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026).
A volume (B, D, H, W, C) is reflect-padded by (p - s) / 2 voxels per side and cut into windows of
p^3 voxels at stride s (p = 12, s = 8 in the paper), one token per s^3 block: token (i, j, k) sees
its own block plus a (p - s) / 2 voxel margin of context on every side, and predicts only its own
block. So D/s * H/s * W/s tokens: 512 at 64^3, 4,096 at 128^3, 32,768 at 256^3.

Token order is row-major over the (D/s, H/s, W/s) grid. Inside a token the features are laid out
row-major over (p, p, p, C), channels last; the same holds for the (s, s, s, C) blocks. The
authors' code (Fredy-Zhang/PRDiT) has the same token order and output blocks; its input windows
are channel-major, (C, p, p, p), which is the same for their one-channel volumes
(jaxvol.models.convert_prdit permutes weights for C > 1).

Windows are gathered with reshapes and contiguous slices only (no gather op), so the backward pass
is a pad-and-add rather than a scatter.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

DEFAULT_PATCH = 12
DEFAULT_STRIDE = 8


def check_patch(patch: int, stride: int = DEFAULT_STRIDE) -> int:
  """Validates a window size against the stride; returns the per-side margin (p - s) / 2."""
  if stride < 1:
    raise ValueError(f"token stride must be >= 1, got {stride}")
  if patch < stride or (patch - stride) % 2:
    raise ValueError(f"token window p={patch} must satisfy p >= stride ({stride}) and p - stride "
                     "even, so the window is centred on its block")
  return (patch - stride) // 2


def token_grid(spatial: Sequence[int], stride: int = DEFAULT_STRIDE) -> tuple[int, int, int]:
  """The (D/s, H/s, W/s) token grid of a spatial shape; every axis must be divisible by s."""
  spatial = tuple(int(v) for v in spatial)
  if len(spatial) != 3 or any(v < stride or v % stride for v in spatial):
    raise ValueError(f"spatial shape {spatial} must be 3 positive multiples of the token stride "
                     f"{stride}")
  return tuple(v // stride for v in spatial)


def num_tokens(spatial: Sequence[int], stride: int = DEFAULT_STRIDE) -> int:
  return int(np.prod(token_grid(spatial, stride)))


def token_coordinates(grid: Sequence[int]) -> np.ndarray:
  """(N, 3) centres (i + 0.5) / n of the tokens of a grid, in token order, in [0, 1].

  The same physical place gets the same coordinate at every resolution; these are the coordinates
  the residual DiT's position code encodes (jaxvol.models.prdit.position_code, whose frequencies
  do depend on the grid).
  """
  axes = [(np.arange(n, dtype=np.float32) + 0.5) / n for n in grid]
  mesh = np.meshgrid(*axes, indexing="ij")
  return np.stack([m.reshape(-1) for m in mesh], axis=-1)


def _unfold(x, axis: int, size: int, stride: int, count: int):
  """Windows of `size` at `stride` along `axis` -> a (count, size) pair of axes in its place.

  Writing size = q * stride + r, window i is blocks i .. i + q - 1 of the stride-blocked axis plus
  the first r entries of block i + q: q + 1 shifted contiguous slices, concatenated.
  """
  length = x.shape[axis]
  q, r = divmod(size, stride)
  blocks = count + q - (r == 0)
  extra = blocks * stride - length
  if extra > 0:  # only the unused tail of the last block; never read
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, extra)
    x = jnp.pad(x, pads)
  x = x.reshape(x.shape[:axis] + (blocks, stride) + x.shape[axis + 1:])
  pieces = [_slice(x, axis, j, j + count) for j in range(q)]
  if r:
    tail = _slice(x, axis, q, q + count)
    pieces.append(_slice(tail, axis + 1, 0, r))
  return jnp.concatenate(pieces, axis=axis + 1)


def _slice(x, axis: int, start: int, stop: int):
  index = [slice(None)] * x.ndim
  index[axis] = slice(start, stop)
  return x[tuple(index)]


def tokenize(x, patch: int = DEFAULT_PATCH, stride: int = DEFAULT_STRIDE):
  """(B, D, H, W, C) -> (B, N, p^3 C): reflect-padded overlapping windows, one per s^3 block."""
  if x.ndim != 5:
    raise ValueError(f"tokenize expects (B, D, H, W, C), got shape {x.shape}")
  margin = check_patch(patch, stride)
  grid = token_grid(x.shape[1:4], stride)
  if margin:
    if any(margin >= v for v in x.shape[1:4]):
      raise ValueError(f"reflect padding of {margin} needs every spatial axis longer than that, "
                       f"got {x.shape[1:4]}")
    x = jnp.pad(x, [(0, 0)] + [(margin, margin)] * 3 + [(0, 0)], mode="reflect")
  for a, n in enumerate(grid):  # each unfold inserts one axis before the next spatial one
    x = _unfold(x, 1 + 2 * a, patch, stride, n)
  b, c = x.shape[0], x.shape[-1]
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, int(np.prod(grid)), patch**3 * c)


def blockify(x, stride: int = DEFAULT_STRIDE):
  """(B, D, H, W, C) -> (B, N, s^3 C): the non-overlapping s^3 block split `untokenize` inverts."""
  if x.ndim != 5:
    raise ValueError(f"blockify expects (B, D, H, W, C), got shape {x.shape}")
  gd, gh, gw = token_grid(x.shape[1:4], stride)
  b, c = x.shape[0], x.shape[-1]
  x = x.reshape(b, gd, stride, gh, stride, gw, stride, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, gd * gh * gw, stride**3 * c)


def untokenize(blocks, spatial: Sequence[int], stride: int = DEFAULT_STRIDE):
  """(B, N, s^3 C) -> (B, D, H, W, C): each token's prediction written to its own s^3 block."""
  gd, gh, gw = token_grid(spatial, stride)
  b, n, f = blocks.shape
  if n != gd * gh * gw or f % stride**3:
    raise ValueError(f"blocks {blocks.shape} do not fit the {gd}x{gh}x{gw} token grid of "
                     f"{tuple(spatial)} at stride {stride}")
  c = f // stride**3
  x = blocks.reshape(b, gd, gh, gw, stride, stride, stride, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, gd * stride, gh * stride, gw * stride, c)
