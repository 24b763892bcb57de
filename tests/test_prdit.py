"""PRDiT: tokeniser, local denoiser + residual DiT, trigonometric diffusion and its samplers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.diffusion import trig
from jaxvol.models import prdit
from jaxvol.ops import tokens

TINY = dict(local_width=16, width=16, depth=2, heads=2, chunk_size=4, attention="chunked")


def _volume(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _reference_windows(x, patch, stride):
  """Token windows by explicit indexing of the reflect-padded volume, one token at a time."""
  m = (patch - stride) // 2
  xp = np.pad(x, [(0, 0)] + [(m, m)] * 3 + [(0, 0)], mode="reflect")
  gd, gh, gw = (v // stride for v in x.shape[1:4])
  return np.stack([xp[:, i * stride:i * stride + patch, j * stride:j * stride + patch,
                      k * stride:k * stride + patch].reshape(x.shape[0], -1)
                   for i in range(gd) for j in range(gh) for k in range(gw)], axis=1)


# --- tokeniser -----------------------------------------------------------------------------------

def test_untokenize_inverts_block_split():
  x = _volume((2, 16, 24, 8, 3))
  blocks = tokens.blockify(jnp.asarray(x))
  assert blocks.shape == (2, 6, 8**3 * 3)
  np.testing.assert_array_equal(np.asarray(tokens.untokenize(blocks, x.shape[1:4])), x)
  # A window as large as the stride is the block split itself.
  np.testing.assert_array_equal(np.asarray(tokens.tokenize(jnp.asarray(x), patch=8)),
                                np.asarray(blocks))


@pytest.mark.parametrize("patch", [12, 16])
def test_window_centre_is_own_block(patch):
  x = _volume((2, 16, 24, 16, 2), seed=1)
  win = np.asarray(tokens.tokenize(jnp.asarray(x), patch)).reshape(2, 12, patch, patch, patch, 2)
  m = (patch - 8) // 2
  centre = win[:, :, m:m + 8, m:m + 8, m:m + 8].reshape(2, 12, -1)
  np.testing.assert_array_equal(centre, np.asarray(tokens.blockify(jnp.asarray(x))))


@pytest.mark.parametrize("patch,stride", [(12, 8), (20, 8), (6, 4)])
def test_windows_reflect_padded_at_borders(patch, stride):
  x = _volume((1, 16, 8, 24, 2), seed=2)
  got = np.asarray(tokens.tokenize(jnp.asarray(x), patch, stride))
  np.testing.assert_array_equal(got, _reference_windows(x, patch, stride))
  if (patch, stride) == (12, 8):
    # Corner token, first depth row of its window: padded index 0 mirrors voxel 2 (no edge repeat).
    first = got[0, 0].reshape(12, 12, 12, 2)
    np.testing.assert_array_equal(first[0, 2:10, 2:10], x[0, 2, :8, :8])
    np.testing.assert_array_equal(first[1, 2:10, 2:10], x[0, 1, :8, :8])


def test_token_counts_and_grid():
  assert tokens.token_grid((16, 24, 8)) == (2, 3, 1)
  assert [tokens.num_tokens((s,) * 3) for s in (16, 32, 64, 128, 256)] == [8, 64, 512, 4096, 32768]
  for s, n in [(16, 8), (32, 64)]:
    assert tokens.tokenize(jnp.zeros((1, s, s, s, 1))).shape == (1, n, 12**3)


def test_token_coordinates():
  c = tokens.token_coordinates((2, 3, 4))
  assert c.shape == (24, 3) and c.min() > 0 and c.max() < 1
  np.testing.assert_allclose(c[0], [0.25, 1 / 6, 0.125])
  np.testing.assert_allclose(c[-1], [0.75, 5 / 6, 0.875])
  np.testing.assert_allclose(c[1] - c[0], [0, 0, 0.25])  # row-major: the last axis runs fastest


def test_bad_windows_and_shapes_raise():
  x = jnp.zeros((1, 16, 16, 16, 1))
  for patch in (7, 11):  # smaller than the stride; odd margin
    with pytest.raises(ValueError, match="token window"):
      tokens.tokenize(x, patch)
  with pytest.raises(ValueError, match="multiples of the token stride"):
    tokens.tokenize(jnp.zeros((1, 16, 12, 16, 1)))
  with pytest.raises(ValueError, match="reflect padding"):
    tokens.tokenize(jnp.zeros((1, 8, 8, 8, 1)), patch=24)


# --- model ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage2():
  """A tiny stage-2 model, its initial params, and a copy with non-zero local/residual outputs."""
  model = prdit.PRDiT(stage=2, **TINY)
  x = jnp.asarray(_volume((2, 16, 16, 16, 1), seed=3))
  t = jnp.array([10.0, 700.0])
  # Plain arrays: the residual DiT's kernels come boxed with their logical axis names.
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x, t))["params"]
  # Random weights everywhere (zero-initialised read-outs and gates included), at a small scale.
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  noisy = jax.tree_util.tree_unflatten(
      treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params, noisy, x, t


def test_stage2_starts_as_stage1(stage2):
  model, params, noisy, x, t = stage2
  # Trained-looking stage-1 weights under "local", freshly initialised "residual".
  params = {"local": noisy["local"], "residual": params["residual"]}
  stage1 = model.clone(stage=1)
  eps1, x01 = jax.jit(stage1.apply)({"params": {"local": params["local"]}}, x, t)
  eps2, x02 = jax.jit(model.apply)({"params": params}, x, t)
  assert float(jnp.abs(eps1).max()) > 0 and float(jnp.abs(x01).max()) > 0
  np.testing.assert_array_equal(np.asarray(eps2), np.asarray(eps1))
  np.testing.assert_array_equal(np.asarray(x02), np.asarray(x01))
  assert set(jax.eval_shape(stage1.init, jax.random.PRNGKey(0), x, t)["params"]) == {"local"}


def test_stage2_does_not_train_local(stage2):
  model, _, noisy, x, t = stage2
  model = model.clone(remat="full")

  def loss(p):
    eps, x0 = model.apply({"params": p}, x, t)
    return jnp.mean(jnp.square(x0 - x)) + jnp.mean(jnp.square(eps))

  grads = jax.jit(jax.grad(loss))(noisy)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree_util.tree_leaves(grads["local"]))
  assert float(jnp.abs(grads["residual"]["block0"]["attn"]["qkv"]["kernel"]).max()) > 0


def test_chunked_attention_matches_reference(stage2):
  model, _, noisy, x, t = stage2
  chunked = jax.jit(model.apply)({"params": noisy}, x, t)
  reference = jax.jit(model.clone(attention="xla").apply)({"params": noisy}, x, t)
  for a, b in zip(chunked, reference):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def test_same_params_any_resolution(stage2):
  model, _, noisy, _, _ = stage2
  apply = jax.jit(model.apply)
  for shape in [(1, 32, 32, 32, 1), (1, 16, 32, 24, 1)]:
    eps, x0 = apply({"params": noisy}, jnp.asarray(_volume(shape, seed=4)), jnp.array([300.]))
    assert eps.shape == shape and x0.shape == shape and eps.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(eps)) & jnp.all(jnp.isfinite(x0)))


def test_position_code_layout_and_grid_dependent_frequencies():
  """W axis first, then H, then D; per axis F sines then F cosines of 2 pi f (i + 0.5) / g with
  f log-spaced from 1 to 0.95 g / 2 (the authors' code; the fixture test checks it to theirs)."""
  grid = (2, 3, 4)
  code = np.asarray(prdit.position_code(grid, 26))  # 4 frequencies per axis, 2 padding zeros
  assert code.shape == (24, 26) and code.dtype == np.float32
  np.testing.assert_array_equal(code[:, 24:], 0)
  last = code[-1]  # token (1, 2, 3), the last in row-major order
  for block, (axis, index) in enumerate(((2, 3), (1, 2), (0, 1))):
    g = grid[axis]
    f = 2 * np.pi * (0.95 * g / 2)**np.linspace(0, 1, 4)
    c = (index + 0.5) / g
    np.testing.assert_allclose(last[8 * block:8 * block + 4], np.sin(c * f), atol=1e-6)
    np.testing.assert_allclose(last[8 * block + 4:8 * block + 8], np.cos(c * f), atol=1e-6)
  # Same centre 0.25 on a 2- and a 6-token axis, but a finer grid gets higher frequencies.
  small, large = prdit.position_code((2, 2, 2), 24), prdit.position_code((6, 6, 6), 24)
  np.testing.assert_allclose(small[0, [0, 4]], large[1 * 36 + 1 * 6 + 1, [0, 4]], atol=1e-6)
  assert np.abs(small[0] - large[1 * 36 + 1 * 6 + 1]).max() > 0.1
  assert len(np.unique(np.round(np.asarray(large), 5), axis=0)) == 216  # all codes distinct
  with pytest.raises(ValueError, match="width >= 6"):
    prdit.position_code((2, 2, 2), 4)


def test_prdit_from_name():
  m = prdit.prdit_from_name("PRDiT-B/12/4")
  assert (m.width, m.depth, m.heads, m.patch, m.stage) == (768, 4, 12, 12, 2)
  assert prdit.prdit_from_name("B/12/0").stage == 1
  assert prdit.prdit_from_name("XL/12", attention="xla").depth == 28
  for bad in ("B/12/x", "M/12/4", "B/11/4"):
    with pytest.raises(ValueError):
      prdit.prdit_from_name(bad)


# --- diffusion -----------------------------------------------------------------------------------

DIFF = trig.TrigDiffusion()


def test_q_sample_marginal_std():
  x0 = 0.2 + 0.4 * jax.random.normal(jax.random.PRNGKey(0), (4, 4096))
  eps = DIFF.noise(jax.random.PRNGKey(1), x0.shape)
  assert abs(float(eps.std()) - 0.5) < 0.01
  np.testing.assert_array_equal(np.asarray(DIFF.q_sample(x0, jnp.zeros(4), eps)), np.asarray(x0))
  for t in (250, 500, 999):
    xt = DIFF.q_sample(x0, jnp.full((4,), t), eps)
    th = np.pi * t / 2000
    want = np.sqrt(np.cos(th)**2 * 0.4**2 + np.sin(th)**2 * 0.5**2)
    assert abs(float(xt.std()) / want - 1) < 0.03, t


def test_loss_finite_and_exact_targets(stage2):
  model, _, noisy, x, _ = stage2
  zero, _ = DIFF.loss(x, x, x, x)
  assert float(zero) == 0.0
  denoise = lambda xt, t: model.apply({"params": noisy}, xt, t)
  loss, metrics = DIFF.training_loss(denoise, x, jax.random.PRNGKey(2))
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert abs(float(loss) - float(metrics["x0_mse"] + metrics["eps_mse"])) < 1e-6


def test_gaussian_denoiser_is_consistent():
  den = trig.GaussianDenoiser(DIFF, 0.2, 0.4)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10))
  t = jnp.array([0.0, 400.0, 999.0])
  eps_hat, x0_hat = den(x, t)
  th = DIFF.angle(t)[:, None]
  np.testing.assert_allclose(np.asarray(jnp.cos(th) * x0_hat + jnp.sin(th) * eps_hat),
                             np.asarray(x), atol=1e-6)
  np.testing.assert_allclose(np.asarray(x0_hat[0]), np.asarray(x[0]), atol=1e-6)  # t = 0: clean


