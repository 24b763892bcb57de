"""Building blocks shared by the 3D networks: convolution, time embedding, GroupNorm, ResBlock,
attention."""

import contextlib
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxvol.models import attention

# Logical names of a (B, D, H, W, C) volume's axes; jaxvol.parallel.sharding maps them onto the mesh.
VOLUME_AXES = ("batch", "depth", "height", "width", "channels")


def constrain_volume(x):
  """Keeps a (B, D, H, W, C) array in the volume layout of the active logical axis rules.

  A no-op unless the rules are active (jaxvol.parallel.sharding.activated); there it pins, e.g., a
  sampling loop's carry to the depth-sharded layout instead of leaving it to propagation.
  """
  return nn.with_logical_constraint(x, VOLUME_AXES)


_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")


def _depth_split(shape, kernel_depth: int, stride: int, depth_pads):
  """(batch mesh axis, depth mesh axis, shards) when the active mesh and logical rules split the
  depth of a (B, D, H, W, C) input so that `conv3d_same` can exchange one-slice halos itself;
  None otherwise (no rules, depth not split, or a layout the halo path does not cover)."""
  if not nn.get_logical_axis_rules():
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = tuple(nn.logical_to_mesh_axes(VOLUME_AXES)) + (None,) * 5
  batch_axis, depth_axis = spec[0], spec[1]
  if not isinstance(depth_axis, str) or depth_axis not in mesh.axis_names:
    return None
  n = mesh.shape[depth_axis]
  if n == 1 or kernel_depth != 3 or shape[1] % (n * stride):
    return None
  if (stride, tuple(depth_pads)) not in ((1, (1, 1)), (2, (0, 1))):
    return None
  if not isinstance(batch_axis, str) or batch_axis not in mesh.axis_names or (
      shape[0] % mesh.shape[batch_axis]):
    batch_axis = None
  return batch_axis, depth_axis, n


def _xla_conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN3)


# How an unsplit 3D convolution is computed (`conv_implementation`).
CONV_ENV = "JAXVOL_CONV"
CONV_IMPLEMENTATIONS = ("auto", "xla", "folded")
_conv_choice = None  # `using_conv`'s choice, over the environment's


def conv_implementation() -> str:
  """"xla" or "folded": how `conv3d_same` and `Conv3D` compute a convolution that the mesh does
  not split, read when a function is traced.

  "folded" stacks the kernel's depth taps into channels (`folded_conv`): one 2D convolution over
  (batch x depth) slices. XLA's CPU backend runs 3D convolutions of a few channels several times
  slower than 2D ones, and this is the same sum (up to float summation order): 4-5x faster train
  steps at the `cpu` recipes' widths, for 1.3-1.6x the CPU temporary memory (the folded input is
  kept for the backward pass; experiments/conv_cpu.py measures both). "xla" is
  `lax.conv_general_dilated` as is. "auto" (the default) folds on the CPU backend only:
  accelerators run 3D convolutions natively. Chosen by `using_conv`, else the JAXVOL_CONV
  environment variable (set it before the process traces anything: JAX reuses traced programs).
  """
  choice = _conv_choice or os.environ.get(CONV_ENV, "auto") or "auto"
  if choice not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"{CONV_ENV}={choice!r}: expected one of {CONV_IMPLEMENTATIONS}")
  if choice == "auto":
    return "folded" if jax.default_backend() == "cpu" else "xla"
  return choice


@contextlib.contextmanager
def using_conv(choice: str):
  """Functions traced inside compute unsplit convolutions as `choice` (`conv_implementation`),
  e.g. "xla" to measure the compiled memory an accelerator's program would have. JAX's caches of
  traced and compiled functions are cleared on entry and exit, so nothing traced under the other
  choice is reused."""
  global _conv_choice
  if choice not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"conv implementation {choice!r}: expected one of {CONV_IMPLEMENTATIONS}")
  before, _conv_choice = _conv_choice, choice
  jax.clear_caches()
  try:
    yield
  finally:
    _conv_choice = before
    jax.clear_caches()


