"""PRDiT: a per-token local denoiser plus a global residual diffusion transformer on raw voxels.

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026). The
volume is cut by the tokeniser (jaxvol.ops.tokens) into overlapping p^3 windows at stride s, one
token per s^3 block, and every token predicts its own block of noise and of clean image (the
(eps, x0) pair of jaxvol.diffusion.trig):

- Stage 1, the local denoiser: a "blind" per-token MLP on the raw window (two SwiGLU blocks under
  time-conditioned adaLN, one residual around both, a final adaLN and a linear read-out). It sees
  only its window, so it learns the low-frequency, locally predictable part. Trained first.
- Stage 2, the residual DiT: an MLP patch embedding with a linear skip, a fixed 3D sinusoidal
  position code of the token centres in [0, 1]^3 (so one set of weights serves every resolution),
  DiT blocks with adaLN-Zero and full global attention over all tokens
  (jaxvol.models.attention picks a memory-efficient kernel), and a zero-initialised read-out. Its
  output is added to the frozen stage-1 output: the transformer only models the residual.

The parameter tree has two top-level entries, "local" and "residual" (the latter only in stage
2), so a trainer can warm-start stage 2 with stage-1 weights under "local" and update only
"residual". Both stages start from a zero output (zero-initialised read-outs and modulations);
stage 2 at initialisation therefore returns exactly the stage-1 prediction.

Sharding: the residual DiT's large kernels carry logical axis names (`nn.with_logical_partitioning`:
"embed" for the model width, "mlp" and "heads" for the wide sides), so `init` returns them boxed
(`nn.Partitioned`; `nn.unbox` gives plain arrays) and jaxvol.train.sharding can shard them over
the mesh's "model" axis. Its token activations are constrained to TOKEN_AXES, whose "tokens" axis
follows the depth split of a spatially sharded volume. Without active rules both are inert.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvol.models.attention import MultiHeadAttention, remat_policy
from jaxvol.models.layers import timestep_embedding
from jaxvol.ops import tokens as tokens_lib

# (width, depth, heads) of the standard DiT sizes.
PRDIT_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros

# Logical names of the residual DiT's (B, N, width) token activations.
TOKEN_AXES = ("batch", "tokens", "embed")


def _named(init, *axes):
  """`init` with logical names for the kernel's (input, output) axes."""
  return nn.with_logical_partitioning(init, axes)


def modulate(x, shift, scale):
  """adaLN: per-example scale and shift (B, C) applied to tokens (B, N, C)."""
  return x * (1.0 + scale[:, None]) + shift[:, None]