def test_sample_schedule_is_the_authors_grid():
  euler, pc = DIFF.sample_schedule(10, "euler"), DIFF.sample_schedule(10, "pc")
  t = np.arange(900, -1, -100)
  scale = np.pi / 2000
  for s in (euler, pc):
    np.testing.assert_array_equal(s["t"], t)  # reversed(range(0, T, T // K))
    np.testing.assert_allclose(s["theta"], t * scale)
  np.testing.assert_allclose(euler["target"], np.append(t[1:], 0) * scale)
  assert np.all(euler["alpha"] == 1) and np.all(euler["noise_std"] == 0)
  # pc: jump two steps down and re-noise one step up while the jump stays above t = 0.
  noisy = t - 200 > 0
  assert noisy.sum() == 7 and np.array_equal(pc["noise_std"] > 0, noisy)
  a, b = (t[noisy] - 200) * scale, (t[noisy] - 100) * scale
  np.testing.assert_allclose(pc["target"][noisy], a)
  np.testing.assert_allclose(pc["alpha"][noisy], np.cos(b) / np.cos(a))
  want = 0.25 * (np.sin(b)**2 - pc["alpha"][noisy]**2 * np.sin(a)**2)  # variance lost to alpha
  np.testing.assert_allclose(pc["noise_std"][noisy]**2, want, atol=1e-12)
  np.testing.assert_allclose(pc["target"][~noisy], euler["target"][~noisy])
  for bad in (0, 3, 1001):
    with pytest.raises(ValueError, match="divide"):
      DIFF.sample_schedule(bad)