def folded_conv(x, kernel, strides, pads):
  """`_xla_conv` with the kernel's depth taps folded into channels: the kd depth-shifted (and
  depth-strided) copies of x are stacked on the channel axis, (B, D', H, W, kd Cin) becomes
  (B D', H, W, kd Cin), and one 2D convolution with the (kh, kw, kd Cin, Cout) kernel gives
  (B, D', H', W', Cout). The same products and sums as the 3D convolution, in another order."""
  b, d, h, w, c = x.shape
  kd, kh, kw, _, cout = kernel.shape
  (lo, hi), sd = pads[0], strides[0]
  out_d = (d + lo + hi - kd) // sd + 1
  xp = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
  taps = [lax.slice_in_dim(xp, i, i + sd * (out_d - 1) + 1, sd, axis=1) for i in range(kd)]
  col = (jnp.concatenate(taps, -1) if kd > 1 else taps[0]).reshape(b * out_d, h, w, kd * c)
  k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, cout)
  y = lax.conv_general_dilated(col, k2, strides[1:], pads[1:], dimension_numbers=_DN2)
  return y.reshape(b, out_d, *y.shape[1:])


def _depth_sharded() -> bool:
  """True when the active logical rules put a volume's depth on a mesh axis of more than one
  device (then depth stays a convolution axis: `folded_conv` would merge it into the batch)."""
  if not nn.get_logical_axis_rules():
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return False
  depth_axis = (tuple(nn.logical_to_mesh_axes(VOLUME_AXES)) + (None,) * 5)[1]
  axes = (depth_axis,) if isinstance(depth_axis, str) else tuple(depth_axis or ())
  return any(a in mesh.axis_names and mesh.shape[a] > 1 for a in axes)


def _conv(x, kernel, strides, pads):
  """An unsplit convolution, as `conv_implementation` says."""
  if conv_implementation() == "folded" and not _depth_sharded():
    return folded_conv(x, kernel, strides, pads)
  return _xla_conv(x, kernel, strides, pads)


