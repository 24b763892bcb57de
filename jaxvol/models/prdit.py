"""PRDiT: a per-token local denoiser plus a global residual diffusion transformer on raw voxels.

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026),
checked output for output against the authors' code (Fredy-Zhang/PRDiT; the parity tests and
their fixtures are tests/test_authors_parity.py, the weight converter
jaxvol.models.convert_prdit). The volume is cut by the tokeniser (jaxvol.ops.tokens) into
overlapping p^3 windows at stride s, one token per s^3 block, and every token predicts its own
block of noise and of clean image (the (eps, x0) pair of jaxvol.diffusion.trig; with one output, the
block of velocity of flow matching, as PRDiT-FM trains the same network):

- Time: sinusoidal features (256) -> Dense(time_width) -> SiLU, shared by both stages and
  trained with stage 1. A "coarse head" Dense maps them to the local denoiser's token width; in
  stage 2 a separate "fine head" Dense maps the same (frozen) features to the DiT width. In the
  authors' models time_width is the DiT width (768 for size B), in stage 1 too.
- Stage 1, the local denoiser: a "blind" per-token MLP on the raw p^3 window:
  y = SwiGLU1(mod1(LN(x))), y = SwiGLU2(mod2(LN(y))), out = Dense(mod3(x + y)). The SwiGLU is
  silu(x Wg) * (x Wv) -> LayerNorm (with affine) -> Dense back. The read-out modulates the raw
  residual sum WITHOUT a LayerNorm: a norm there would make the output blind to a window's mean
  level, which is exactly the low-frequency content (air vs tissue) this stage is for. It sees
  only its window, so it learns the locally predictable part. Trained first.
- Stage 2, the residual DiT: an MLP patch embedding (GELU-tanh) plus a linear skip, LayerNorm,
  a fixed 3D sinusoidal position code of the token centres (see `position_code`), DiT blocks with
  adaLN-Zero and full global attention over all tokens (jaxvol.models.attention picks a
  memory-efficient kernel), and a zero-initialised read-out. Its output is added to the frozen
  stage-1 output: the transformer only models the residual.

Initialisation follows the authors: every Dense xavier-uniform with zero bias; the time layers
N(0, 0.02); adaLN modulations and both read-outs zero. The residual DiT's Dense layers use gain
`dit_init_gain` (0.1: the authors' stage-2 and warm-start runs re-initialise at that gain before
loading); the patch-embedding skip always uses 0.1. Both stages therefore start from a zero output,
and a fresh stage-2 model returns exactly the stage-1 prediction.

The parameter tree has two top-level entries, "local" (the time MLP, the coarse head and the
local denoiser) and "residual" (the fine head and the DiT, stage 2 only), so a trainer can copy
stage-1 weights under "local" and update only "residual". LAYOUT_VERSION numbers this layout
(saved with every run as config.prdit.layout); checkpoints of earlier layouts are refused with a
message naming the layout (jaxvol.train.checkpoint.check_same_model, and `layout_problem` on the
parameter names when another run's weights are copied).

Token order and layout (the converter relies on them): tokens run row-major over the
(D/s, H/s, W/s) grid, exactly the authors' unfold order when their (B, C, D, H, W) volume is our
(B, D, H, W, C); an output block is (s, s, s, 2C) channels last with eps in the first C channels,
as in their unpatchify. Inside an INPUT window our features are (p, p, p, C) channels last while
theirs are channel-major (C, p, p, p); for their one-channel models the two agree, and for C > 1
jaxvol.models.convert_prdit permutes the window axis of the affected weights.

Sharding: the residual DiT's large kernels carry logical axis names (`nn.with_logical_partitioning`:
"embed" for the model width, "mlp" and "heads" for the wide sides), so `init` returns them boxed
(`nn.Partitioned`; `nn.unbox` gives plain arrays) and jaxvol.parallel.sharding can shard them over
the mesh's "model" axis. Its token activations are constrained to TOKEN_AXES, whose "tokens" axis
follows the depth split of a spatially sharded volume. Without active rules both are inert.
"""

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvol.models import attention as attention_lib
from jaxvol.models.layers import timestep_embedding
from jaxvol.ops import tokens as tokens_lib

# (width, depth, heads) of the standard DiT sizes; XS is the authors' extra small size.
PRDIT_SIZES = {"XS": (192, 12, 6), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
               "XL": (1152, 28, 16)}

