"""Convolutions on a depth-split volume exchange one-slice halos and equal the plain convolution.

jaxvol.models.layers.conv3d_same: with the logical rules active on a mesh that splits depth, each
device convolves its own slab and adds the neighbours' edge slices through the first / last
kernel tap; elsewhere it is lax.conv_general_dilated. Conv3D is nn.Conv's drop-in.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvol.models import layers
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib

pytestmark = pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake) devices")


def _mesh(data, spatial):
  return Mesh(np.asarray(jax.devices()[:data * spatial]).reshape(data, spatial, 1), mesh_lib.AXES)


def _plain(x, k, s):
  return lax.conv_general_dilated(x, k, (s,) * 3, "SAME",
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _inputs(shape, cout=5, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], cout)) / 10, jnp.float32)
  return x, k


def _sharded(fn, mesh, x, k):
  """fn(x, k) jitted with x depth-split (batch on data) under the logical rules; (out, compiled,
  number of shard_maps in the traced program: the halo path's convolutions)."""
  xs = NamedSharding(mesh, P("data", "spatial"))
  with sharding_lib.activated(mesh):
    jitted = jax.jit(fn, in_shardings=(xs, mesh_lib.replicated(mesh)))
    halos = str(jax.make_jaxpr(fn)(x, k)).count("shard_map[")
    return jitted(jax.device_put(x, xs), k), jitted.lower(x, k).compile(), halos


@pytest.mark.parametrize("kwargs", [{}, {"strides": (2, 2, 2)}, {"kernel_size": (1, 1, 1)}])
def test_conv3d_module_is_nn_conv(kwargs):
  x, _ = _inputs((2, 8, 6, 4, 3))
  ref = nn.Conv(5, kwargs.get("kernel_size", (3, 3, 3)), strides=kwargs.get("strides", 1),
                padding="SAME", name="c")
  ours = layers.Conv3D(5, name="c", **kwargs)
  p_ref, p_ours = ref.init(jax.random.PRNGKey(0), x), ours.init(jax.random.PRNGKey(0), x)
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours), strict=True):
    np.testing.assert_array_equal(a, b)  # same names, shapes and initial values: checkpoints carry
  with layers.using_conv("xla"):
    np.testing.assert_array_equal(ours.apply(p_ref, x), ref.apply(p_ref, x))
  # The CPU default folds depth taps into channels (tests/test_folded_conv.py): float order only.
  np.testing.assert_allclose(ours.apply(p_ref, x), ref.apply(p_ref, x), atol=1e-5)


@pytest.mark.parametrize("stride,layout,shape", [
    (1, (1, 4), (1, 16, 6, 5, 3)),
    (1, (1, 4), (1, 4, 5, 4, 3)),  # one slice per device: both boundary rows are the same row
    (2, (1, 4), (1, 16, 6, 6, 3)),
    (2, (1, 4), (1, 8, 5, 6, 3)),  # two slices per device, odd height
    (1, (2, 2), (2, 8, 5, 4, 3)),
    (2, (2, 2), (2, 12, 4, 6, 2)),
])
def test_halo_convolution_equals_plain_values_and_gradients(stride, layout, shape):
  x, k = _inputs(shape)
  mesh = _mesh(*layout)
  assert layers._depth_split(x.shape, 3, stride, (1, 1) if stride == 1 else (0, 1)) is None
  with sharding_lib.activated(mesh):  # the halo path is taken under the rules
    assert layers._depth_split(x.shape, 3, stride, (1, 1) if stride == 1 else (0, 1)) is not None
  out, _, halos = _sharded(lambda x, k: layers.conv3d_same(x, k, (stride,) * 3), mesh, x, k)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_plain(x, k, stride)), atol=1e-5)
  assert halos == 1
  # Differentiated, the convolution is XLA's (custom VJP): the same gradients as lax.conv's.
  w = jnp.asarray(np.random.default_rng(1).normal(size=out.shape), jnp.float32)
  loss = lambda conv: (lambda x, k: jnp.sum(conv(x, k) * w))
  (gx, gk), _, _ = _sharded(jax.grad(loss(lambda x, k: layers.conv3d_same(x, k, (stride,) * 3)),
                                     argnums=(0, 1)), mesh, x, k)
  rx, rk = jax.grad(loss(lambda x, k: _plain(x, k, stride)), argnums=(0, 1))(x, k)
  np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), atol=1e-4)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(rk), atol=1e-4 * float(jnp.abs(rk).max()))