def _halo_conv(x, kernel, strides, pads, split):
  """The forward pass of `conv3d_same` on a depth-split input (its docstring)."""
  batch_axis, depth_axis, n = split
  (lo, hi), hw_pads = pads[0], list(pads[1:])

  def local(xl, k):
    def add_tap(y, index, edge, tap):
      # Row `index` also sees one neighbour slice, through one depth tap of the kernel: a 2D
      # convolution of that slice, added in float32 (one more rounding than the other rows in
      # bfloat16, where a recomputed row would hold three slices and three 2D outputs instead).
      extra = lax.conv_general_dilated(edge, k[tap], strides[1:], hw_pads, dimension_numbers=_DN2,
                                       preferred_element_type=jnp.float32)
      if y.dtype == jnp.float32:
        return y.at[:, index].add(extra)
      return y.at[:, index].set((y[:, index].astype(jnp.float32) + extra).astype(y.dtype))

    y = lax.conv_general_dilated(xl, k, strides, [(lo, hi)] + hw_pads, dimension_numbers=_DN3)
    # The neighbours' edge slices (zeros past the volume's ends, as SAME padding gives).
    if lo:  # output row 0 also sees the last slice of the device above, through tap 0
      above = lax.ppermute(xl[:, -1], depth_axis, [(i, i + 1) for i in range(n - 1)])
      y = add_tap(y, 0, above, 0)
    if hi:  # the last output row sees the first slice of the device below, through tap s + lo
      below = lax.ppermute(xl[:, 0], depth_axis, [(i + 1, i) for i in range(n - 1)])
      y = add_tap(y, -1, below, strides[0] + lo)
    return y

  spec = P(batch_axis, depth_axis)
  return jax.shard_map(local, in_specs=(spec, P()), out_specs=spec)(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _split_conv(x, kernel, strides, pads, split):
  return _halo_conv(x, kernel, strides, pads, split)


def _split_conv_fwd(x, kernel, strides, pads, split):
  # Differentiated (training, DPS): XLA's partitioned convolution, forward and backward.
  del split
  return _xla_conv(x, kernel, strides, pads), (x, kernel)


def _split_conv_bwd(strides, pads, split, residuals, g):
  del split
  x, kernel = residuals
  return jax.vjp(lambda a, b: _xla_conv(a, b, strides, pads), x, kernel)[1](g)


_split_conv.defvjp(_split_conv_fwd, _split_conv_bwd)


def conv3d_same(x, kernel, strides=(1, 1, 1)):
  """'SAME' 3D convolution of (B, D, H, W, Cin) with a (kd, kh, kw, Cin, Cout) kernel.

  On one device, or when depth is not split, this is `lax.conv_general_dilated`, or on the CPU
  backend the same convolution with its depth taps folded into channels (`conv_implementation`).
  When the active
  mesh splits depth (jaxvol.parallel.sharding.activated; a 3-deep kernel at stride 1 or 2, depth
  divisible by shards x stride), the forward pass convolves each device's own slab with zero
  padding and adds the missing boundary terms itself: the neighbour's edge slice arrives by
  `ppermute` (one slice each way) and enters only through the kernel's first (or last) depth tap,
  as a 2D convolution of that one slice, added in place (in float32). XLA's own partitioning of the convolution instead builds a
  halo-extended copy of every input slab (D/N + 2 slices): an extra feature map at each layer of
  an inference peak (sampling: about 20% of the per-device bytes at 128^3). Under
  differentiation (training, DPS) the convolution is XLA's, forward and backward (a custom VJP):
  there the extended copies overlap with activations kept for the backward pass anyway, and the
  hand-made exchange measured 2-4% more train-step memory. The values are the plain
  convolution's up to float summation order. (Being a custom VJP, the split path supports
  reverse-mode differentiation only, not jax.jvp.)
  """
  s = tuple(int(v) for v in strides)
  pads = tuple(lax.padtype_to_pads(x.shape[1:4], kernel.shape[:3], s, "SAME"))
  split = _depth_split(x.shape, kernel.shape[0], s[0], pads[0])
  if split is None:
    return _conv(x, kernel, s, pads)
  return _split_conv(x, kernel, s, pads, split)


class Conv3D(nn.Module):
  """`nn.Conv(features, kernel_size, strides, padding="SAME")` for volumes, through `conv3d_same`.

  Same parameters ("kernel" (kd, kh, kw, Cin, Cout) with LeCun-normal init, "bias" zeros) and the
  same initial values as nn.Conv under the same name, so checkpoints carry over; under a mesh
  that splits depth it exchanges halos without copying whole slabs (`conv3d_same`).

  `padding` other than "SAME" is three explicit (low, high) pairs, e.g. ((1, 1),) * 3 for the
  symmetric padding of a PyTorch `Conv3d(..., stride=2, padding=1)` (SAME pads a stride-2 3^3
  convolution of an even axis by (0, 1)); that convolution exchanges no halos itself (a split
  depth is XLA's to partition).
  """
  features: int
  kernel_size: int | tuple[int, int, int] = (3, 3, 3)
  strides: tuple[int, int, int] = (1, 1, 1)
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  padding: Any = "SAME"

  @nn.compact
  def __call__(self, x):
    size = self.kernel_size
    size = (size,) * 3 if isinstance(size, int) else tuple(size)
    kernel = self.param("kernel", self.kernel_init, size + (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if isinstance(self.padding, str) and self.padding == "SAME":
      return conv3d_same(x, kernel, self.strides) + bias
    pads = tuple((int(lo), int(hi)) for lo, hi in self.padding)
    if len(pads) != 3:
      raise ValueError(f"Conv3D padding must be 'SAME' or 3 (low, high) pairs, got "
                       f"{self.padding!r}")
    return _conv(x, kernel, tuple(int(s) for s in self.strides), pads) + bias


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


def group_norm(channels: int, groups: int, dtype, name=None, epsilon: float = 1e-6,
               fast_variance: bool = True):
  """GroupNorm with the largest group count <= `groups` that divides `channels`.

  `epsilon` 1e-6 is Flax's default; PyTorch's GroupNorm (the sparse-diffusion authors' layout)
  uses 1e-5. `fast_variance=False` computes the variance as E[(x - mean)^2] (PyTorch's two-pass
  form) rather than E[x^2] - mean^2.
  """
  g = max(1, min(groups, channels))
  while channels % g:
    g -= 1
  return nn.GroupNorm(num_groups=g, epsilon=epsilon, dtype=dtype, use_fast_variance=fast_variance,
                      name=name)


class Modulation(nn.Module):
  """STM's zero-initialised MLP (jaxvol.models.stm): code -> (gamma, beta), emb * (1 + gamma) + beta.

  `hidden` is 256 in jaxvol's layout; the authors' code uses the time-embedding width (also 256 at
  the paper's size).
  """

  hidden: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb, code):
    h = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(code))
    gb = nn.Dense(2 * emb.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                  bias_init=nn.initializers.zeros, name="film")(h)
    gamma, beta = jnp.split(gb, 2, axis=-1)
    return emb * (1.0 + gamma) + beta


TIME_EMBEDDINGS = ("scale_shift", "add")


class ResBlock(nn.Module):
  """GN-SiLU-Conv, time embedding, GN-SiLU-Dropout-Conv (zero-initialised), residual (1x1 when
  widths differ).

  The time embedding enters as `time_embedding`:
    "scale_shift" (jaxvol's default): Dense(2 C)(SiLU(emb)) = (scale, shift) and the second norm
      becomes GN(h) * (1 + scale) + shift (guided diffusion's `use_scale_shift_norm=True`);
    "add": h + Dense(C)(SiLU(emb)) before the second norm (DDPM's original form, and the
      sparse-diffusion authors' `use_scale_shift_norm: False`).
  With a `structure` code (B, code_dim), the time embedding is first modulated by STM
  (`Modulation`, hidden width `stm_hidden`). `epsilon` and `fast_variance` are the GroupNorms'.
  """

  out_channels: int
  groups: int = 32
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  time_embedding: str = "scale_shift"
  epsilon: float = 1e-6
  fast_variance: bool = True
  stm_hidden: int = 256

  @nn.compact
  def __call__(self, x, emb, deterministic: bool, structure=None):
    if self.time_embedding not in TIME_EMBEDDINGS:
      raise ValueError(f"unknown time_embedding {self.time_embedding!r}: use one of "
                       f"{TIME_EMBEDDINGS}")
    if structure is not None:  # STM (jaxvol.models.stm): modulate the time embedding
      emb = Modulation(self.stm_hidden, dtype=self.dtype, name="stm")(emb, structure)
    norm = lambda c, name: group_norm(c, self.groups, self.dtype, name, self.epsilon,
                                      self.fast_variance)
    conv = lambda c, k, name: Conv3D(c, (k,) * 3, dtype=self.dtype, name=name)
    h = nn.silu(norm(x.shape[-1], "norm1")(x))
    h = conv(self.out_channels, 3, "conv1")(h)
    if self.time_embedding == "add":
      proj = nn.Dense(self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))
      h = norm(self.out_channels, "norm2")(h + proj[:, None, None, None, :])
    else:
      scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))
      scale, shift = jnp.split(scale_shift[:, None, None, None, :], 2, axis=-1)
      h = norm(self.out_channels, "norm2")(h) * (1.0 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = Conv3D(self.out_channels, (3,) * 3, dtype=self.dtype, kernel_init=nn.initializers.zeros,
               name="conv2")(h)
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
  epsilon: float = 1e-6  # the GroupNorm's
  fast_variance: bool = True

  @nn.compact
  def __call__(self, x):
    b, d, h, w, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention width {c} not divisible by {self.num_heads} heads")
    hd = c // self.num_heads
    y = group_norm(c, self.groups, self.dtype, "norm", self.epsilon, self.fast_variance)(x)
    y = y.reshape(b, d * h * w, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y).reshape(b, d * h * w, 3, self.num_heads, hd)
    o = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                        backend=self.backend)
    o = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out")(
        o.reshape(b, d * h * w, c))
    return x + o.reshape(b, d, h, w, c)


