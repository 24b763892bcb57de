"""Plug-and-play solvers with diffusion priors: Gaussian posterior, data consistency, patch priors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol.diffusion import gaussian
from jaxvol.inverse import operators as ops
from jaxvol.inverse import priors
from jaxvol.inverse import solvers
from jaxvol.ops import windows

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

MU, S, SN = 0.3, 0.5, 0.2
SHAPE = (8, 10, 12)


@pytest.fixture(scope="module")
def gaussian_problem():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = MU + S * jax.random.normal(k1, SHAPE)
  y = x + SN * jax.random.normal(k2, SHAPE)
  post = MU + S**2 / (S**2 + SN**2) * (y - MU)
  return x, y, post


def test_diffpir_monte_carlo_mean_is_the_posterior_mean(gaussian_problem):
  _, y, post = gaussian_problem
  prior, op = priors.GaussianPrior(MU, S), ops.Identity()
  run = jax.jit(jax.vmap(lambda k: solvers.diffpir(prior, op, y, SHAPE, k, num_steps=20,
                                                   noise_std=SN)))
  samples = run(jax.random.split(jax.random.PRNGKey(1), 48))
  mean = samples.mean(0)
  err = float(jnp.mean((mean - post) ** 2))
  assert err < 0.15 * float(jnp.mean((y - post) ** 2)), err
  assert err < 0.15 * float(jnp.mean((MU - post) ** 2)), err
  assert abs(float(mean.mean() - post.mean())) < 0.01


def test_dps_moves_towards_the_posterior_mean(gaussian_problem):
  _, y, post = gaussian_problem
  prior, op = priors.GaussianPrior(MU, S), ops.Identity()
  run = jax.jit(jax.vmap(lambda k: solvers.dps(prior, op, y, SHAPE, k, num_steps=50, zeta=0.5)))
  mean = run(jax.random.split(jax.random.PRNGKey(2), 16)).mean(0)
  assert np.all(np.isfinite(mean))
  err = float(jnp.mean((mean - post) ** 2))
  assert err < 0.5 * float(jnp.mean((MU - post) ** 2)), err


def test_diffpir_complex_noise_weighting_matches_the_real_image_posterior():
  """Fully sampled single-coil MRI with complex noise (E|n|^2 = SN^2): a real image sees noise of
  variance SN^2 / 2 per voxel (the real part of F^H n), so the posterior mean shrinks with it."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(10))
  x = MU + S * jax.random.normal(k1, SHAPE)
  op = ops.SingleCoilMRI(jnp.ones(SHAPE[1:]))
  y = ops.simulate_measurement(op, x, SN, k2)
  obs = jnp.real(op.adjoint(y))
  post = MU + S**2 / (S**2 + SN**2 / 2) * (obs - MU)
  run = jax.jit(jax.vmap(lambda k: solvers.diffpir(priors.GaussianPrior(MU, S), op, y, SHAPE, k,
                                                   num_steps=20, noise_std=SN)))
  mean = run(jax.random.split(jax.random.PRNGKey(11), 48)).mean(0)
  err = float(jnp.mean((mean - post) ** 2))
  wrong = MU + S**2 / (S**2 + SN**2) * (obs - MU)  # weighting by the complex variance SN^2
  assert err < 0.25 * float(jnp.mean((wrong - post) ** 2)), err
  assert err < 0.15 * float(jnp.mean((obs - post) ** 2)), err


@pytest.fixture(scope="module")
def noiseless_diffpir():
  """DiffPIR with the exact Gaussian prior and noise_std = 0 (rho = 0: every data step is the
  projection onto {real x : A x = y}); compiled once per operator type and shape."""
  prior = priors.GaussianPrior(MU, S)
  return jax.jit(lambda op, y, k: solvers.diffpir(prior, op, y, y.shape[-3:], k, num_steps=10))


