"""Global self-attention with selectable backends, for transformers over whole 3D volumes.

PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation", ICLR 2026)
attends globally over up to 32,768 tokens. Materialising the logits there costs heads x 32,768^2
floats per example (48 GiB in float32 for 12 heads), so the transformer picks an attention backend
that never holds them:

  xla      `jax.nn.dot_product_attention(implementation="xla")`: the reference. Materialises
           all logits; fine for short sequences and for tests.
  cudnn    cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.
           NVIDIA GPUs only; computes in bfloat16 (float32 inputs are cast and the output cast
           back), head_dim a multiple of 8 and at most 128 (256 on Hopper and later).
  chunked  blockwise attention in plain JAX: a `lax.scan` over query chunks and, inside, over
           key/value chunks with the online softmax (running max and running sum; Milakov and
           Gimelshein, 2018) of memory-efficient attention (Rabe and Staats, 2021) and
           FlashAttention (Dao et al., 2022). Both scan bodies are rematerialised, so the backward
           pass recomputes each chunk's logits instead of storing them. Runs everywhere.
  splash   TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`); with
           `interpret=True` the same kernel runs (slowly) on CPU, which is how it is tested.
  auto     cudnn on GPU (when head_dim allows), splash on TPU (when the length allows), chunked
           otherwise; `resolve_backend` names the choice so callers can log it.

All backends take (batch, seq, heads, head_dim) like `jax.nn.dot_product_attention`, scale the
logits by 1 / sqrt(head_dim) and apply no mask: full, non-causal self-attention.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("auto", "xla", "cudnn", "chunked", "splash")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

# Finite rather than -inf: exp(_MASK - m) underflows to 0 for any real running max m, and
# _MASK - _MASK = 0 keeps even an all-masked row finite, so no inf - inf can make a NaN.
_MASK = -1e30
# Splash tiles the sequence in multiples of the TPU lane width, also in interpret mode.
_SPLASH_LANES = 128
_SPLASH_MAX_BLOCK = 512


def cudnn_head_dim_error(head_dim: int, *, max_head_dim: int = 256) -> str | None:
  """Why cuDNN flash attention cannot take `head_dim`, or None when it can.

  cuDNN needs a multiple of 8, at most 128 before Hopper and 256 from Hopper on; JAX itself rejects
  129..256 on older GPUs, so this check lets those through and `auto` stays at 128.
  """
  if head_dim % 8 or head_dim > max_head_dim or head_dim < 8:
    return (f"cuDNN attention needs head_dim a multiple of 8 and at most 128 (256 on Hopper and "
            f"later), got {head_dim}")
  return None


def splash_block_size(seq_len: int) -> int:
  """The largest multiple of 128 dividing `seq_len`, at most 512; ValueError if there is none."""
  for block in range(min(_SPLASH_MAX_BLOCK, seq_len) // _SPLASH_LANES * _SPLASH_LANES, 0,
                     -_SPLASH_LANES):
    if seq_len % block == 0:
      return block
  raise ValueError(f"splash attention needs the sequence length to be a multiple of "
                   f"{_SPLASH_LANES}, got {seq_len}; use the 'chunked' backend or pad the tokens")


def resolve_backend(backend: str, head_dim: int, seq_len: int | None = None) -> str:
  """The concrete backend `dot_product_attention` will run for `backend` on the default platform.

  Args:
    backend: one of BACKENDS.
    head_dim: per-head width.
    seq_len: token count, if known; on TPU, `auto` falls back to chunked when splash cannot tile it.

  Returns:
    "xla", "cudnn", "chunked" or "splash".
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "gpu" and cudnn_head_dim_error(head_dim, max_head_dim=128) is None:
    return "cudnn"
  if platform == "tpu" and (seq_len is None or seq_len % _SPLASH_LANES == 0):
    return "splash"
  return "chunked"


