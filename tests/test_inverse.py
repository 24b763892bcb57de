"""Inverse-problem operators and classical reconstructions against their defining identities."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.inverse import classical
from jaxvol.inverse import operators as ops

SHAPE = (8, 12, 10)


def crandn(rng, shape):
  return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def cdot(a, b):
  """<a, b> = sum(conj(a) b), accumulated in complex128."""
  return np.vdot(np.asarray(a, np.complex128).ravel(), np.asarray(b, np.complex128).ravel())


def make_op(name, shape=SHAPE):
  if name == "single_equispaced":
    return ops.SingleCoilMRI(ops.equispaced_mask(shape, 4, 0.2))
  if name == "single_random":
    return ops.SingleCoilMRI(ops.random_mask(shape, 4, 0.2, key=3))
  if name == "multi_equispaced":
    return ops.MultiCoilMRI(ops.equispaced_mask(shape, 4, 0.2), ops.synthetic_coil_maps(shape, 4))
  if name == "multi_random":
    mask = ops.random_mask(shape, 4, 0.2, key=4)
    return ops.MultiCoilMRI(mask, ops.synthetic_coil_maps(shape, 3))
  if name == "down_anisotropic":
    return ops.Downsample((2, 3, 5))
  if name == "down_isotropic":
    return ops.Downsample(2)
  if name == "identity":
    return ops.Identity()
  raise ValueError(name)


ALL_OPS = ["single_equispaced", "single_random", "multi_equispaced", "multi_random",
           "down_anisotropic", "down_isotropic", "identity"]


def phantom(shape=(16, 16, 16)):
  """Piecewise-constant volume: a box, a sphere and a small bright cube on a zero background."""
  d, h, w = shape
  z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  v = np.zeros(shape, np.float32)
  v[2:d - 2, 3:h - 3, 2:w - 3] = 0.5
  v[(z - d / 2) ** 2 + (y - h / 2) ** 2 + (x - w / 2.5) ** 2 < (d / 5) ** 2] = 1.0
  v[4:7, 9:12, 10:12] = 0.8
  return v


def psnr(x, ref):
  mse = np.mean((np.asarray(x, np.float64) - ref) ** 2)
  return 10 * np.log10(ref.max() ** 2 / mse)


# ---------------------------------------------------------------------------------------------
# FFT and adjoints


def test_fft3c_is_centred_and_unitary():
  rng = np.random.default_rng(0)
  k = np.asarray(ops.fft3c(np.ones(SHAPE, np.float32)))
  peak = np.unravel_index(np.argmax(np.abs(k)), SHAPE)
  assert peak == (SHAPE[0] // 2, SHAPE[1] // 2, SHAPE[2] // 2)
  np.testing.assert_allclose(np.abs(k).sum(), np.sqrt(np.prod(SHAPE)), rtol=1e-5)
  x = crandn(rng, SHAPE)
  np.testing.assert_allclose(np.linalg.norm(ops.fft3c(x)), np.linalg.norm(x), rtol=1e-5)
  np.testing.assert_allclose(ops.ifft3c(ops.fft3c(x)), x, atol=1e-5)


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("batch", [(), (2,)])
def test_adjoint_identity(name, batch):
  rng = np.random.default_rng(1)
  op = make_op(name)
  x = crandn(rng, batch + SHAPE)
  y_shape = jax.eval_shape(op.forward, x).shape
  y = crandn(rng, y_shape)
  ax, aty = op.forward(x), op.adjoint(y)
  assert aty.shape == x.shape
  lhs, rhs = cdot(ax, y), cdot(x, aty)
  np.testing.assert_allclose(lhs, rhs, rtol=2e-5, atol=1e-6 * np.abs(lhs))
  np.testing.assert_allclose(op.normal(x), op.adjoint(op.forward(x)), atol=1e-5)


def test_operators_are_pytrees_and_jit_arguments():
  op = make_op("multi_random")
  leaves = jax.tree.leaves(op)
  assert len(leaves) == 2 and leaves[1].shape == (3, *SHAPE)
  assert jax.tree.leaves(ops.Downsample((1, 2, 2))) == []
  assert jax.tree.unflatten(jax.tree.structure(ops.Downsample(2)), []).factor == (2, 2, 2)
  x = crandn(np.random.default_rng(2), SHAPE)
  np.testing.assert_allclose(jax.jit(lambda o, v: o.normal(v))(op, x), op.normal(x), atol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    ops.Downsample(3).forward(jnp.zeros(SHAPE))


# ---------------------------------------------------------------------------------------------
# Masks and coil maps


@pytest.mark.parametrize("acc", [4, 8])
@pytest.mark.parametrize("kind", ["equispaced", "random"])
def test_mask_centre_and_fraction(kind, acc):
  shape, cf = (8, 64, 48), 0.1
  make = ops.equispaced_mask if kind == "equispaced" else ops.random_mask
  m = np.asarray(make(shape, acc, cf))
  assert m.shape == (64, 48) and set(np.unique(m)) <= {0.0, 1.0}
  # centre block round(0.1 * 64) x round(0.1 * 48) = 6 x 5 around DC (32, 24), fully sampled
  assert m[29:35, 22:27].all()
  assert ops.centre_mask(shape, cf).sum() == 30
  r = ops.effective_acceleration(m)
  if kind == "random":
    assert m.sum() == round(64 * 48 / acc)
  assert abs(r / acc - 1) < 0.03, r
  # sampling spans the whole grid, not just the centre
  assert m[:16].sum() > 0 and m[-16:].sum() > 0 and m[:, :12].sum() > 0


def test_masks_are_deterministic():
  np.testing.assert_array_equal(ops.equispaced_mask((40, 36), 8, 0.08),
                                ops.equispaced_mask((40, 36), 8, 0.08))
  a = ops.random_mask((40, 36), 8, 0.08, key=7)
  np.testing.assert_array_equal(a, ops.random_mask((40, 36), 8, 0.08, key=jax.random.key(7)))
  assert np.any(np.asarray(a) != np.asarray(ops.random_mask((40, 36), 8, 0.08, key=8)))
  # variable density: the inner half of k-space is sampled more densely than the outer ring
  m = np.asarray(ops.random_mask((64, 64), 4, 0.05, key=0))
  inner = m[16:48, 16:48].mean()
  outer = (m.sum() - m[16:48, 16:48].sum()) / (64 * 64 - 32 * 32)
  assert inner > 1.5 * outer
  with pytest.raises(ValueError, match="centre"):
    ops.equispaced_mask((16, 16), 8, 0.5)


def test_coil_maps_normalised_and_fully_sampled_normal_is_identity():
  maps = ops.synthetic_coil_maps(SHAPE, 5)
  assert maps.shape == (5, *SHAPE) and maps.dtype == jnp.complex64
  np.testing.assert_allclose(np.sum(np.abs(maps) ** 2, axis=0), 1.0, atol=1e-5)
  assert np.std(np.abs(maps[0])) > 0.05  # coils really differ in space
  op = ops.MultiCoilMRI(jnp.ones(SHAPE[1:]), maps)
  x = crandn(np.random.default_rng(3), SHAPE)
  np.testing.assert_allclose(op.normal(x), x, atol=1e-5)


def test_simulated_noise_only_on_sampled_kspace():
  op = make_op("single_random", (8, 32, 32))
  x = phantom((8, 32, 32))
  y = np.asarray(ops.simulate_measurement(op, x, 0.1, jax.random.key(0)))
  clean = np.asarray(op.forward(x))
  mask = np.broadcast_to(np.asarray(op.mask), y.shape) > 0
  assert np.all(y[~mask] == 0)
  noise = (y - clean)[mask]
  np.testing.assert_allclose(np.mean(np.abs(noise) ** 2), 0.01, rtol=0.1)
  yr = ops.simulate_measurement(ops.Identity(), x, 0.1, jax.random.key(1))
  assert yr.dtype == jnp.float32
  np.testing.assert_allclose(np.std(np.asarray(yr) - x), 0.1, rtol=0.1)


# ---------------------------------------------------------------------------------------------
# Data consistency / prox


def test_single_coil_data_consistency_is_exact():
  rng = np.random.default_rng(4)
  op = make_op("single_random")
  y = ops.simulate_measurement(op, phantom(SHAPE), 0.05, jax.random.key(2))
  x = crandn(rng, SHAPE)
  mask = np.broadcast_to(np.asarray(op.mask), SHAPE) > 0
  kx = np.asarray(ops.fft3c(x))
  ku = np.asarray(ops.fft3c(op.data_consistency(x, y)))
  np.testing.assert_allclose(ku[mask], np.asarray(y)[mask], atol=1e-5)
  np.testing.assert_allclose(ku[~mask], kx[~mask], atol=1e-5)
  rho = 0.7
  ku = np.asarray(ops.fft3c(op.data_consistency(x, y, rho)))
  np.testing.assert_allclose(ku[mask], ((rho * kx + np.asarray(y)) / (1 + rho))[mask], atol=1e-5)
  assert op.exact_data_consistency and not ops.MultiCoilMRI.exact_data_consistency


@pytest.mark.parametrize("name", ["single_equispaced", "single_random", "down_anisotropic",
                                  "identity"])
@pytest.mark.parametrize("rho", [0.0, 0.3, 2.0])
def test_closed_form_prox_solves_normal_equations(name, rho):
  """Real x: the real-image normal equations Re(A^H (A u - y)) + rho (u - x) = 0, u real."""
  rng = np.random.default_rng(5)
  op = make_op(name)
  x = rng.normal(size=SHAPE).astype(np.float32)
  y = op.forward(rng.normal(size=SHAPE).astype(np.float32))
  if rho > 0:  # data no real image explains (for MRI also no conjugate symmetry)
    y = y + 0.1 + (0.05j if jnp.iscomplexobj(y) else 0.0)
  if name.startswith("single"):
    y = y * op.mask  # measurements live on the sampled locations
  u = op.data_consistency(x, y, rho)
  assert u.dtype == jnp.float32
  grad = np.real(np.asarray(op.adjoint(op.forward(u) - y))) + rho * (np.asarray(u) - x)
  assert np.abs(grad).max() < 1e-5
  if rho == 0.0:
    np.testing.assert_allclose(op.forward(u), y, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 9, 10), (8, 8, 8), (5, 6, 7)])
def test_mirror_kspace_pairs_conjugates_of_real_images(shape):
  x = np.random.default_rng(10).normal(size=(2, *shape)).astype(np.float32)
  k = ops.fft3c(x)
  np.testing.assert_allclose(ops.mirror_kspace(k), np.conj(k), atol=1e-5)
  np.testing.assert_array_equal(ops.mirror_kspace(ops.mirror_kspace(k)), k)


def real_matrix(op, shape):
  """A as a real matrix from R^n to R^2m (real and imaginary parts of every measurement)."""
  n = int(np.prod(shape))
  cols = jax.vmap(op.forward)(jnp.eye(n, dtype=jnp.float32).reshape(n, *shape))
  cols = np.asarray(cols, np.complex128).reshape(n, -1).T
  return np.concatenate([cols.real, cols.imag])


@pytest.mark.parametrize("name", ["single_random", "single_equispaced", "multi_random"])
@pytest.mark.parametrize("shape", [(4, 5, 6), (4, 4, 4)])
@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_real_image_data_step_is_the_real_prox(name, shape, rho):
  """Against a dense solve over real images: (A_r^T A_r + rho I) u = A_r^T y_r + rho x, and at
  rho = 0 the nearest real u with A u = y (x + A_r^+ (y - A x)) for data of a real image."""
  rng = np.random.default_rng(11)
  op = make_op(name, shape)
  if name.startswith("multi"):
    op = dataclasses.replace(op, cg_iters=300)
  x = rng.normal(size=shape).astype(np.float32)
  y = op.forward(rng.normal(size=shape).astype(np.float32))
  if rho > 0:
    y = y + (0.1 + 0.05j) * crandn(rng, y.shape)
    y = y * (np.asarray(op.forward(np.ones(shape, np.float32))) != 0)  # zero where unsampled
  u = np.asarray(op.data_consistency(jnp.asarray(x), y, rho), np.float64)
  a = real_matrix(op, shape)
  yc = np.asarray(y, np.complex128).ravel()
  yr = np.concatenate([yc.real, yc.imag])
  if rho > 0:
    ref = np.linalg.solve(a.T @ a + rho * np.eye(a.shape[1]), a.T @ yr + rho * x.ravel())
  else:
    ref = x.ravel() + np.linalg.pinv(a, rcond=1e-5) @ (yr - a @ x.ravel())
  np.testing.assert_allclose(u.ravel(), ref, atol=2e-4 * np.abs(ref).max())
  if rho == 0:
    res = np.linalg.norm(np.asarray(op.forward(u.astype(np.float32))) - np.asarray(y))
    assert res <= 1e-5 * np.linalg.norm(np.asarray(y)), res


@pytest.mark.slow
def test_multi_coil_cg_prox_converges_to_normal_equation_solution():
  shape, rho = (4, 6, 6), 0.1
  rng = np.random.default_rng(6)
  op = ops.MultiCoilMRI(ops.random_mask(shape, 3, 0.2, key=1), ops.synthetic_coil_maps(shape, 4))
  y = ops.simulate_measurement(op, rng.random(shape).astype(np.float32), 0.05, jax.random.key(3))
  x = crandn(rng, shape)
  n = int(np.prod(shape))
  basis = jnp.eye(n, dtype=jnp.complex64).reshape(n, *shape)
  normal = np.asarray(jax.vmap(op.normal)(basis)).reshape(n, n).T.astype(np.complex128)
  rhs = np.asarray(op.adjoint(y) + rho * x, np.complex128).ravel()
  exact = np.linalg.solve(normal + rho * np.eye(n), rhs).reshape(shape)

  def objective(u):
    r = np.asarray(op.forward(u)) - np.asarray(y)
    return 0.5 * np.sum(np.abs(r) ** 2) + 0.5 * rho * np.sum(np.abs(np.asarray(u) - x) ** 2)

  u3 = op.data_consistency(x, y, rho, n_iter=3)
  assert objective(u3) < objective(x)
  u = jax.jit(lambda o, a, b: o.data_consistency(a, b, rho, n_iter=40))(op, x, y)
  np.testing.assert_allclose(np.asarray(u), exact, atol=1e-4 * np.abs(exact).max())
  assert objective(u) <= objective(u3) + 1e-6


# ---------------------------------------------------------------------------------------------
# Classical reconstructions


def test_zero_filled_recovers_fully_sampled_noiseless_image():
  x = phantom(SHAPE)
  full = jnp.ones(SHAPE[1:])
  for op in (ops.SingleCoilMRI(full), ops.MultiCoilMRI(full, ops.synthetic_coil_maps(SHAPE, 4))):
    np.testing.assert_allclose(classical.zero_filled(op, op.forward(x)), x, atol=1e-5)
    mag = classical.zero_filled(op, op.forward(x), magnitude=True)
    assert mag.dtype == jnp.float32
    np.testing.assert_allclose(mag, x, atol=1e-5)
  np.testing.assert_allclose(classical.zero_filled(ops.Identity(), x), x)
  op = ops.Downsample((2, 3, 5))
  low = np.random.default_rng(7).random((4, 4, 2)).astype(np.float32)
  up = np.asarray(classical.zero_filled(op, low))  # nearest: every block repeats its voxel
  np.testing.assert_allclose(up, low.repeat(2, 0).repeat(3, 1).repeat(5, 2), atol=1e-6)
  np.testing.assert_allclose(op.forward(up), low, atol=1e-6)
  tri = classical.zero_filled(op, jnp.full((4, 4, 2), 0.3), upsampling="trilinear")
  assert tri.shape == SHAPE
  np.testing.assert_allclose(tri, 0.3, atol=1e-6)


def test_gradient_divergence_adjoint_and_tv():
  rng = np.random.default_rng(8)
  x, g = crandn(rng, (2, *SHAPE)), crandn(rng, (3, 2, *SHAPE))
  lhs, rhs = cdot(classical.gradient(x), g), -cdot(x, classical.divergence(g))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
  step = np.zeros(SHAPE, np.float32)
  step[:, :, 5:] = 1.0  # one unit jump across an H x D face of 8 x 12 voxels
  np.testing.assert_allclose(classical.total_variation(step), 96.0, rtol=1e-6)
  np.testing.assert_allclose(classical.total_variation(1j * step), 96.0, rtol=1e-6)


@pytest.mark.parametrize("name,expected", [
    ("single_random", 1.0), ("single_equispaced", 1.0), ("down_anisotropic", 1 / np.sqrt(30)),
    ("identity", 1.0)])
def test_operator_norm(name, expected):
  got = float(classical.operator_norm(make_op(name), SHAPE))
  np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_multi_coil_operator_norm_at_most_one():
  got = float(classical.operator_norm(make_op("multi_random"), SHAPE))
  assert 0.5 < got <= 1.0 + 1e-4


def test_tv_with_zero_weight_and_identity_returns_y():
  y = jnp.asarray(phantom(SHAPE))
  x = classical.tv_reconstruction(ops.Identity(), y, 0.0, n_iter=200, x0=jnp.zeros(SHAPE))
  np.testing.assert_allclose(x, y, atol=1e-4)


def test_tv_beats_zero_filled_on_undersampled_phantom():
  shape = (16, 16, 16)
  truth = phantom(shape)
  op = ops.SingleCoilMRI(ops.random_mask(shape, 4, 0.15, key=0))
  y = ops.simulate_measurement(op, truth, 0.02, jax.random.key(0))
  zf = classical.zero_filled(op, y)
  lam = 0.02
  x, objective = classical.tv_reconstruction(op, y, lam, n_iter=300, return_objective=True)
  p_zf, p_tv = psnr(np.abs(zf), truth), psnr(np.abs(x), truth)
  assert p_tv > p_zf + 3.0, (p_zf, p_tv)
  objective = np.asarray(objective)
  start = float(classical.tv_objective(op, zf, y, lam))
  assert objective[-1] < 0.8 * start
  assert objective[-1] <= objective[len(objective) // 2] + 1e-3 * start


@pytest.mark.parametrize("name,lam", [("multi_equispaced", 0.01), ("down_isotropic", 0.003)])
def test_tv_improves_other_operators(name, lam):
  truth = phantom(SHAPE)
  op = make_op(name)
  y = ops.simulate_measurement(op, truth, 0.02, jax.random.key(4))
  zf = np.abs(np.asarray(classical.zero_filled(op, y)))
  x = classical.tv_reconstruction(op, y, lam, n_iter=300)
  assert psnr(np.abs(np.asarray(x)), truth) > psnr(zf, truth) + 1.0


@pytest.fixture(scope="module")
def tv_least_squares():
  """TV with a negligible weight on real images, compiled once per operator type and shape."""
  return jax.jit(lambda op, y: classical.tv_reconstruction(op, y, 1e-6, n_iter=2000))


@pytest.mark.parametrize("name,shape", [
    ("single_random", (8, 9, 10)), ("single_equispaced", (8, 9, 10)),
    ("single_random", (8, 8, 8)), ("single_equispaced", (8, 8, 8)), ("multi", (4, 5, 6))])
def test_tv_fits_real_image_k_space_with_any_mask(tv_least_squares, name, shape):
  """Real-image data term: with lam ~ 0 TV fits noiseless k-space of a real image; the real part
  of the complex-image minimiser misses it by percents. Chambolle-Pock converges slowly along
  A's small singular values, so the multi-coil case is a small, well-conditioned one."""
  x = np.abs(phantom(shape) + np.random.default_rng(12).normal(size=shape)).astype(np.float32)
  if name == "multi":
    op = ops.MultiCoilMRI(ops.random_mask(shape, 3, 0.2, key=1), ops.synthetic_coil_maps(shape, 3))
  else:
    op = make_op(name, shape)
  y = op.forward(x)
  rec = tv_least_squares(op, y)
  assert rec.dtype == jnp.float32
  rel = float(jnp.linalg.norm(op.forward(rec) - y) / jnp.linalg.norm(y))
  assert rel <= 1e-4, rel
  if name == "single_random":
    old = jnp.real(classical.tv_reconstruction(op, y, 1e-6, n_iter=2000, real=False))
    assert float(jnp.linalg.norm(op.forward(old) - y) / jnp.linalg.norm(y)) > 1e-2