# Version of the parameter layout. 1: before the authors-parity rework (a LayerNorm on the
# stage-1 read-out, one fused SwiGLU input kernel without the hidden LayerNorm, a time MLP per
# stage, fixed position-code frequencies); 2: this module.
LAYOUT_VERSION = 2

# Paths that only layout-1 parameter trees contain ("local/time/hidden", ...).
_LAYOUT1_MARKERS = (("local", "time"), ("residual", "time"), ("local", "block0", "gate_value"))

TIME_FREQUENCIES = 256  # sinusoidal timestep features
POSITION_SAFETY = 0.95  # highest position frequency = 0.95 x the token grid's Nyquist frequency

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_time_init = nn.initializers.normal(0.02)

# Logical names of the residual DiT's (B, N, width) token activations.
TOKEN_AXES = ("batch", "tokens", "embed")


def xavier(gain: float):
  """PyTorch's xavier_uniform_ with `gain`: U(+-gain sqrt(6 / (fan_in + fan_out)))."""
  return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def _named(init, *axes):
  """`init` with logical names for the kernel's (input, output) axes."""
  return nn.with_logical_partitioning(init, axes)


def modulate(x, shift, scale):
  """adaLN: per-example scale and shift (B, C) applied to tokens (B, N, C)."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _plain_norm(dtype, name=None):
  """LayerNorm without its own affine (eps 1e-6): adaLN supplies scale and shift."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, use_fast_variance=False,
                      dtype=dtype, name=name)