def test_samplers_reproduce_gaussian_data():
  mean, std = 0.2, 0.4
  den = trig.GaussianDenoiser(DIFF, mean, std)
  x_init = DIFF.noise(jax.random.PRNGKey(0), (16, 256))  # 4096 scalars
  key = jax.random.PRNGKey(1)
  euler = jax.jit(lambda x: DIFF.sample(den, x, 50))(x_init)
  pc = jax.jit(lambda x, k: DIFF.sample(den, x, 100, "pc", k))(x_init, key)
  pc_ddim = jax.jit(lambda x, k: DIFF.sample(den, x, 100, "pc", k, predictor="ddim"))(x_init, key)
  for out, tol in ((euler, 0.03), (pc, 0.03), (pc_ddim, 0.05)):
    assert abs(float(out.mean()) - mean) < 0.03
    assert abs(float(out.std()) / std - 1) < tol
  with pytest.raises(ValueError, match="rng"):
    DIFF.sample(den, x_init, 10, "pc")


def test_pc_noise_is_fold_in_of_the_step_or_given():
  """Step k re-noises with normal(fold_in(rng, k)); passing those draws gives the same sample."""
  den = trig.GaussianDenoiser(DIFF, 0.2, 0.4)
  x_init = DIFF.noise(jax.random.PRNGKey(0), (2, 64))
  key = jax.random.PRNGKey(3)
  draws = jnp.stack([jax.random.normal(jax.random.fold_in(key, k), x_init.shape)
                     for k in range(10)])
  a = DIFF.sample_with_estimate(den, x_init, 10, "pc", rng=key)
  b = DIFF.sample_with_estimate(den, x_init, 10, "pc", noise=draws)
  for u, v in zip(a, b):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=1e-6)
  # The final state and the last estimate (at t = 0) are both returned; for an exact denoiser
  # they coincide.
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(a[1]), atol=1e-6)
  with pytest.raises(ValueError, match="noise must be shaped"):
    DIFF.sample_with_estimate(den, x_init, 10, "pc", noise=draws[:5])