def dot_product_attention(q, k, v, *, backend: str = "auto", chunk_size: int = 512,
                          precision=None, interpret: bool | None = None):
  """Full (non-causal) multi-head attention softmax(q k^T / sqrt(head_dim)) v.

  Args:
    q: (batch, q_len, heads, head_dim) queries.
    k: (batch, kv_len, heads, head_dim) keys.
    v: (batch, kv_len, heads, head_dim) values; splash needs q_len == kv_len.
    backend: one of BACKENDS (see the module docstring).
    chunk_size: query and key/value chunk length of the chunked backend; any sequence length works
      (the last chunk is padded and its padded keys masked).
    precision: matmul precision (a `jax.lax.Precision` or its name) for xla and chunked; cudnn and
      splash ignore it.
    interpret: run splash in Pallas interpret mode; None means on every platform but TPU.

  Returns:
    (batch, q_len, heads, head_dim) in q's dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects (batch, seq, heads, head_dim) inputs, got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  name = resolve_backend(backend, q.shape[-1], q.shape[1])
  precision = None if precision is None else lax.Precision(precision)
  if name == "xla":
    return _xla_attention(q, k, v, precision)
  if name == "cudnn":
    return _cudnn_attention(q, k, v)
  if name == "chunked":
    return _chunked_attention(q, k, v, chunk_size, precision)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  return _splash_attention(q, k, v, interpret)


def _xla_attention(q, k, v, precision):
  if precision is None:
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")
  # jax.nn.dot_product_attention takes no precision argument; its float32 einsums follow the
  # default matmul precision.
  with jax.default_matmul_precision(precision.name.lower()):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _cudnn_attention(q, k, v):
  error = cudnn_head_dim_error(q.shape[-1])
  if error:
    raise ValueError(error)
  if jax.default_backend() != "gpu":
    raise ValueError(f"the cudnn attention backend needs an NVIDIA GPU; the default JAX backend is "
                     f"{jax.default_backend()!r} (use 'chunked' or 'auto')")
  dtype = q.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(dtype)


def _pad_seq(x, length: int):
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _chunked_attention(q, k, v, chunk_size: int, precision):
  """Blockwise online-softmax attention; holds (chunk, chunk) logits per head at a time.

  Memory grows linearly with the sequence (forward + backward at 32,768 tokens, 12 heads of 64,
  float32: 1.1 GiB compiled, against 145 GiB for xla). The price is recomputation: autodiff
  through the two rematerialised scans runs 1.5x xla's matmul FLOPs.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  b, q_len, h, d = q.shape
  kv_len = k.shape[1]
  cq, ck = min(chunk_size, q_len), min(chunk_size, kv_len)
  nq, nk = -(-q_len // cq), -(-kv_len // ck)
  scale = 1.0 / math.sqrt(d)
  # Chunk axis first, for lax.scan: (n, batch, chunk, heads, head_dim).
  to_chunks = lambda x, n, c: _pad_seq(x, n * c).reshape(b, n, c, h, d).swapaxes(0, 1)
  q_chunks = to_chunks(q, nq, cq)
  k_chunks, v_chunks = to_chunks(k, nk, ck), to_chunks(v, nk, ck)
  kv_valid = (jnp.arange(nk * ck) < kv_len).reshape(nk, ck)
  padded = nk * ck != kv_len
  dot = lambda spec, x, y: jnp.einsum(spec, x, y, precision=precision,
                                      preferred_element_type=jnp.float32)

  def query_chunk(_, qc):
    def kv_chunk(carry, chunk):
      m, l, acc = carry
      kc, vc, valid = chunk
      s = dot("bqhd,bkhd->bhqk", qc, kc) * scale
      if padded:
        s = jnp.where(valid, s, _MASK)
      # The result does not depend on the running max (it cancels between numerator and
      # denominator), so no gradient needs to flow through it.
      m_new = lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
      p = jnp.exp(s - m_new[..., None])
      alpha = jnp.exp(m - m_new)
      l = alpha * l + p.sum(axis=-1)
      acc = alpha[..., None] * acc + dot("bhqk,bkhd->bhqd", p.astype(vc.dtype), vc)
      return (m_new, l, acc), None

    init = (jnp.full((b, h, cq), _MASK, jnp.float32), jnp.zeros((b, h, cq), jnp.float32),
            jnp.zeros((b, h, cq, d), jnp.float32))
    # prevent_cse=False: scan already keeps XLA from merging the recomputation with the forward.
    (_, l, acc), _ = lax.scan(jax.checkpoint(kv_chunk, prevent_cse=False), init,
                              (k_chunks, v_chunks, kv_valid))
    return None, (acc / l[..., None]).astype(q.dtype)

  # Rematerialising the query-chunk body too keeps the backward pass from storing every query
  # chunk's key/value carries at once.
  _, out = lax.scan(jax.checkpoint(query_chunk, prevent_cse=False), None, q_chunks)
  # (nq, b, h, cq, d) -> (b, nq * cq, h, d), then drop the padded queries.
  return out.transpose(1, 0, 3, 2, 4).reshape(b, nq * cq, h, d)[:, :q_len]


def _splash_attention(q, k, v, interpret: bool):
  # Imported here: the Pallas TPU modules are only needed by this backend.
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, seq, h, d = q.shape
  if k.shape[1] != seq:
    raise ValueError(f"splash attention here is self-attention: q has {seq} tokens, k {k.shape[1]}")
  block = splash_block_size(seq)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.FullMask((seq, seq))] * h)
  kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                  interpret=interpret)
  # The kernel neither scales q nor takes a batch axis: (heads, seq, head_dim) per example.
  per_example = lambda x: x.transpose(0, 2, 1, 3)
  q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
  out = jax.vmap(kernel)(per_example(q), per_example(k), per_example(v))
  return out.transpose(0, 2, 1, 3)


