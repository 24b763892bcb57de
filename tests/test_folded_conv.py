"""The CPU convolution: a 3D convolution computed as one 2D convolution with the kernel's depth
taps folded into channels (jaxvol.models.layers.folded_conv), against XLA's own 3D convolution:
values and gradients for the strides, paddings and kernel shapes the models use, bfloat16, and
the switch that chooses it (conv_implementation, using_conv, JAXVOL_CONV)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.models import layers

CASES = [  # (input shape, kernel shape, strides, (low, high) pads per axis)
    ((2, 8, 6, 5, 3), (3, 3, 3, 3, 4), (1, 1, 1), ((1, 1),) * 3),  # SAME, stride 1
    ((2, 8, 6, 6, 3), (3, 3, 3, 3, 4), (2, 2, 2), ((0, 1),) * 3),  # SAME, stride 2 (even axes)
    ((1, 7, 5, 6, 2), (3, 3, 3, 2, 3), (2, 2, 2), ((1, 1),) * 3),  # PyTorch's stride-2 padding 1
    ((1, 7, 5, 6, 2), (4, 4, 4, 2, 3), (2, 2, 2), ((1, 1),) * 3),  # a discriminator's 4^3
    ((1, 5, 5, 5, 2), (1, 1, 1, 2, 3), (1, 1, 1), ((0, 0),) * 3),  # 1x1x1 skip
    ((1, 9, 4, 4, 2), (2, 2, 2, 2, 3), (2, 2, 2), ((0, 0),) * 3),  # patchify, VALID
    ((1, 6, 5, 4, 2), (3, 1, 2, 2, 3), (1, 2, 1), ((1, 1), (0, 0), (0, 1))),  # mixed
]


def _inputs(shape, kshape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape), dtype),
          jnp.asarray(rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:4])), dtype))


@pytest.mark.parametrize("shape,kshape,strides,pads", CASES)
def test_folded_convolution_equals_xla_values_and_gradients(shape, kshape, strides, pads):
  x, k = _inputs(shape, kshape)
  ref = layers._xla_conv(x, k, strides, pads)
  out = jax.jit(layers.folded_conv, static_argnums=(2, 3))(x, k, strides, pads)
  assert out.shape == ref.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  w = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)
  grad = lambda conv: jax.grad(lambda x, k: jnp.sum(conv(x, k, strides, pads) * w), (0, 1))(x, k)
  for a, b in zip(grad(layers.folded_conv), grad(layers._xla_conv), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.abs(b).max()))


def test_bfloat16_stays_within_bfloat16_rounding():
  x, k = _inputs((1, 8, 8, 8, 8), (3, 3, 3, 8, 8), dtype=jnp.bfloat16)
  out = layers.folded_conv(x, k, (1, 1, 1), ((1, 1),) * 3)
  exact = layers._xla_conv(x.astype(jnp.float32), k.astype(jnp.float32), (1, 1, 1), ((1, 1),) * 3)
  assert out.dtype == jnp.bfloat16
  scale = float(jnp.abs(exact).max())
  assert float(jnp.abs(out.astype(jnp.float32) - exact).max()) < 2 ** -6 * scale


def _conv_kinds(fn, *args):
  """The convolutions in fn's program: their operand ranks (5: a 3D convolution, 4: a 2D one)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return sorted(e.invars[0].aval.ndim for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated")


def test_the_switch_chooses_the_implementation(monkeypatch):
  x = jnp.ones((1, 4, 4, 4, 2))
  module = layers.Conv3D(3)
  params = module.init(jax.random.PRNGKey(0), x)
  apply = lambda p, x: module.apply(p, x)
  monkeypatch.delenv(layers.CONV_ENV, raising=False)
  assert jax.default_backend() == "cpu" and layers.conv_implementation() == "folded"
  assert _conv_kinds(apply, params, x) == [4]  # the CPU default: one 2D convolution
  with layers.using_conv("xla"):  # clears the traces made under the other choice
    assert layers.conv_implementation() == "xla" and _conv_kinds(apply, params, x) == [5]
  assert _conv_kinds(apply, params, x) == [4]
  monkeypatch.setenv(layers.CONV_ENV, "xla")
  assert layers.conv_implementation() == "xla"
  with layers.using_conv("folded"):  # the context wins over the environment
    assert layers.conv_implementation() == "folded"
  monkeypatch.setenv(layers.CONV_ENV, "cudnn")
  with pytest.raises(ValueError, match="JAXVOL_CONV='cudnn'.*auto"):
    layers.conv_implementation()
  with pytest.raises(ValueError, match="expected one of"):
    with layers.using_conv("fast"):
      pass


def test_a_network_gives_the_same_training_gradients_either_way():
  """A small U-Net-like stack (GroupNorm, SiLU, strided and 1x1 convolutions) under both."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = layers.Conv3D(8)(x)
      h = nn.silu(nn.GroupNorm(num_groups=4)(h))
      d = layers.Conv3D(16, strides=(2, 2, 2))(h)
      u = layers.upsample_nearest(layers.Conv3D(8)(nn.silu(d)))
      return layers.Conv3D(1, (1, 1, 1))(jnp.concatenate([h, u], -1))

  x, _ = _inputs((2, 8, 8, 8, 1), (1, 1, 1, 1, 1))
  net = Net()
  params = net.init(jax.random.PRNGKey(0), x)
  loss = lambda p: jnp.mean((net.apply(p, x) - x) ** 2)
  grads = {}
  for impl in ("xla", "folded"):
    with layers.using_conv(impl):
      grads[impl] = jax.jit(jax.grad(loss))(params)
  for a, b in zip(jax.tree.leaves(grads["folded"]), jax.tree.leaves(grads["xla"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()) + 1e-7)
