"""Regression in PPDM's puzzled domain (jaxvol.methods.puzzle_regression): PPDM's network and loss
without the bridge, checked against its definition written out with numpy puzzles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as base_config
from jaxvol import methods
from jaxvol.ops import gradients


def _np_puzzle(x, r):
  """(B, D, H, W, C) -> (B, D/r, H/r, W/r, r^3 C), sub-voxel offsets (a, b, c) outermost, as
  jaxvol.ops.puzzle defines the channel order."""
  b, d, h, w, c = x.shape
  y = x.reshape(b, d // r, r, h // r, r, w // r, r, c)
  return y.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d // r, h // r, w // r, r ** 3 * c)


@pytest.fixture(scope="module")
def setup():
  c = base_config.mri_t1_t2_config("ppdm", "smoke")
  c.method = "puzzle_regression"
  c.ppdm.factor = (2, 2, 2)
  c.ppdm.grad_loss_weight = 0.5
  method = methods.build(c)
  rng = np.random.default_rng(0)
  batch = {"cond": jnp.asarray(rng.normal(size=(2, 16, 16, 16, 1)), jnp.float32),
           "target": jnp.asarray(rng.normal(size=(2, 16, 16, 16, 1)), jnp.float32)}
  params = method.init(jax.random.PRNGKey(0), batch)
  return c, method, params, batch


def test_declared_fields_and_registry(setup):
  c, method, _, _ = setup
  fields = methods.model_fields(c)
  assert "ppdm.factor" in fields and "model.base_width" in fields
  assert not any(f.startswith("diffusion.") or f.startswith("ppdm.num") for f in fields)
  assert method.spatial_multiple() == (4, 4, 4)  # r x the 2-level U-Net's divisor


def test_puzzle_helper_matches_the_library(setup):
  from jaxvol.ops import puzzle as puzzle_lib  # pylint: disable=g-import-not-at-top
  x = np.arange(2 * 4 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(puzzle_lib.puzzle(jnp.asarray(x), (2, 2, 2))),
                                _np_puzzle(x, 2))


def test_loss_is_ppdms_without_the_bridge(setup):
  c, method, params, batch = setup
  loss, aux = method.loss(params, batch, jax.random.PRNGKey(1))
  t0 = jnp.zeros((2,), jnp.int32)
  pred_p = method.net.apply(params, jnp.asarray(_np_puzzle(np.asarray(batch["cond"]), 2)), t0)
  main = np.mean(np.abs(np.asarray(pred_p) - _np_puzzle(np.asarray(batch["target"]), 2)))
  # Unpuzzle with numpy: the inverse of _np_puzzle.
  p = np.asarray(pred_p).reshape(2, 8, 8, 8, 2, 2, 2, 1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  pred = p.reshape(2, 16, 16, 16, 1)
  grad = float(gradients.gradient_l1(jnp.asarray(pred), batch["target"]))
  assert float(aux["loss_main"]) == pytest.approx(main, rel=1e-5)
  assert float(aux["loss_puzzle_grad"]) == pytest.approx(grad, rel=1e-5)
  assert float(loss) == pytest.approx(main + 0.5 * grad, rel=1e-5)


def test_sample_is_one_deterministic_pass_of_any_shape(setup):
  _, method, params, _ = setup
  rng = np.random.default_rng(2)
  cond = jnp.asarray(rng.normal(size=(1, 13, 18, 11, 1)), jnp.float32)
  a = method.sample(params, cond, jax.random.PRNGKey(0))
  b = method.sample(params, cond, jax.random.PRNGKey(7))
  assert a.shape == (1, 13, 18, 11, 1)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no noise: the key is unused
  # The padded pass, unpuzzled and cropped.
  padded = np.pad(np.asarray(cond), [(0, 0), (0, 3), (0, 2), (0, 1), (0, 0)], mode="edge")
  out = method.net.apply(params, jnp.asarray(_np_puzzle(padded, 2)), jnp.zeros((1,), jnp.int32))
  out = np.asarray(out).reshape(1, 8, 10, 6, 2, 2, 2, 1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  np.testing.assert_allclose(np.asarray(a), out.reshape(1, 16, 20, 12, 1)[:, :13, :18, :11],
                             rtol=1e-5, atol=1e-5)