def torch_default_init(params, rng):
  """`params` redrawn as PyTorch initialises its layers (nn.Conv*d / nn.Linear reset_parameters:
  kaiming_uniform with a = sqrt(5), i.e. weight and bias uniform in +-1/sqrt(fan_in), fan_in =
  the kernel's size over its input axes); normalisation scales stay 1 and offsets 0, and a layer
  whose Flax initialisation is all zeros (the zero-initialised read-outs PyTorch code zeroes
  explicitly) stays zero, bias included. Every "kernel" leaf and the "bias" beside it are redrawn,
  each from its own fold of `rng`."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  by_path = {tuple(getattr(k, "key", k) for k in path): leaf for path, leaf in flat}
  out = {}
  for i, (path, leaf) in enumerate(sorted(by_path.items(), key=lambda kv: str(kv[0]))):
    *parent, name = path
    kernel = by_path.get((*parent, "kernel"))
    if name not in ("kernel", "bias") or kernel is None:
      out[path] = leaf
      continue
    bound = 1.0 / math.sqrt(max(1, math.prod(kernel.shape[:-1])))
    drawn = jax.random.uniform(jax.random.fold_in(rng, i), leaf.shape, leaf.dtype, -bound, bound)
    out[path] = jnp.where(jnp.any(kernel != 0), drawn, jnp.zeros_like(leaf))
  return _unflatten(out)


def _unflatten(flat: dict) -> dict:
  tree: dict = {}
  for path, leaf in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = leaf
  return tree
