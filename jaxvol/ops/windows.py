"""Sliding-window inference with Gaussian blending, usable inside a compiled sampling loop.

A network trained on patches is applied to a larger volume as overlapping windows whose outputs
are blended with a Gaussian importance map (the window centre counts most), as in the patch-based
inference of nnU-Net (Isensee et al., "nnU-Net", Nature Methods 2021). The blending weights are
divided by their sum over all windows covering a voxel, so at every voxel they form a partition of
unity: a model that returns its input reproduces the volume exactly, and no tile seams appear.

`SlidingWindow.__call__(fn, inputs, extras)` is pure JAX with static shapes, so a sampler calls it
at every step inside its `lax.scan`. Windows of all volumes of the batch are processed in groups of
`batch * n_devices` by one `lax.scan` (the network is compiled once, for one group); with a mesh,
each group is sharded over the mesh's devices along `axis`. The window grid and blending weights
depend only on shapes, and every window is computed by the same per-example network, so the
result does not depend on the number of devices.

An optional integer `offset` (a traced (3,) vector, e.g. drawn per sampling step) shifts the whole
window grid by offset mod window voxels, so the tile borders move between steps (the random shifts
of patch-based priors). The volume is edge-padded by one window per side, a window-longer block
starting `offset` voxels before the volume is windowed (static shape, dynamic start), and the
volume's part of the blended result is cut back out: no wrap-around, the partition of unity still
holds, at the cost of windows over (size + window) voxels per axis.

Gradients through the blend (posterior-sampling solvers) recompute each group's network pass in
the backward sweep (`jax.checkpoint`), so their memory stays that of one group of windows.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def as_triple(v, name: str) -> tuple[int, int, int]:
  t = (v,) * 3 if isinstance(v, int) else tuple(int(a) for a in v)
  if len(t) != 3 or any(a < 1 for a in t):
    raise ValueError(f"{name} must be a positive int or 3 positive ints, got {v!r}")
  return t


def window_starts(size: int, window: int, overlap: float) -> np.ndarray:
  """Start indices of windows of length `window` covering [0, size) with about `overlap` overlap.

  The first window starts at 0, the last ends at `size`, and the starts are evenly spread, so the
  stride is at most window * (1 - overlap). `size` must be >= `window`.
  """
  if size < window:
    raise ValueError(f"size {size} is smaller than the window {window}")
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  stride = max(1, int(window * (1.0 - overlap)))
  n = 1 + math.ceil((size - window) / stride)
  return np.round(np.linspace(0, size - window, n)).astype(np.int32)


def gaussian_weights(window: Sequence[int], sigma_scale: float = 0.125,
                     min_weight: float = 1e-3) -> np.ndarray:
  """Separable Gaussian importance map of shape `window`, peak 1, sigma = sigma_scale * size.

  Values are clamped below at `min_weight` so every voxel of a window keeps a positive weight.
  `sigma_scale <= 0` gives uniform weights (plain averaging of overlaps).
  """
  out = np.ones(tuple(window), np.float64)
  if sigma_scale > 0:
    for axis, n in enumerate(window):
      c = (n - 1) / 2.0
      g = np.exp(-0.5 * ((np.arange(n) - c) / (sigma_scale * n)) ** 2)
      shape = [1, 1, 1]
      shape[axis] = n
      out = out * g.reshape(shape)
    out = np.maximum(out / out.max(), min_weight)
  return out.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SlidingWindow:
  """Overlapping-window evaluation of a per-window function over (B, D, H, W, C) volumes.

  Attributes:
    window: window size per axis (voxels of the arrays passed in).
    overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
    sigma_scale: Gaussian sigma as a fraction of the window size; <= 0 for uniform weights.
    batch: windows per device in one network call.
    mesh: optional mesh; each group of windows is sharded over `axis` of it.
    axis: mesh axis name (or tuple of names) the window groups are split over.
  """

  window: tuple[int, int, int]
  overlap: float = 0.5
  sigma_scale: float = 0.125
  batch: int = 1
  mesh: jax.sharding.Mesh | None = None
  axis: str | tuple[str, ...] = "windows"

  def __post_init__(self):
    object.__setattr__(self, "window", as_triple(self.window, "window"))
    if self.batch < 1:
      raise ValueError(f"batch must be >= 1, got {self.batch}")
    if not 0.0 <= self.overlap < 1.0:
      raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")

  @property
  def n_devices(self) -> int:
    if self.mesh is None:
      return 1
    names = (self.axis,) if isinstance(self.axis, str) else tuple(self.axis)
    return int(np.prod([self.mesh.shape[a] for a in names]))

  def grid(self, spatial: Sequence[int]) -> np.ndarray:
    """(N, 3) window starts covering a volume of this spatial shape (padded up to the window)."""
    padded = [max(s, w) for s, w in zip(spatial, self.window)]
    per_axis = [window_starts(s, w, self.overlap) for s, w in zip(padded, self.window)]
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1).astype(np.int32)

  def num_windows(self, spatial: Sequence[int]) -> int:
    return int(self.grid(spatial).shape[0])

  def weight_sum(self, spatial: Sequence[int]) -> jax.Array:
    """Sum over windows of the blending weights at every voxel of the (padded) volume."""
    starts = jnp.asarray(self.grid(spatial))
    padded = tuple(max(s, w) for s, w in zip(spatial, self.window))
    wmap = jnp.asarray(gaussian_weights(self.window, self.sigma_scale))

    def add(i, acc):
      s = starts[i]
      cur = jax.lax.dynamic_slice(acc, (s[0], s[1], s[2]), self.window)
      return jax.lax.dynamic_update_slice(acc, cur + wmap, (s[0], s[1], s[2]))

    return jax.lax.fori_loop(0, starts.shape[0], add, jnp.zeros(padded, jnp.float32))

  def __call__(self, fn: Callable, inputs: Sequence[jax.Array], extras: Sequence[jax.Array] = (),
               offset: jax.Array | None = None) -> jax.Array:
    """Blends fn over all windows of `inputs`.

    Args:
      fn: (*windows, *extras) -> (n, wd, wh, ww, C_out), where windows[i] is (n, wd, wh, ww, C_i)
        cut from inputs[i] at the same place and extras[j] is (n, ...) taken from the per-volume
        extras[j] of the window's volume. It must treat the n windows independently.
      inputs: (B, D, H, W, C_i) arrays with one spatial shape.
      extras: per-volume (B, ...) arrays, e.g. the timestep vector.
      offset: optional (3,) int shift of the window grid (see the module docstring).

    Returns:
      (B, D, H, W, C_out) float32, the blended outputs.
    """
    inputs = list(inputs)
    b = inputs[0].shape[0]
    spatial = tuple(inputs[0].shape[1:4])
    for x in inputs:
      if x.ndim != 5 or x.shape[:4] != inputs[0].shape[:4]:
        raise ValueError(f"inputs must share (B, D, H, W); got {[x.shape for x in inputs]}")
    if offset is not None:
      return self._shifted(fn, inputs, extras, offset)
    padded = tuple(max(s, w) for s, w in zip(spatial, self.window))
    if padded != spatial:
      pad = [(0, 0)] + [(0, p - s) for p, s in zip(padded, spatial)] + [(0, 0)]
      inputs = [jnp.pad(x, pad, mode="edge") for x in inputs]

    starts = self.grid(spatial)
    n_items = starts.shape[0] * b
    group = self.batch * self.n_devices
    n_groups = -(-n_items // group)
    # Item k is window k // B of volume k % B; padding items repeat the last one with weight 0.
    item = np.minimum(np.arange(n_groups * group), n_items - 1)
    valid = (np.arange(n_groups * group) < n_items).astype(np.float32)
    item_starts = jnp.asarray(starts[item // b].reshape(n_groups, group, 3))
    item_vol = jnp.asarray((item % b).reshape(n_groups, group).astype(np.int32))
    item_valid = jnp.asarray(valid.reshape(n_groups, group))
    wmap = jnp.asarray(gaussian_weights(self.window, self.sigma_scale))[..., None]
    sharding = None
    if self.mesh is not None and self.n_devices > 1:
      sharding = NamedSharding(self.mesh, P(self.axis))

    def cut(x, vol, s):
      idx = (vol, s[0], s[1], s[2], 0)
      return jax.lax.dynamic_slice(x, idx, (1,) + self.window + (x.shape[-1],))[0]

    def run_group(acc, g):
      s_g, v_g, ok_g = g
      wins = [jax.vmap(cut, in_axes=(None, 0, 0))(x, v_g, s_g) for x in inputs]
      ext = [e[v_g] for e in extras]
      if sharding is not None:
        wins = [jax.lax.with_sharding_constraint(w, sharding) for w in wins]
        ext = [jax.lax.with_sharding_constraint(e, sharding) for e in ext]
      # Rematerialised: differentiating through the window scan (DPS's likelihood gradient) then
      # keeps only each group's windows, recomputing one group's activations at a time, instead
      # of every window's activations at once (more than the whole volume's). No cost without
      # differentiation.
      out = jax.checkpoint(fn)(*wins, *ext).astype(jnp.float32)
      if out.shape[:4] != (group,) + self.window:
        raise ValueError(f"fn returned {out.shape}, expected ({group}, *{self.window}, C)")

      def add(i, acc):
        idx = (v_g[i], s_g[i, 0], s_g[i, 1], s_g[i, 2], 0)
        size = (1,) + self.window + (acc.shape[-1],)
        cur = jax.lax.dynamic_slice(acc, idx, size)
        return jax.lax.dynamic_update_slice(acc, cur + (ok_g[i] * wmap * out[i])[None], idx)

      return jax.lax.fori_loop(0, group, add, acc), None

    c_out = jax.eval_shape(
        lambda: fn(*[jnp.zeros((group,) + self.window + (x.shape[-1],), x.dtype) for x in inputs],
                   *[jnp.zeros((group,) + e.shape[1:], e.dtype) for e in extras])).shape[-1]
    acc0 = jnp.zeros((b,) + padded + (c_out,), jnp.float32)
    acc, _ = jax.lax.scan(run_group, acc0, (item_starts, item_vol, item_valid))
    out = acc / self.weight_sum(spatial)[None, ..., None]
    return out[:, :spatial[0], :spatial[1], :spatial[2]]

  def _shifted(self, fn, inputs, extras, offset):
    """The grid shifted by offset mod window (see the module docstring)."""
    b = inputs[0].shape[0]
    spatial = tuple(inputs[0].shape[1:4])
    w = jnp.asarray(self.window, jnp.int32)
    o = jnp.mod(jnp.asarray(offset, jnp.int32), w)
    start = w - o  # block index k holds volume index k - o
    size = tuple(s + wi for s, wi in zip(spatial, self.window))
    pads = [(0, 0)] + [(wi, wi) for wi in self.window] + [(0, 0)]
    blocks = [jax.lax.dynamic_slice(jnp.pad(x, pads, mode="edge"),
                                    (0, start[0], start[1], start[2], 0),
                                    (b,) + size + (x.shape[-1],)) for x in inputs]
    out = self(fn, blocks, extras)
    return jax.lax.dynamic_slice(out, (0, o[0], o[1], o[2], 0), (b,) + spatial + (out.shape[-1],))


def local_mesh(axis: str = "windows") -> jax.sharding.Mesh:
  """A 1D mesh over this process's devices, for spreading windows over them."""
  return jax.sharding.Mesh(np.array(jax.local_devices()), (axis,))