def test_depths_the_mesh_does_not_split_fall_back_to_xla():
  x, k = _inputs((1, 6, 4, 4, 2))  # 6 slices over 4 devices
  mesh = _mesh(1, 4)
  with sharding_lib.activated(mesh):
    assert layers._depth_split(x.shape, 3, 1, (1, 1)) is None
    out = jax.jit(lambda x, k: layers.conv3d_same(x, k))(x, k)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_plain(x, k, 1)), atol=1e-5)


def test_halo_exchange_holds_no_extended_copy_of_the_slabs():
  """A conv stack on a depth-split volume: XLA's own partitioning needs more temporary memory."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, 32, 32, 32, 8)), jnp.float32)
  ks = [jnp.asarray(rng.normal(size=(3, 3, 3, 8, 8)) / 10, jnp.float32) for _ in range(3)]

  def stack(conv):
    def f(x, ks):
      for k in ks:
        x = nn.silu(conv(x, k))
      return x
    return f

  mesh = _mesh(1, 4)
  ours, c_ours, halos = _sharded(stack(lambda x, k: layers.conv3d_same(x, k)), mesh, x, ks)
  xla, c_xla, _ = _sharded(stack(lambda x, k: _plain(x, k, 1)), mesh, x, ks)
  assert halos == 3
  np.testing.assert_allclose(np.asarray(ours), np.asarray(xla), atol=1e-5)
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  slab = 8 * 32 * 32 * 8 * 4  # one device's share of one feature map, bytes
  # XLA: 0.53 slab more on this CPU (the halo-extended copy, less what it reuses).
  assert temp(c_ours) + slab // 4 < temp(c_xla), (temp(c_ours), temp(c_xla))


def test_bfloat16_boundary_rows_carry_at_most_one_extra_rounding():
  """In bfloat16 a boundary row is the slab's (rounded) row plus the neighbour's term added in
  float32 and rounded again: within one bfloat16 step of the plain convolution's error."""
  x, k = _inputs((1, 16, 8, 8, 8), cout=8)
  ref = np.asarray(_plain(x, k, 1))
  xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  plain = np.asarray(_plain(xb, kb, 1).astype(jnp.float32))
  out, _, _ = _sharded(lambda x, k: layers.conv3d_same(x, k), _mesh(1, 4), xb, kb)
  out = np.asarray(out.astype(jnp.float32))
  for z in (3, 4, 7, 8, 11, 12):  # the rows on each side of the three slab boundaries
    err_ours, err_plain = np.abs(out[:, z] - ref[:, z]).max(), np.abs(plain[:, z] - ref[:, z]).max()
    step = 2.0**-7 * np.abs(ref[:, z]).max()  # bfloat16's spacing at the row's largest value
    assert err_ours <= err_plain + step, (z, err_ours, err_plain, step)
  inner = [z for z in range(16) if z % 4 not in (0, 3)]  # rows no neighbour slice reaches
  np.testing.assert_array_equal(out[:, inner], plain[:, inner])


def test_conv3d_takes_an_int_kernel_size():
  x, _ = _inputs((1, 4, 4, 4, 2))
  params = layers.Conv3D(3, 1).init(jax.random.PRNGKey(0), x)
  assert params["params"]["kernel"].shape == (1, 1, 1, 2, 3)
