"""Sliding-window inference: grid, weights, partition of unity, sharding, methods' samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as config_lib
from jaxvol import methods
from jaxvol.ops import windows

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size,window,overlap", [(16, 16, 0.5), (20, 8, 0.5), (37, 16, 0.25),
                                                 (9, 8, 0.0), (100, 32, 0.75)])
def test_window_starts_cover_with_bounded_stride(size, window, overlap):
  s = windows.window_starts(size, window, overlap)
  assert s[0] == 0 and s[-1] == size - window
  assert np.all(np.diff(s) > 0)
  assert np.all(np.diff(s) <= max(1, int(window * (1 - overlap))))
  covered = np.zeros(size, int)
  for a in s:
    covered[a:a + window] += 1
  assert covered.min() >= 1


def test_window_starts_and_evaluator_reject_bad_args():
  with pytest.raises(ValueError, match="smaller than the window"):
    windows.window_starts(7, 8, 0.5)
  with pytest.raises(ValueError, match="overlap"):
    windows.window_starts(16, 8, 1.0)
  with pytest.raises(ValueError, match="window"):
    windows.SlidingWindow((8, 8))
  with pytest.raises(ValueError, match="batch"):
    windows.SlidingWindow(8, batch=0)


def test_gaussian_weights_peak_centre_and_positive():
  w = windows.gaussian_weights((8, 12, 16))
  assert w.shape == (8, 12, 16) and w.max() == pytest.approx(1.0, abs=0.05)
  assert w.min() > 0
  assert w[4, 6, 8] > w[0, 6, 8] and w[4, 6, 8] > w[4, 0, 8] and w[4, 6, 8] > w[4, 6, 0]
  np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric
  assert np.all(windows.gaussian_weights((4, 4, 4), sigma_scale=0) == 1)


@pytest.fixture(scope="module")
def volume():
  return jax.random.normal(jax.random.PRNGKey(0), (2, 20, 17, 12, 2))


@pytest.mark.parametrize("window,overlap,sigma", [((8, 8, 8), 0.5, 0.125), ((8, 16, 4), 0.25, 0.125),
                                                  ((16, 8, 8), 0.5, 0.0)])
def test_identity_model_reproduces_input(volume, window, overlap, sigma):
  sw = windows.SlidingWindow(window, overlap, sigma, batch=3)
  out = jax.jit(lambda x: sw(lambda w: w, [x]))(volume)
  np.testing.assert_allclose(out, volume, atol=2e-6)
  wsum = np.asarray(sw.weight_sum(volume.shape[1:4]))
  assert wsum.min() > 0  # every voxel covered


def test_volume_smaller_than_window_and_offsets(volume):
  sw = windows.SlidingWindow((8, 8, 8), batch=2)
  small = volume[:, :5, :, :7]
  np.testing.assert_allclose(jax.jit(lambda x: sw(lambda w: w, [x]))(small), small, atol=2e-6)
  for off in ([0, 0, 0], [3, 1, 5], [19, 16, 11]):
    out = jax.jit(lambda x, o: sw(lambda w: w, [x], offset=o))(volume, jnp.asarray(off))
    np.testing.assert_allclose(out, volume, atol=2e-6)


def test_per_window_function_sees_its_volume_extras_and_is_blended(volume):
  sw = windows.SlidingWindow((8, 8, 8), batch=4)
  t = jnp.asarray([1.0, 3.0])
  fn = lambda a, b, tw: 2.0 * a[..., :1] - b[..., 1:] + tw[:, None, None, None, None]
  out = jax.jit(lambda x: sw(fn, [x, x * 0.5], [t]))(volume)
  ref = 2.0 * volume[..., :1] - 0.5 * volume[..., 1:] + t[:, None, None, None, None]
  np.testing.assert_allclose(out, ref, atol=1e-5)
  # A window-dependent function shows the blending: the output is a convex mix of window values.
  counter = lambda a: jnp.broadcast_to(jnp.mean(a, axis=(1, 2, 3), keepdims=True), a.shape)
  mixed = jax.jit(lambda x: sw(counter, [x]))(volume)
  assert np.all(np.isfinite(mixed))
  assert float(jnp.max(jnp.abs(mixed))) <= float(jnp.max(jnp.abs(volume)))


def test_sharded_windows_equal_unsharded(volume):
  assert jax.local_device_count() >= 4, "conftest sets 4 fake CPU devices"
  fn = lambda a, tw: jnp.tanh(a * 1.5)[..., :1] * tw[:, None, None, None, None]
  t = jnp.asarray([0.5, 2.0])
  one = windows.SlidingWindow((8, 8, 8), batch=2)
  four = windows.SlidingWindow((8, 8, 8), batch=1, mesh=windows.local_mesh())
  assert four.n_devices == jax.local_device_count()
  a = jax.jit(lambda x: one(fn, [x], [t]))(volume)
  b = jax.jit(lambda x: four(fn, [x], [t]))(volume)
  np.testing.assert_allclose(a, b, atol=1e-6)
  text = jax.jit(lambda x: four(fn, [x], [t])).lower(volume).as_text()
  assert "sharding" in text


def _cfg(method, window):
  c = config_lib.smoke_overrides(config_lib.set_method(config_lib.base_config(), method))
  c.model.base_width = 4
  c.model.stm_dim = 8
  c.inference.window = window
  c.inference.batch = 2
  return c


@pytest.mark.parametrize("method", ["full3d", "wdm", "ppdm", "regression", "sparse"])
def test_every_sampler_runs_in_windows(method):
  c = _cfg(method, (16, 16, 16))
  m = methods.build(c)
  cond = jax.random.uniform(jax.random.PRNGKey(1), (1, 24, 16, 20, 1), minval=-1, maxval=1)
  params = m.init(jax.random.PRNGKey(0), {"cond": cond[:, :16, :16, :16],
                                          "target": cond[:, :16, :16, :16]})
  out = jax.jit(m.sample)(params, cond, jax.random.PRNGKey(2))
  assert out.shape == cond.shape and np.all(np.isfinite(out))
  assert m.sliding_window().num_windows((24, 16, 20)) > 1
  # A volume that is one window gives the same as the whole-volume pass.
  whole = methods.build(_cfg(method, ()))
  one = cond[:, :16, :16, :16]
  np.testing.assert_allclose(jax.jit(m.sample)(params, one, jax.random.PRNGKey(3)),
                             jax.jit(whole.sample)(params, one, jax.random.PRNGKey(3)), atol=1e-4)


def test_window_must_fit_the_method():
  m = methods.build(_cfg("ppdm", (12, 12, 12)))  # ppdm smoke: multiple of 2 * 2 = 4 ... 12 ok
  assert m.sliding_window() is not None
  with pytest.raises(ValueError, match="multiple"):
    methods.build(_cfg("ppdm", (10, 12, 12))).sliding_window()


def test_offset_moves_the_grid_without_wrapping(volume):
  """A window-dependent function: different offsets give different blends, none wraps around."""
  sw = windows.SlidingWindow((8, 8, 8), batch=2)
  # Each window returns its own mean: the result depends on where the windows lie.
  win_mean = lambda a: jnp.broadcast_to(jnp.mean(a, axis=(1, 2, 3), keepdims=True), a.shape)
  x = jnp.broadcast_to(jnp.arange(20.0)[None, :, None, None, None], (1, 20, 6, 6, 1))
  run = jax.jit(lambda o: sw(win_mean, [x], offset=o))
  a, b = run(jnp.asarray([0, 0, 0])), run(jnp.asarray([3, 0, 0]))
  assert float(jnp.max(jnp.abs(a - b))) > 0.1  # the grid moved
  # No wrap-around: a ramp stays monotone along its axis and within its range.
  for out in (a, b):
    prof = np.asarray(out[0, :, 0, 0, 0])
    assert np.all(np.diff(prof) >= -1e-5) and prof.min() >= -1e-5 and prof.max() <= 19 + 1e-5