def _plain_norm(dtype, name=None):
  """LayerNorm without its own affine: adaLN supplies scale and shift."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


def position_code(coords, width: int, max_frequency: float = 32.0):
  """Fixed 3D sinusoidal code of token centres in [0, 1]^3: (N, 3) -> (N, width) float32.

  Each axis gets a third of the width (rounded down to an even count; the remainder is zero):
  sin and cos of pi f coord for F frequencies f log-spaced from 1 to `max_frequency` cycles per
  half unit. The lowest frequency is unique over the whole [0, 1] range; the highest separates
  neighbouring tokens up to max_frequency tokens per axis (256 voxels at stride 8). Coordinates,
  not token indices, so a given anatomical position keeps its code at every resolution.
  """
  freqs_per_axis = width // 6
  if freqs_per_axis < 1:
    raise ValueError(f"the position code needs width >= 6, got {width}")
  coords = jnp.asarray(coords, jnp.float32)
  exponent = np.arange(freqs_per_axis) / max(freqs_per_axis - 1, 1)
  freqs = jnp.asarray(math.pi * max_frequency**exponent, jnp.float32)
  args = coords[:, :, None] * freqs  # (N, 3, F)
  code = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1).reshape(coords.shape[0], -1)
  return jnp.pad(code, ((0, 0), (0, width - code.shape[-1])))


class TimeEmbedding(nn.Module):
  """Sinusoidal timestep features -> Dense-SiLU-Dense to `width`."""

  width: int
  frequency_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = timestep_embedding(t, self.frequency_dim)
    init = nn.initializers.normal(0.02)
    h = nn.silu(nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="hidden")(h))
    return nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="out")(h)


class SwiGLU(nn.Module):
  """silu(x W1) * (x W2), projected back to the input width."""

  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    a, b = jnp.split(nn.Dense(2 * self.hidden, kernel_init=_xavier, dtype=self.dtype,
                              name="gate_value")(x), 2, axis=-1)
    return nn.Dense(x.shape[-1], kernel_init=_xavier, dtype=self.dtype, name="out")(nn.silu(a) * b)


class LocalDenoiser(nn.Module):
  """Stage 1: the blind per-token MLP, (B, N, p^3 C) tokens and (B,) t -> (B, N, out_features).

  Attributes:
    out_features: 2 s^3 C, the (eps, x0) block of each token.
    width: token width after a per-token Dense; None works on the raw p^3 C window directly
      (the paper's layout: 1,728 features for p = 12, C = 1).
    num_blocks: SwiGLU blocks, each under its own time-conditioned adaLN.
    mlp_ratio: SwiGLU hidden width / token width.
    dtype: computation dtype.
  """

  out_features: int
  width: int | None = None
  num_blocks: int = 2
  mlp_ratio: float = 1.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, t):
    if self.width is None:
      h = tokens.astype(self.dtype)
    else:
      h = nn.Dense(self.width, kernel_init=_xavier, dtype=self.dtype, name="embed")(tokens)
    w = h.shape[-1]
    emb = TimeEmbedding(w, dtype=self.dtype, name="time")(t)
    # (shift, scale) per block and for the read-out; zero at init, so adaLN starts as plain norm.
    mod = nn.Dense(2 * (self.num_blocks + 1) * w, kernel_init=_zeros, dtype=self.dtype,
                   name="modulation")(nn.silu(emb))
    mod = jnp.split(mod, 2 * (self.num_blocks + 1), axis=-1)
    y = h
    for i in range(self.num_blocks):
      y = modulate(_plain_norm(self.dtype)(y), mod[2 * i], mod[2 * i + 1])
      y = SwiGLU(int(w * self.mlp_ratio), dtype=self.dtype, name=f"block{i}")(y)
    h = modulate(_plain_norm(self.dtype)(h + y), mod[-2], mod[-1])
    return nn.Dense(self.out_features, kernel_init=_zeros, dtype=self.dtype, name="out")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero transformer block: gated global attention and a gated GELU MLP.

  The six modulation vectors (shift, scale, gate for each branch) come from a zero-initialised
  Dense, so both gates start at zero and the block starts as the identity.
  """

  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  chunk_size: int = 512
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    w = x.shape[-1]
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(
        nn.Dense(6 * w, kernel_init=_named(_zeros, "embed", "mlp"), dtype=self.dtype,
                 name="modulation")(nn.silu(emb)), 6, axis=-1)
    h = modulate(_plain_norm(self.dtype)(x), shift1, scale1)
    h = MultiHeadAttention(self.num_heads, backend=self.attention, chunk_size=self.chunk_size,
                           dtype=self.dtype, kernel_axes=("embed", "heads"), name="attn")(h)
    x = x + gate1[:, None] * h
    h = modulate(_plain_norm(self.dtype)(x), shift2, scale2)
    h = nn.Dense(int(w * self.mlp_ratio), kernel_init=_named(_xavier, "embed", "mlp"),
                 dtype=self.dtype, name="mlp_in")(h)
    h = nn.Dense(w, kernel_init=_named(_xavier, "mlp", "embed"), dtype=self.dtype,
                 name="mlp_out")(nn.gelu(h))
    return nn.with_logical_constraint(x + gate2[:, None] * h, TOKEN_AXES)


class ResidualDiT(nn.Module):
  """Stage 2: the global residual DiT, tokens (B, N, p^3 C), t (B,), coords (N, 3) -> (B, N, out).

  Attributes:
    out_features: 2 s^3 C, the (eps, x0) residual block of each token.
    width, depth, num_heads, mlp_ratio: the transformer's size.
    attention, chunk_size: attention backend and chunk length (jaxvol.models.attention).
    remat: "none", "full", "dots" or "dots_saveable": rematerialisation of each block.
    max_frequency: highest frequency of the position code (see `position_code`).
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
  max_frequency: float = 32.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, t, coords):
    if self.width % self.num_heads:
      raise ValueError(f"residual DiT width {self.width} not divisible by {self.num_heads} heads")
    emb = TimeEmbedding(self.width, dtype=self.dtype, name="time")(t)
    dense = lambda n, name, axes, **kw: nn.Dense(n, kernel_init=_named(_xavier, *axes),
                                                 dtype=self.dtype, name=name, **kw)
    # Only the wide side of the embedding is sharded; the raw p^3 C window axis is not named.
    h = dense(int(self.width * self.mlp_ratio), "embed_in", (None, "mlp"))(tokens)
    h = dense(self.width, "embed_out", ("mlp", "embed"))(nn.gelu(h))
    # The linear skip keeps a direct route from raw voxel values to the token features.
    h = h + dense(self.width, "embed_skip", (None, "embed"), use_bias=False)(tokens)
    h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="embed_norm")(h)
    h = h + position_code(coords, self.width, self.max_frequency).astype(h.dtype)[None]
    h = nn.with_logical_constraint(h, TOKEN_AXES)
    policy = remat_policy(self.remat)
    block = DiTBlock if policy is None else nn.remat(DiTBlock, policy=policy)
    for i in range(self.depth):
      h = block(self.num_heads, self.mlp_ratio, self.attention, self.chunk_size, self.dtype,
                name=f"block{i}")(h, emb)
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
    attention, chunk_size: attention backend and chunk length of the residual DiT.
    remat: per-block rematerialisation policy of the residual DiT ("none", "full", "dots",
      "dots_saveable").
    max_frequency: highest frequency of the position code.
    dtype: computation dtype; outputs are float32.
    stage: 1 (local denoiser only) or 2 (frozen local denoiser + residual DiT).
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
  attention: str = "auto"
  chunk_size: int = 512
  remat: str = "none"
  max_frequency: float = 32.0
  dtype: jnp.dtype = jnp.float32
  stage: int = 1

  @nn.compact
  def __call__(self, x, t):
    if self.stage not in (1, 2):
      raise ValueError(f"PRDiT stage must be 1 or 2, got {self.stage}")
    if x.ndim != 5 or x.shape[-1] != self.channels:
      raise ValueError(f"PRDiT expects (B, D, H, W, {self.channels}), got {x.shape}")
    spatial = x.shape[1:4]
    tokens = tokens_lib.tokenize(x, self.patch, self.stride)
    out_features = 2 * self.stride**3 * self.channels
    out = LocalDenoiser(out_features, self.local_width, self.local_blocks, self.local_mlp_ratio,
                        self.dtype, name="local")(tokens, t).astype(jnp.float32)
    if self.stage == 2:
      # Stage 1 is frozen: no gradient reaches "local" even if a trainer differentiates all params.
      out = jax.lax.stop_gradient(out)
      coords = tokens_lib.token_coordinates(tokens_lib.token_grid(spatial, self.stride))
      out = out + ResidualDiT(
          out_features, self.width, self.depth, self.heads, self.mlp_ratio, self.attention,
          self.chunk_size, self.remat, self.max_frequency, self.dtype,
          name="residual")(tokens, t, coords).astype(jnp.float32)
    vol = tokens_lib.untokenize(out, spatial, self.stride)  # (B, D, H, W, 2C): eps then x0
    return vol[..., :self.channels], vol[..., self.channels:]


def prdit_from_name(name: str, **overrides) -> PRDiT:
  """A PRDiT from the paper's "SIZE/PATCH/DEPTH" name, e.g. "B/12/4" or "PRDiT-B/12/4".

  SIZE picks width and heads from PRDIT_SIZES, PATCH is the token window p, and the last number
  is the residual DiT's depth, as in the authors' configs ("B: 768, 12: patch size, 4: network
  depth"; LIDC uses B/12/4, and B/12/0 is the stage-1 run with no transformer). Without it the
  standard DiT depth of the size is used. The stage is 1 for depth 0 and 2 otherwise unless given
  in `overrides`, which set any other PRDiT field too.
  """
  m = re.fullmatch(r"(?:PRDiT-)?(S|B|L|XL)/(\d+)(?:/(\d+))?", name.strip())
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