@pytest.mark.parametrize("shape", [(8, 9, 10), (8, 8, 8)])
@pytest.mark.parametrize("mask_kind", ["random", "equispaced"])
@pytest.mark.parametrize("coils", [1, 3])
def test_diffpir_noiseless_mri_keeps_the_measured_k_space(noiseless_diffpir, shape, mask_kind,
                                                          coils):
  """The real-image data step fits k-space of a real image with any mask (the real part of the
  complex step missed it by 3-6% here). Multi-coil: CG at rho = 0, run to convergence."""
  x = jnp.abs(MU + S * jax.random.normal(jax.random.PRNGKey(3), shape))
  if mask_kind == "random":
    mask = ops.random_mask(shape, 4, 0.2, key=1)
  else:
    mask = ops.equispaced_mask(shape, 4, 0.2)
  if coils == 1:
    op = ops.SingleCoilMRI(mask)
  else:
    op = ops.MultiCoilMRI(mask, ops.synthetic_coil_maps(shape, coils), cg_iters=400)
  y = op.forward(x)
  rec = noiseless_diffpir(op, y, jax.random.PRNGKey(4))
  assert rec.dtype == jnp.float32
  rel = float(jnp.linalg.norm(op.forward(rec) - y) / jnp.linalg.norm(y))
  assert rel <= 1e-4, rel
  free = priors.GaussianPrior(MU, S)(jax.random.normal(jax.random.PRNGKey(9), shape), 0)
  assert float(jnp.linalg.norm(op.forward(free) - y)) > 0.5 * float(jnp.linalg.norm(y))


def test_dps_step_options_and_last_likelihood_step():
  prior, op = priors.GaussianPrior(MU, S), ops.Identity()
  y = jnp.full(SHAPE, 0.7)
  key = jax.random.PRNGKey(12)
  # One level (t = 999): the output is x0_hat(x_T) moved by the paper's step, zeta grad ||r||^2 /
  # ||r|| = -2 zeta gain r / ||r|| with r = y - x0_hat and gain = d x0_hat / d x_T.
  out = solvers.dps(prior, op, y, SHAPE, key, num_steps=1, zeta=0.3)
  x_t = jax.random.normal(jax.random.split(key)[0], SHAPE, jnp.float32)
  a = float(prior.diffusion.abar(999))
  gain = np.sqrt(a) * S**2 / (a * S**2 + 1 - a)
  x0 = prior(x_t, 999)
  r = y - x0
  np.testing.assert_allclose(out, x0 + 0.3 * 2 * gain * r / jnp.linalg.norm(r), atol=1e-5)
  # The authors' code descends grad ||r||: half the paper's step for the same zeta.
  paper = solvers.dps(prior, op, y, SHAPE, key, num_steps=5, zeta=0.3)
  official = solvers.dps(prior, op, y, SHAPE, key, num_steps=5, zeta=0.6, step="official")
  np.testing.assert_allclose(paper, official, atol=1e-6)
  with pytest.raises(ValueError, match="paper"):
    solvers.dps(prior, op, y, SHAPE, key, step="half")


def _x0_net(d):
  """A per-voxel 'network' returning the exact Gaussian x0 (x0 parameterisation)."""
  g = priors.GaussianPrior(MU, S, d)

  def apply(params, x, cond, t):
    del params, cond
    return g(x, t)
  return apply


@pytest.mark.parametrize("shift", [False, True])
def test_patch_prior_equals_whole_prior_for_a_voxelwise_denoiser(shift):
  d = gaussian.GaussianDiffusion(parameterization="x0")
  whole = priors.NetworkPrior(_x0_net(d), None, d, clip=None)
  patch = priors.NetworkPrior(_x0_net(d), None, d, windows.SlidingWindow((8, 8, 8), batch=2),
                              shift=shift, clip=None)
  x = jax.random.normal(jax.random.PRNGKey(5), (12, 16, 20))
  for t in (10, 500, 999):
    a = whole(x, t)
    b = jax.jit(lambda x_, k: patch(x_, t, k))(x, jax.random.PRNGKey(t))
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_patch_prior_cuts_fixed_channels_with_the_same_windows():
  """A 'network' that returns its first position channel gives back the whole grid's channel."""
  from jaxvol.data import pipeline  # pylint: disable=import-outside-toplevel
  d = gaussian.GaussianDiffusion(parameterization="x0")
  shape = (12, 16, 20)
  pos = jnp.asarray(pipeline.position_grid((24, 16, 20), ((12, 24), (0, 16), (0, 20))))
  apply = lambda params, x, cond, t: cond[..., :1]
  prior = priors.NetworkPrior(apply, None, d, windows.SlidingWindow((8, 8, 8), batch=2),
                              clip=None, cond=pos)
  x = jnp.zeros(shape)
  for seed in range(3):
    out = jax.jit(lambda k: prior(x, 500, k))(jax.random.PRNGKey(seed))
    np.testing.assert_allclose(out, pos[..., 0], atol=1e-5)
  with pytest.raises(ValueError, match="do not match"):
    prior(jnp.zeros((8, 8, 8)), 500)