def remat_policy(name: str):
  """The `jax.checkpoint` policy for a config string, for `nn.remat(Block, policy=...)`.

  "none" returns None, which means do not wrap the block at all (nn.remat with policy None
  would recompute everything); "full" saves nothing, "dots" saves matmuls without batch dimensions
  (the dense layers' outputs, not attention's batched ones), "dots_saveable" saves every matmul.
  """
  if name not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {name!r}; choose from {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[name]


class MultiHeadAttention(nn.Module):
  """Multi-head self-attention over a token sequence: (B, L, C) -> (B, L, C).

  A fused qkv projection, `dot_product_attention` with the chosen backend and an output
  projection; with `out_init_zero` the output projection starts at zero, so a residual block
  built around it starts as the identity (as in DiT's adaLN-Zero blocks). `kernel_axes`, e.g.
  ("embed", "heads"), names the (input, output) axes of the qkv kernel for logical partitioning
  (the output kernel gets them reversed); its parameters are then boxed (`nn.Partitioned`).
  """

  num_heads: int
  backend: str = "auto"
  chunk_size: int = 512
  dtype: jnp.dtype = jnp.float32
  qkv_bias: bool = True
  out_init_zero: bool = False
  kernel_axes: tuple[str | None, str | None] | None = None

  @nn.compact
  def __call__(self, x):
    b, l, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention width {c} not divisible by {self.num_heads} heads")
    def named(init, axes):
      return init if self.kernel_axes is None else nn.with_logical_partitioning(init, axes)

    qkv_init = named(nn.linear.default_kernel_init, self.kernel_axes)
    qkv = nn.Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=qkv_init,
                   name="qkv")(x)
    qkv = qkv.reshape(b, l, 3, self.num_heads, c // self.num_heads)
    o = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], backend=self.backend,
                              chunk_size=self.chunk_size)
    out_init = nn.initializers.zeros if self.out_init_zero else nn.linear.default_kernel_init
    out_init = named(out_init, None if self.kernel_axes is None else self.kernel_axes[::-1])
    return nn.Dense(c, dtype=self.dtype, kernel_init=out_init, name="out")(o.reshape(b, l, c))
