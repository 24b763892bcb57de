"""jaxvol.models.attention: every backend against the materialising XLA reference."""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from jaxvol.models import attention
from jaxvol.models import layers

HIGHEST = jax.lax.Precision.HIGHEST


def _inputs(q_len, kv_len=None, heads=2, head_dim=8, batch=2, seed=0):
  kv_len = q_len if kv_len is None else kv_len
  kq, kk, kv, kw = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (batch, q_len, heads, head_dim), jnp.float32)
  k = jax.random.normal(kk, (batch, kv_len, heads, head_dim), jnp.float32)
  v = jax.random.normal(kv, (batch, kv_len, heads, head_dim), jnp.float32)
  # A random cotangent, so the gradient check sees every output element, not just their sum.
  w = jax.random.normal(kw, q.shape, jnp.float32)
  return q, k, v, w


def _output_and_grads(backend, q, k, v, w, **kwargs):
  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, backend=backend, **kwargs)
    return jnp.sum(out * w), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


# (q_len, kv_len, chunk): divisible, ragged last chunk, tiny chunks, one chunk larger than the
# sequence, and cross-attention with different ragged lengths.
@pytest.mark.parametrize("q_len,kv_len,chunk", [(64, 64, 16), (50, 50, 16), (7, 7, 4),
                                                (5, 5, 16), (9, 13, 4)])
def test_chunked_matches_xla_forward_and_gradients(q_len, kv_len, chunk):
  q, k, v, w = _inputs(q_len, kv_len)
  ref_out, ref_grads = _output_and_grads("xla", q, k, v, w, precision=HIGHEST)
  out, grads = _output_and_grads("chunked", q, k, v, w, chunk_size=chunk, precision=HIGHEST)
  assert out.shape == ref_out.shape
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for g, ref_g in zip(grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, ref_g, atol=1e-5, rtol=1e-5)


def test_chunked_bfloat16_stays_finite_and_close():
  q, k, v, _ = _inputs(50)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = attention.dot_product_attention(q, k, v, backend="chunked", chunk_size=16)
  ref = attention.dot_product_attention(q, k, v, backend="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)


def test_splash_interpret_matches_xla_forward_and_gradients():
  # Splash tiles in multiples of 128 even in interpret mode; 640 tokens give five 128-blocks, so
  # the online softmax runs across blocks. head_dim 64 as in PRDiT.
  q, k, v, w = _inputs(640, heads=2, head_dim=64, batch=2)
  assert attention.splash_block_size(640) == 128
  ref_out, ref_grads = _output_and_grads("xla", q, k, v, w, precision=HIGHEST)
  out, grads = _output_and_grads("splash", q, k, v, w, interpret=True)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, atol=1e-5, rtol=1e-5)


def test_splash_block_sizes_and_bad_lengths():
  assert [attention.splash_block_size(n) for n in (128, 256, 384, 1024, 32768)] == [
      128, 256, 384, 512, 512]
  q = jnp.zeros((1, 100, 2, 64))
  with pytest.raises(ValueError, match="multiple of 128"):
    attention.dot_product_attention(q, q, q, backend="splash", interpret=True)


def test_auto_resolves_to_chunked_on_cpu_and_rejects_unknown_backends():
  assert jax.default_backend() == "cpu"
  assert attention.resolve_backend("auto", 64) == "chunked"
  assert attention.resolve_backend("auto", 64, seq_len=100) == "chunked"
  assert attention.resolve_backend("splash", 64) == "splash"
  with pytest.raises(ValueError, match="unknown attention backend"):
    attention.resolve_backend("flash", 64)


def test_cudnn_rejects_bad_head_dims_and_cpu():
  for head_dim in (12, 4, 264):
    q = jnp.zeros((1, 16, 2, head_dim), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim a multiple of 8"):
      attention.dot_product_attention(q, q, q, backend="cudnn")
  if jax.default_backend() != "gpu":
    q = jnp.zeros((1, 16, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attention.dot_product_attention(q, q, q, backend="cudnn")


def test_multi_head_attention_backends_share_params_and_agree():
  x = jax.random.normal(jax.random.key(1), (2, 37, 16), jnp.float32)
  params = attention.MultiHeadAttention(4, backend="xla").init(jax.random.key(2), x)
  assert set(params["params"]) == {"qkv", "out"}
  outs = {}
  for backend in ("xla", "chunked"):
    model = attention.MultiHeadAttention(4, backend=backend, chunk_size=8)
    outs[backend] = jax.jit(model.apply)(params, x)
  assert outs["xla"].shape == x.shape
  np.testing.assert_allclose(outs["chunked"], outs["xla"], atol=1e-5, rtol=1e-5)

  zero = attention.MultiHeadAttention(4, qkv_bias=False, out_init_zero=True)
  zero_params = zero.init(jax.random.key(2), x)
  assert "bias" not in zero_params["params"]["qkv"]
  assert not np.asarray(zero.apply(zero_params, x)).any()


def test_remat_policy_names_and_rematerialised_block_gradients():
  assert attention.remat_policy("none") is None
  assert attention.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
  assert attention.remat_policy("dots") is jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert attention.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
  with pytest.raises(ValueError, match="unknown remat policy"):
    attention.remat_policy("everything")

  # Rematerialising a chunked-attention block must not change its gradients.
  x = jax.random.normal(jax.random.key(3), (1, 20, 8), jnp.float32)
  plain = attention.MultiHeadAttention(2, backend="chunked", chunk_size=8)
  remat = nn.remat(attention.MultiHeadAttention, policy=attention.remat_policy("dots"))(
      2, backend="chunked", chunk_size=8)
  params = plain.init(jax.random.key(4), x)
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2)))(params)
  for g, ref in zip(jax.tree.leaves(grad(remat)), jax.tree.leaves(grad(plain))):
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_spatial_attention_chunked_matches_default():
  x = jax.random.normal(jax.random.key(5), (1, 4, 4, 3, 8), jnp.float32)
  default = layers.SpatialAttention(num_heads=2, groups=4)
  params = default.init(jax.random.key(6), x)
  # The zero-initialised output projection would hide the attention; give it weights.
  params = jax.tree.map(lambda p: p + 0.1, params)
  chunked = layers.SpatialAttention(num_heads=2, groups=4, backend="chunked")
  np.testing.assert_allclose(chunked.apply(params, x), default.apply(params, x),
                             atol=1e-5, rtol=1e-5)


def test_attention_bench_records_tiny(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "attention_bench", ROOT / "experiments" / "attention_bench.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  records = bench.main(["--out", str(tmp_path), "--tokens", "1024", "--heads", "2",
                        "--head-dim", "16", "--chunk-size", "128",
                        "--backends", "xla,chunked,cudnn"])
  assert json.loads((tmp_path / "attention_bench.json").read_text()) == records
  by_backend = {r["backend"]: r for r in records}
  xla, chunked = by_backend["xla"], by_backend["chunked"]
  assert xla["kind"] == "attention" and xla["tokens"] == 1024 and xla["size"] == 80
  # The 2 x 1024^2 float32 logits (8 MiB) are only ever materialised by xla.
  assert xla["bytes"] > 8 * 2**20 > chunked["bytes"]
  assert xla["gflops"] > 0 and chunked["gflops"] > 0 and chunked["skipped"] is None
  assert by_backend["cudnn"]["bytes"] is None and "GPU" in by_backend["cudnn"]["skipped"]
