"""Flow matching (jaxvol.diffusion.flow) and the methods that train with it (full3d, PRDiT).

The integrators against closed forms, the loss against the exact velocity, the objective's place
in the model fields and in checkpoint checks, and an end-to-end full3d train -> evaluate on a
small PET store. Parity with PRDiT-FM's own code is in tests/test_authors_parity.py (2b).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import write_pet_store
from jaxvol import config as base
from jaxvol import experiment
from jaxvol import methods
from jaxvol.diffusion import flow
from jaxvol.train import checkpoint as ckpt_lib

FM = flow.FlowMatching()


@pytest.mark.parametrize("solver,factor", [
    ("euler", lambda dt, n: (1.0 - dt)**n),
    ("heun", lambda dt, n: (1.0 - dt + dt * dt / 2.0)**n),
])
def test_integrators_on_a_linear_ode(solver, factor):
  """dx/dt = -x: Euler multiplies by (1 - dt) per step, Heun by (1 - dt + dt^2 / 2)."""
  x0 = jnp.linspace(-2.0, 3.0, 10).reshape(2, 5)
  for steps in (1, 3, 10):
    got = FM.sample(lambda x, t: -x, x0, steps, solver)
    np.testing.assert_allclose(got, x0 * factor(1.0 / steps, steps), rtol=1e-5)


def test_euler_reaches_a_point_mass_exactly():
  """The exact velocity towards one data point, (x* - x) / (1 - t), lands on it in N Euler steps."""
  target = jnp.array([[0.3, -0.7, 1.5]])
  vel = lambda x, mt: (target - x) / (1.0 - mt[:, None] / FM.embed_t_scale)
  got = FM.sample(vel, jnp.array([[2.0, 0.0, -1.0]]), 5, "euler")
  np.testing.assert_allclose(got, target, atol=1e-5)


def test_times_and_evaluations():
  np.testing.assert_allclose(FM.network_times(4, "euler"), [0, 250, 500, 750])
  np.testing.assert_allclose(FM.network_times(2, "heun"), [0, 500, 500, 1000])
  assert FM.nfe(4, "euler") == 4 and FM.nfe(4, "heun") == 8
  with pytest.raises(ValueError, match="solver"):
    FM.sample(lambda x, t: x, jnp.zeros((1, 2)), 3, "rk4")
  with pytest.raises(ValueError, match=">= 1 step"):
    FM.nfe(0, "euler")


def test_loss_is_zero_for_the_exact_velocity_and_path_endpoints():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  data = jax.random.normal(k1, (3, 4, 4, 4, 1))
  noise = jax.random.normal(k2, data.shape)
  x_t, v = FM.interpolate(data, noise, jnp.array([0.0, 0.5, 1.0]))
  np.testing.assert_allclose(x_t[0], noise[0])
  np.testing.assert_allclose(x_t[2], data[2])
  np.testing.assert_allclose(v, data - noise)
  t = jnp.array([0.1, 0.4, 0.9])
  exact = lambda x, mt: (data - x) / (1.0 - mt / FM.embed_t_scale)[:, None, None, None, None]
  loss, aux = FM.training_loss(exact, data, jax.random.PRNGKey(1), t=t, x_noise=noise)
  assert float(loss) < 1e-10 and aux["per_example"].shape == (3,)
  wrong, _ = FM.training_loss(lambda x, mt: jnp.zeros_like(x), data, jax.random.PRNGKey(1), t=t,
                              x_noise=noise)
  np.testing.assert_allclose(wrong, jnp.mean(jnp.square(data - noise)), rtol=1e-5)
  recon, _ = FM.reconstruct(exact, data, noise, 0.5)
  np.testing.assert_allclose(recon, data, atol=1e-5)


def _full3d(objective="flow"):
  c = base.smoke_overrides(base.set_method(base.base_config(), "full3d"))
  c.diffusion.objective = objective
  c.flow.sample_steps = 2
  return c


def test_only_methods_that_offer_flow_build_with_it():
  for name in sorted(methods.METHODS):
    c = base.set_method(base.base_config(), name)
    c.diffusion.objective = "flow"
    if name in ("full3d", "prdit", "ldm"):
      assert methods.build(c).flow is not None
    else:
      with pytest.raises(ValueError, match=r"does not train with diffusion.objective='flow'.*"
                                           r"available for \['full3d', 'prdit', 'ldm'\]"):
        methods.build(c)
  c = _full3d("nope")
  with pytest.raises(ValueError, match="objective='nope'"):
    methods.build(c)


def test_the_objective_is_a_model_field_and_old_checkpoints_are_diffusion():
  flow_fields = methods.model_fields(_full3d())
  gauss_fields = methods.model_fields(_full3d("diffusion"))
  assert "diffusion.objective" in flow_fields and "flow.embed_t_scale" in flow_fields
  assert "diffusion.beta_end" not in flow_fields and "diffusion.beta_end" in gauss_fields
  assert "flow.embed_t_scale" not in gauss_fields
  old = json.loads(_full3d("diffusion").to_json_best_effort())
  del old["diffusion"]["objective"]  # a checkpoint written before flow matching existed
  del old["flow"]
  with pytest.raises(ValueError, match="diffusion.objective saved 'diffusion' vs now 'flow'"):
    ckpt_lib.check_same_model({"config": old}, _full3d(), "somewhere")
  ckpt_lib.check_same_model({"config": old}, _full3d("diffusion"), "somewhere")
  prd = experiment.packaged_config("prdit_ct_gen", "smoke")
  saved = json.loads(prd.to_json_best_effort())
  with pytest.raises(ValueError, match="diffusion.objective"):
    ckpt_lib.check_same_model({"config": saved},
                              experiment.packaged_config("prdit_ct_gen", "flow,smoke"), "x")


def test_full3d_flow_loss_gradients_and_sampler():
  c = _full3d()
  method = methods.build(c)
  batch = {"cond": jnp.ones((2, 16, 16, 16, 1)) * 0.1, "target": jnp.zeros((2, 16, 16, 16, 1))}
  params = method.init(jax.random.PRNGKey(0), batch)
  (loss, _), grads = jax.jit(jax.value_and_grad(method.loss, has_aux=True))(
      params, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  sample = jax.jit(method.sample)
  out = sample(params, batch["cond"][:1], jax.random.PRNGKey(2))
  assert out.shape == (1, 16, 16, 16, 1) and np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_array_equal(out, sample(params, batch["cond"][:1], jax.random.PRNGKey(2)))


def test_prdit_flow_has_one_velocity_head_and_samples_from_unit_noise():
  c = experiment.packaged_config("prdit_ct_gen", "flow,stage1,smoke")
  method = methods.build(c)
  assert method.net.outputs == 1
  assert method.sampling_facts()["sampler"] == {"objective": "flow", "solver": "euler",
                                                "sample_steps": 4, "nfe": 4}
  x = jnp.zeros((2, 16, 16, 16, 1))
  params = method.init(jax.random.PRNGKey(0), {"target": x, "cond": x[..., :0]})
  out = method.net.apply(params, x, jnp.array([0.0, 500.0]))
  assert out.shape == x.shape  # one array, not an (eps, x0) pair
  loss, _ = method.loss(params, {"target": x + 0.3, "cond": x[..., :0]}, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  recon, x_t = method.reconstruct(params, x + 0.3, jax.random.PRNGKey(2))
  assert recon.shape == x_t.shape == x.shape
  sample = method.sample(params, jnp.zeros((1, 16, 16, 16, 0)), jax.random.PRNGKey(3))
  assert sample.shape == (1, 16, 16, 16, 1)
  with pytest.raises(ValueError, match="fast"):
    experiment.packaged_config("prdit_ct_gen", "flow,fast")


def test_prdit_flow_warns_when_the_local_read_out_cannot_carry_the_noise(caplog):
  """A velocity head needs full rank per token (its -noise part); the cpu variant's 64-wide local
  denoiser reads 512 voxels per token out of 64 features, which caps it (docs/results.md)."""
  bottleneck = experiment.packaged_config("prdit_ct_gen", "flow,stage1,cpu")
  assert 0 < bottleneck.prdit.local_width < bottleneck.prdit.stride ** 3
  with caplog.at_level("WARNING"):
    methods.build(bottleneck)
  assert "cannot carry the noise part of the velocity" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    bottleneck.prdit.local_width = 0  # the raw window: 1,728 features per token
    methods.build(bottleneck)
    methods.build(experiment.packaged_config("prdit_ct_gen", "stage1,cpu"))  # x0 head: smooth
  assert "noise part" not in caplog.text


@pytest.mark.slow
def test_full3d_flow_trains_and_evaluates_end_to_end(tmp_path):
  """A flow-matching full3d run through the training loop and the one evaluation path."""
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  store = write_pet_store(tmp_path, (24, 24, 24), ["train", "train", "test"])
  c = experiment.packaged_config("ppdm_pet_denoise", "smoke")
  base.set_method(c, "full3d")
  c.diffusion.objective, c.flow.sample_steps, c.flow.solver = "flow", 2, "heun"
  c.data.store, c.data.num_workers, c.mesh.data = store, 0, 1
  workdir = str(tmp_path / "run")
  result = loop.train(c, workdir)
  assert result["step"] == c.train.steps and np.isfinite(result["loss"])
  summary = evaluate.evaluate(c, workdir)
  assert summary["n_volumes"] == 1 and np.isfinite(summary["metrics"]["psnr"]["model"])
  c.diffusion.objective = "diffusion"  # the checkpoint is a flow model: refused by name
  with pytest.raises(ValueError, match="diffusion.objective"):
    evaluate.evaluate(c, workdir)


@pytest.mark.slow
def test_prdit_flow_stage1_keeps_the_best_reconstruction(tmp_path):
  """PRDiT-FM's stage-1 validation: reconstruction MSE at t = 0.5 on validation volumes, lower
  is better, the best step's checkpoint kept."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  from jaxvol.eval import evaluate  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for i, split in enumerate(("train", "val")):
    hu = (rng.normal(0, 200, (16, 16, 16)) - 300).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / f"ct{i}.nii.gz")
    rows.append(f"ct{i},{split},ct{i}.nii.gz")
  (tmp_path / "list.csv").write_text("subject,split,ct\n" + "\n".join(rows) + "\n")
  store_lib.convert(tmp_path / "list.csv", tmp_path / "store", {"ct": {"kind": "ct"}})
  c = experiment.packaged_config("prdit_ct_gen", "flow,stage1,smoke")
  c.data.store, c.mesh.data = str(tmp_path / "store"), 1
  c.train.validate_every, c.train.steps = 2, 4
  assert c.train.validate_metric == "recon_mse"
  validate = evaluate.reconstruction_validator(c, str(tmp_path / "run"))
  result = loop.train(c, str(tmp_path / "run"), validate=validate)
  records = loop.read_validation(str(tmp_path / "run"))
  assert [r["step"] for r in records] == [2, 4]
  best = min(records, key=lambda r: r["recon_mse"])
  assert result["best_step"] == best["step"] and result["best"] == best["recon_mse"]
  c.diffusion.objective = "diffusion"
  with pytest.raises(ValueError, match="flow matching"):
    evaluate.reconstruction_validator(c, str(tmp_path / "run"))