def test_one_prior_object_runs_in_every_solver_and_operator():
  d = gaussian.GaussianDiffusion(parameterization="x0")
  prior = priors.NetworkPrior(_x0_net(d), None, d, windows.SlidingWindow((8, 8, 8), batch=4))
  x = jnp.abs(MU + S * jax.random.normal(jax.random.PRNGKey(6), SHAPE))
  mask = jnp.asarray(ops.random_mask(SHAPE, 4, 0.2, key=0))
  operators = [ops.SingleCoilMRI(mask),
               ops.MultiCoilMRI(mask, ops.synthetic_coil_maps(SHAPE, 4), cg_iters=5),
               ops.Downsample((2, 2, 2)), ops.Identity()]
  for op in operators:
    y = op.forward(x)
    for name, solver in solvers.SOLVERS.items():
      kw = {"num_steps": 5}
      if name == "diffpir":
        kw["min_rho"] = 1e-3
      out = jax.jit(lambda k: solver(prior, op, y, SHAPE, k, **kw))(jax.random.PRNGKey(7))
      assert out.shape == SHAPE and out.dtype == jnp.float32, (name, type(op).__name__)
      assert np.all(np.isfinite(out)), (name, type(op).__name__)


def test_bad_step_count_is_an_error():
  with pytest.raises(ValueError, match="num_steps"):
    solvers.diffpir(priors.GaussianPrior(MU, S), ops.Identity(), jnp.zeros(SHAPE), SHAPE,
                    jax.random.PRNGKey(0), num_steps=0)


def _load_cfg(name, variant):
  import importlib.util  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # The fixture's store holds one subject: the configs' hemisphere split.
  return mod.get_config(f"{variant},heldout")


@pytest.fixture(scope="module")
def trained_prior(tmp_path_factory):
  """A tiny unconditional prior trained for 2 steps on one synthetic 'T1' (32x16x16)."""
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  from jaxvol.data import store as store_lib  # pylint: disable=import-outside-toplevel
  from jaxvol.train import loop  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("prior")
  rng = np.random.default_rng(0)
  vol = rng.uniform(0, 100, (32, 16, 16)).astype(np.float32)
  nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), root / "t1.nii.gz")
  (root / "list.csv").write_text("subject,split,t1\ns0,train,t1.nii.gz\n")
  store_lib.convert(root / "list.csv", root / "store", {"t1": "mri"})
  c = _load_cfg("patch_prior_train", "smoke")
  c.data.store = str(root / "store")
  c.model.base_width = 4
  c.train.steps = 2
  c.mesh.data = 1
  loop.train(c, str(root / "run"))
  c.data.position_channels = True
  loop.train(c, str(root / "run_pos"))
  return root


def _small(c, root):
  c.data.store = str(root / "store")
  c.model.base_width = 4
  c.mesh.data = 1
  c.pnp.prior_workdir = str(root / "run")
  return c


def test_prior_trained_on_patches_plugs_into_the_solvers(trained_prior):
  """An unconditional full3d prior trains through the standard loop and runs in every solver."""
  from jaxvol import config as config_lib  # pylint: disable=import-outside-toplevel
  from jaxvol import methods  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import volumes  # pylint: disable=import-outside-toplevel
  c = _load_cfg("patch_prior_train", "smoke")
  c.data.store = str(trained_prior / "store")
  c.model.base_width = 4
  params, step = volumes.load_params(c, str(trained_prior / "run"))
  assert step == 2
  method = methods.build(c)
  prior = priors.from_method(method, params, method.sliding_window())
  shape = (16, 16, 24)  # larger than the 16^3 patches along one axis
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, shape), jnp.float32)
  op = ops.SingleCoilMRI(jnp.asarray(ops.equispaced_mask(shape, 4, 0.2)))
  y = op.forward(x)
  key = jax.random.PRNGKey(0)
  for solver in solvers.SOLVERS.values():
    # Optimised code generation for this one program: DPS through the windowed prior runs many
    # times slower at the suite's LLVM level 0 (tests/conftest.py) than it takes to compile.
    solve = jax.jit(lambda k, s=solver: s(prior, op, y, shape, k, num_steps=3)).lower(key).compile(
        {"xla_backend_optimization_level": 2})
    out = solve(key)
    assert out.shape == shape and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="unconditional"):
    priors.from_method(methods.build(config_lib.smoke_overrides(config_lib.base_config())), params)


