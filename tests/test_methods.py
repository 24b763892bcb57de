"""Method-level behaviour: any volume shape in, same shape out; losses see what they should."""

import jax
import jax.numpy as jnp
import pytest

from jaxvol import config as base
from jaxvol import methods
from jaxvol.ops import puzzle


def smoke(method, **over):
  c = base.smoke_overrides(base.base_config())
  c.method = method
  c.data.inputs = ("a",)
  for k, v in over.items():
    sec, name = k.split("__")
    c[sec][name] = v
  return c


@pytest.mark.parametrize("method,over", [
    ("ppdm", {}), ("ppdm", {"ppdm__factor": (1, 2, 2)}), ("full3d", {}), ("wdm", {}),
])
@pytest.mark.slow
def test_sample_any_shape(method, over):
  m = methods.build(smoke(method, **over))
  batch = {"cond": jnp.zeros((1, 16, 16, 16, 1)), "target": jnp.zeros((1, 16, 16, 16, 1))}
  params = m.init(jax.random.PRNGKey(0), batch)
  cond = jax.random.normal(jax.random.PRNGKey(1), (1, 13, 10, 9, 1))
  out = jax.jit(m.sample)(params, cond, jax.random.PRNGKey(2))
  assert out.shape == (1, 13, 10, 9, 1) and bool(jnp.all(jnp.isfinite(out)))


def test_ppdm_network_runs_on_the_puzzled_grid():
  c = smoke("ppdm", ppdm__factor=(4, 4, 4))
  m = methods.build(c)
  assert m.spatial_multiple() == (8, 8, 8)
  batch = {"cond": jnp.zeros((2, 16, 16, 16, 1)), "target": jnp.zeros((2, 16, 16, 16, 1))}
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), batch)
  stem = params["params"]["stem"]["kernel"]
  out = params["params"]["out"]["kernel"]
  assert stem.shape[-2] == 2 * 64 and out.shape[-1] == 64  # [x_t, y] puzzled in, x0 puzzled out
  shapes = jax.eval_shape(lambda p, x: m.net.apply(p, x, jnp.zeros((2,), jnp.int32)), params,
                          jnp.zeros((2, 4, 4, 4, 128)))
  assert shapes.shape == (2, 4, 4, 4, 64)


def test_puzzle_gradient_loss_penalises_cell_seams():
  """A prediction correct inside every 2x2x2 cell but offset per cell offset (an r-periodic
  seam pattern) has the same per-piece L1 as a smooth offset but a larger gradient loss."""
  from jaxvol.ops import gradients  # pylint: disable=g-import-not-at-top
  x = jnp.zeros((1, 8, 8, 8, 1))
  seam = puzzle.unpuzzle(puzzle.puzzle(x, 2) + jnp.linspace(-0.1, 0.1, 8), 2)
  smooth = x + 0.1
  assert float(jnp.mean(jnp.abs(seam - x))) <= float(jnp.mean(jnp.abs(smooth - x)))
  assert float(gradients.gradient_l1(seam, x)) > 0.05 > float(gradients.gradient_l1(smooth, x))