def _affine_norm(dtype, name):
  """PyTorch's default LayerNorm: eps 1e-5, learnt scale and bias."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


def position_code(grid: Sequence[int], width: int) -> np.ndarray:
  """Fixed 3D sinusoidal code of the tokens of a (D/s, H/s, W/s) grid: (N, width) float32.

  Token centres are normalised coordinates (i + 0.5) / g in [0, 1] per axis, so a place keeps its
  coordinate at every resolution; the frequencies are not resolution-independent: per axis, F =
  width // 6 frequencies log-spaced from 1 to 0.95 g / 2 cycles per unit (just under the token
  grid's Nyquist frequency), so they grow with the grid, as in the authors' code. The code is
  [sin, cos] of 2 pi f c for the W axis, then the H axis, then the D axis (the W axis first, as
  theirs, whose coordinate triple is (x, y, z) = (W, H, D)); each block is F sines then F cosines.
  A non-cubic grid uses each axis's own g (the authors only use cubes). A width not divisible by 6
  is zero-padded at the end (the authors require divisibility).
  """
  grid = tuple(int(g) for g in grid)
  freqs_per_axis = width // 6
  if freqs_per_axis < 1:
    raise ValueError(f"the position code needs width >= 6, got {width}")
  if len(grid) != 3 or min(grid) < 1:
    raise ValueError(f"the position code needs a 3D token grid, got {grid}")
  step = np.linspace(0.0, 1.0, freqs_per_axis)
  parts = []
  for axis in (2, 1, 0):  # W, H, D
    g = grid[axis]
    coords = (np.arange(g) + 0.5) / g
    freqs = (POSITION_SAFETY * g / 2.0)**step * 2.0 * np.pi
    args = coords[:, None] * freqs[None]  # (g, F)
    shape = [1, 1, 1, 2 * freqs_per_axis]
    shape[axis] = g
    code = np.concatenate([np.sin(args), np.cos(args)], axis=-1).reshape(shape)
    parts.append(np.broadcast_to(code, grid + (2 * freqs_per_axis,)))
  code = np.concatenate(parts, axis=-1).reshape(-1, 6 * freqs_per_axis)
  return np.pad(code, ((0, 0), (0, width - code.shape[-1]))).astype(np.float32)


class SwiGLU(nn.Module):
  """silu(x Wg) * (x Wv) -> LayerNorm (learnt affine) -> Dense back to the input width.

  The hidden LayerNorm is part of the authors' block (timm's SwiGLU with a norm layer).
  """

  hidden: int
  init_gain: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, kernel_init=xavier(self.init_gain), dtype=self.dtype,
                                     name=name)
    h = nn.silu(dense(self.hidden, "gate")(x)) * dense(self.hidden, "value")(x)
    h = _affine_norm(self.dtype, "hidden_norm")(h)
    return dense(x.shape[-1], "out")(h)


class LocalDenoiser(nn.Module):
  """Stage 1 and the shared time MLP: tokens (B, N, p^3 C), t (B,) -> (out, time features).

  Returns the (B, N, out_features) prediction and the (B, time_width) shared time features that
  stage 2's fine head reads.

  Attributes:
    out_features: 2 s^3 C, the (eps, x0) block of each token.
    time_width: width of the shared time MLP (the authors: the DiT width).
    width: token width after a per-token Dense; None works on the raw p^3 C window directly
      (the paper's layout: 1,728 features for p = 12, C = 1).
    num_blocks: SwiGLU blocks, each under its own time-conditioned adaLN.
    mlp_ratio: SwiGLU hidden width / token width.
    dtype: computation dtype.
  """

  out_features: int
  time_width: int
  width: int | None = None
  num_blocks: int = 2
  mlp_ratio: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, t):
    features = nn.silu(nn.Dense(self.time_width, kernel_init=_time_init, dtype=self.dtype,
                                name="time_hidden")(timestep_embedding(t, TIME_FREQUENCIES)))
    if self.width is None:
      x = tokens.astype(self.dtype)
    else:
      x = nn.Dense(self.width, kernel_init=_xavier, dtype=self.dtype, name="embed")(tokens)
    w = x.shape[-1]
    emb = nn.Dense(w, kernel_init=_time_init, dtype=self.dtype, name="time_coarse")(features)
    # (shift, scale) per block and for the read-out; zero at init.
    mod = nn.Dense(2 * (self.num_blocks + 1) * w, kernel_init=_zeros, dtype=self.dtype,
                   name="modulation")(nn.silu(emb))
    mod = jnp.split(mod, 2 * (self.num_blocks + 1), axis=-1)
    y = x
    for i in range(self.num_blocks):
      y = modulate(_plain_norm(self.dtype)(y), mod[2 * i], mod[2 * i + 1])
      y = SwiGLU(int(w * self.mlp_ratio), dtype=self.dtype, name=f"block{i}")(y)
    # No normalisation of the residual sum: the read-out keeps the window's mean level.
    h = modulate(x + y, mod[-2], mod[-1])
    out = nn.Dense(self.out_features, kernel_init=_zeros, dtype=self.dtype, name="out")(h)
    return out, features


class Attention(nn.Module):
  """Multi-head self-attention: a fused qkv Dense (q, k, v then heads, as the authors' reshape),
  `jaxvol.models.attention.dot_product_attention` with the chosen backend, a "proj" Dense."""

  num_heads: int
  backend: str = "auto"
  chunk_size: int = 512
  init_gain: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention width {c} not divisible by {self.num_heads} heads")
    init = xavier(self.init_gain)
    qkv = nn.Dense(3 * c, kernel_init=_named(init, "embed", "heads"), dtype=self.dtype,
                   name="qkv")(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
    o = attention_lib.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                            backend=self.backend, chunk_size=self.chunk_size)
    return nn.Dense(c, kernel_init=_named(init, "heads", "embed"), dtype=self.dtype,
                    name="proj")(o.reshape(b, n, c))


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: gated global attention and a gated GELU(tanh) MLP.

  The six modulation vectors (shift, scale, gate for each branch) come from a zero-initialised
  Dense, so both gates start at zero and the block starts as the identity.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  chunk_size: int = 512
  init_gain: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    w = x.shape[-1]
    init = xavier(self.init_gain)
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        nn.Dense(6 * w, kernel_init=_named(_zeros, "embed", "mlp"), dtype=self.dtype,
                 name="modulation")(nn.silu(emb)), 6, axis=-1)
    h = modulate(_plain_norm(self.dtype)(x), shift1, scale1)
    h = Attention(self.num_heads, self.attention, self.chunk_size, self.init_gain, self.dtype,
                  name="attn")(h)
    x = x + gate1[:, None] * h
    h = modulate(_plain_norm(self.dtype)(x), shift2, scale2)
    h = nn.Dense(int(w * self.mlp_ratio), kernel_init=_named(init, "embed", "mlp"),
                 dtype=self.dtype, name="mlp_in")(h)
    h = nn.Dense(w, kernel_init=_named(init, "mlp", "embed"), dtype=self.dtype,
                 name="mlp_out")(nn.gelu(h, approximate=True))
    return nn.with_logical_constraint(x + gate2[:, None] * h, TOKEN_AXES)


class ResidualDiT(nn.Module):
  """Stage 2: tokens (B, N, p^3 C), shared time features (B, time_width), token grid -> (B, N, out).

  Attributes:
    out_features: 2 s^3 C, the (eps, x0) residual block of each token.
    width, depth, num_heads, mlp_ratio: the transformer's size.
    attention, chunk_size: attention backend and chunk length (jaxvol.models.attention).
    remat: "none", "full", "dots" or "dots_saveable": rematerialisation of each block.
    init_gain: xavier gain of the DiT's Dense layers (the embedding skip always uses 0.1).
    dtype: computation dtype.
  """

  out_features: int
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  attention: str = "auto"
  chunk_size: int = 512
  remat: str = "none"
  init_gain: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, time_features, grid):
    if self.width % self.num_heads:
      raise ValueError(f"residual DiT width {self.width} not divisible by {self.num_heads} heads")
    emb = nn.Dense(self.width, kernel_init=_time_init, dtype=self.dtype,
                   name="time_fine")(time_features)
    dense = lambda n, name, axes, gain, **kw: nn.Dense(
        n, kernel_init=_named(xavier(gain), *axes), dtype=self.dtype, name=name, **kw)
    # Only the wide side of the embedding is sharded; the raw p^3 C window axis is not named.
    h = dense(int(self.width * self.mlp_ratio), "embed_in", (None, "mlp"), self.init_gain)(tokens)
    h = dense(self.width, "embed_out", ("mlp", "embed"), self.init_gain)(
        nn.gelu(h, approximate=True))
    # The linear skip keeps a direct route from raw voxel values to the token features.
    h = h + dense(self.width, "embed_skip", (None, "embed"), 0.1, use_bias=False)(tokens)
    h = _affine_norm(self.dtype, "embed_norm")(h)
    h = h + jnp.asarray(position_code(grid, self.width), h.dtype)[None]
    h = nn.with_logical_constraint(h, TOKEN_AXES)
    policy = attention_lib.remat_policy(self.remat)
    block = DiTBlock if policy is None else nn.remat(DiTBlock, policy=policy)
    for i in range(self.depth):
      h = block(self.num_heads, self.mlp_ratio, self.attention, self.chunk_size, self.init_gain,
                self.dtype, name=f"block{i}")(h, emb)
    shift, scale = jnp.split(nn.Dense(2 * self.width, kernel_init=_zeros, dtype=self.dtype,
                                      name="final_modulation")(nn.silu(emb)), 2, axis=-1)
    h = modulate(_plain_norm(self.dtype)(h), shift, scale)
    return nn.Dense(self.out_features, kernel_init=_zeros, dtype=self.dtype, name="out")(h)


class PRDiT(nn.Module):
  """The two-stage PRDiT denoiser: x_t (B, D, H, W, C), t (B,) -> (eps_hat, x0_hat), same shape.

  D, H and W must be multiples of `stride`; any such shape works with the same parameters.

  Attributes:
    patch: token window p (p >= stride, p - stride even).
    stride: token stride s, the edge of the block each token predicts.
    channels: C, channels of the volume.
    local_width: local denoiser width; None keeps the raw p^3 C window (the paper's layout).
    local_blocks: SwiGLU blocks of the local denoiser.
    local_mlp_ratio: SwiGLU hidden width / local width.
    width, depth, heads, mlp_ratio: residual DiT size (PRDIT_SIZES for the standard ones).
    time_width: width of the shared time MLP; None = `width` (the authors' choice, in stage 1
      too, so a stage-1 run must be configured with the DiT size of the stage 2 it feeds).
    attention, chunk_size: attention backend and chunk length of the residual DiT.
    remat: per-block rematerialisation policy of the residual DiT ("none", "full", "dots",
      "dots_saveable").
    dit_init_gain: xavier gain of the residual DiT's Dense layers (0.1, the authors').
    dtype: computation dtype; outputs are float32.
    stage: 1 (local denoiser only) or 2 (frozen local denoiser + residual DiT).
    outputs: 2 returns the (eps, x0) pair (PRDiT's learn_sigma head); 1 returns one (B, D, H, W,
      C) array, the velocity of flow matching (PRDiT-FM's `out_channels = in_channels`).
  """

  patch: int = tokens_lib.DEFAULT_PATCH
  stride: int = tokens_lib.DEFAULT_STRIDE
  channels: int = 1
  local_width: int | None = None
  local_blocks: int = 2
  local_mlp_ratio: float = 1.0
  width: int = 384
  depth: int = 12
  heads: int = 6
  mlp_ratio: float = 4.0
  time_width: int | None = None
  attention: str = "auto"
  chunk_size: int = 512
  remat: str = "none"
  dit_init_gain: float = 0.1
  dtype: jnp.dtype = jnp.float32
  stage: int = 1
  outputs: int = 2

  @nn.compact
  def __call__(self, x, t):
    if self.stage not in (1, 2):
      raise ValueError(f"PRDiT stage must be 1 or 2, got {self.stage}")
    if self.outputs not in (1, 2):
      raise ValueError(f"PRDiT outputs must be 2 (eps, x0) or 1 (a velocity), got {self.outputs}")
    if x.ndim != 5 or x.shape[-1] != self.channels:
      raise ValueError(f"PRDiT expects (B, D, H, W, {self.channels}), got {x.shape}")
    spatial = x.shape[1:4]
    tokens = tokens_lib.tokenize(x, self.patch, self.stride)
    out_features = self.outputs * self.stride**3 * self.channels
    out, features = LocalDenoiser(out_features, self.time_width or self.width, self.local_width,
                                  self.local_blocks, self.local_mlp_ratio, self.dtype,
                                  name="local")(tokens, t)
    out = out.astype(jnp.float32)
    if self.stage == 2:
      # Stage 1 is frozen: no gradient reaches "local" even if a trainer differentiates all params.
      out, features = jax.lax.stop_gradient(out), jax.lax.stop_gradient(features)
      out = out + ResidualDiT(
          out_features, self.width, self.depth, self.heads, self.mlp_ratio, self.attention,
          self.chunk_size, self.remat, self.dit_init_gain, self.dtype,
          name="residual")(tokens, features, tokens_lib.token_grid(spatial, self.stride)
                           ).astype(jnp.float32)
    vol = tokens_lib.untokenize(out, spatial, self.stride)  # (B, D, H, W, 2C): eps then x0
    if self.outputs == 1:
      return vol
    return vol[..., :self.channels], vol[..., self.channels:]


def layout_problem(paths) -> str | None:
  """Why a parameter tree (an iterable of path tuples) is not of this layout, or None.

  Recognises layout-1 trees by names that only they have. Paths may start with "params".
  """
  paths = [tuple(p[1:]) if p and p[0] == "params" else tuple(p) for p in paths]
  for marker in _LAYOUT1_MARKERS:
    if any(p[:len(marker)] == marker for p in paths):
      return (f"it holds PRDiT parameter layout 1 (it has {'/'.join(marker)}/...), written before "
              f"the authors-parity rework (layout {LAYOUT_VERSION}: no LayerNorm on the stage-1 "
              "read-out, a LayerNorm inside the SwiGLU, one shared time MLP, grid-dependent "
              "position frequencies). Those weights compute a different function and cannot be "
              "converted: retrain both stages with this version")
  return None


def prdit_from_name(name: str, **overrides) -> PRDiT:
  """A PRDiT from the paper's "SIZE/PATCH/DEPTH" name, e.g. "B/12/4" or "PRDiT-B/12/4".

  SIZE picks width and heads from PRDIT_SIZES, PATCH is the token window p, and the last number
  is the residual DiT's depth, as in the authors' configs ("B: 768, 12: patch size, 4: network
  depth"; LIDC uses B/12/4, and B/12/0 is the stage-1 run with no transformer). Without it the
  standard DiT depth of the size is used. The stage is 1 for depth 0 and 2 otherwise unless given
  in `overrides`, which set any other PRDiT field too.
  """
  m = re.fullmatch(r"(?:PRDiT-)?(XS|S|B|L|XL)/(\d+)(?:/(\d+))?", name.strip())
  if m is None:
    raise ValueError(f"PRDiT name {name!r} is not SIZE/PATCH[/DEPTH] with SIZE in "
                     f"{sorted(PRDIT_SIZES)}, e.g. 'B/12/4'")
  width, depth, heads = PRDIT_SIZES[m.group(1)]
  if m.group(3) is not None:
    depth = int(m.group(3))
  fields = {"width": width, "depth": depth, "heads": heads, "patch": int(m.group(2)),
            "stage": 1 if depth == 0 else 2}
  fields.update(overrides)
  tokens_lib.check_patch(fields["patch"], fields.get("stride", tokens_lib.DEFAULT_STRIDE))
  return PRDiT(**fields)