def test_position_channel_prior_reconstructs_through_evaluate(trained_prior, tmp_path):
  from jaxvol import methods  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import pnp as pnp_eval  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import volumes  # pylint: disable=import-outside-toplevel
  c = _small(_load_cfg("pnp_mri_recon", "smoke"), trained_prior)
  c.data.position_channels = True
  c.pnp.prior_workdir = str(trained_prior / "run_pos")
  params, _ = volumes.load_params(c, c.pnp.prior_workdir)
  assert params["params"]["stem"]["kernel"].shape[-2] == 4  # x_t + 3 position channels
  method = methods.build(c)
  with pytest.raises(ValueError, match="position channels"):
    priors.from_method(method, params, method.sliding_window())
  summary = pnp_eval.reconstruct(c, str(tmp_path))
  assert all(np.isfinite(v) for m in summary["metrics"].values() for v in m.values())
  # A checkpoint trained without positions is refused by a config asking for them.
  c.pnp.prior_workdir = str(trained_prior / "run")
  with pytest.raises(ValueError, match="position_channels"):
    pnp_eval.reconstruct(c, str(tmp_path / "other"))


@pytest.mark.parametrize("name,variant,solver", [("pnp_mri_recon", "smoke", "diffpir"),
                                                 ("pnp_mri_recon", "smoke,r8,multicoil", "dps"),
                                                 ("pnp_mri_sr", "smoke,x2", "diffpir")])
def test_pnp_evaluate_writes_reconstructions(trained_prior, tmp_path, name, variant, solver):
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import pnp as pnp_eval  # pylint: disable=import-outside-toplevel
  c = _small(_load_cfg(name, variant), trained_prior)
  c.pnp.solver = solver
  summary = pnp_eval.reconstruct(c, str(tmp_path))
  out = tmp_path / "pnp"
  assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert set(summary["metrics"]) == {"zero_filled", "tv", solver}
  for m in summary["metrics"].values():
    assert all(np.isfinite(v) for v in m.values())
  for rec in ("zero_filled", "tv", solver):
    img = nib.load(out / "nifti" / f"s0_{rec}.nii.gz")
    assert img.shape == (32, 16, 16)
    np.testing.assert_allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]), atol=1e-5)
  assert (out / "previews" / "s0.png").exists() and (out / "metrics.csv").exists()
  assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_pnp_reconstructs_the_clipped_box_into_a_fresh_folder(trained_prior, tmp_path):
  """config.eval.max_box: the measured, reconstructed and scored box is centred in the evaluation
  region (the upper half of the 32x16x16 volume's axis 0); the folder of an earlier run is
  replaced as a whole."""
  import csv  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import nibabel as nib  # pylint: disable=import-outside-toplevel
  from jaxvol.data import store as store_lib  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from jaxvol.eval import pnp as pnp_eval  # pylint: disable=import-outside-toplevel
  c = _small(_load_cfg("pnp_mri_recon", "smoke"), trained_prior)
  c.eval.split, c.data.eval_region = "train", {"0": (0.5, 1.0)}  # the store's one subject
  c.eval.max_box = (12, 16, 13)
  c.eval.previews = False
  (tmp_path / "pnp" / "nifti").mkdir(parents=True)
  (tmp_path / "pnp" / "nifti" / "s9_tv.nii.gz").write_bytes(b"an earlier run's subject")
  summary = pnp_eval.reconstruct(c, str(tmp_path))
  box = [[18, 30], [0, 16], [1, 14]]  # 16 -> 12: 2 either side; 16 -> 13: 1 before, 2 after
  assert summary["max_box"] == [12, 16, 13] and summary["boxes"] == {"s0": box}
  out = tmp_path / "pnp"
  assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
  with open(out / "metrics.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert json.loads(row["box"]) == box
  assert sorted(os.listdir(out)) == ["metrics.csv", "nifti", "summary.json"]
  names = ("zero_filled", "tv", summary["solver"])
  assert sorted(os.listdir(out / "nifti")) == sorted(f"s0_{n}.nii.gz" for n in names)
  assert sorted(os.listdir(tmp_path)) == ["pnp"]  # no temporary or previous folder left beside
  store = store_lib.Store(c.data.store)
  preset = store.preset("s0", "t1")
  inside = tuple(slice(a, b) for a, b in box)
  target = preset.inverse(store.read("s0", "t1", tuple(map(tuple, box))))
  for rec in names:
    img = nib.load(out / "nifti" / f"s0_{rec}.nii.gz").get_fdata(dtype=np.float32)
    outside = np.ones(img.shape, bool)
    outside[inside] = False
    np.testing.assert_allclose(img[outside], preset.inverse(-1.0), atol=1e-4)
    psnr = metrics_lib.compute_all(img[inside], target, metrics_lib.body_mask(target),
                                   float(preset.hi - preset.lo))["psnr"]
    assert float(row[f"{rec}_psnr"]) == pytest.approx(psnr, rel=1e-4)
