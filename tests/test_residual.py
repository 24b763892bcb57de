"""Residual learning (config.model.residual): each offering method's clean-image estimate is its
network's output plus the first input; the methods that cannot offer it refuse it; residual and
plain checkpoints are kept apart (also those saved while the option was
config.regression.residual); training is refused on a store that normalises the input unlike the
target."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvol import config as base_config
from jaxvol import experiment
from jaxvol import methods
from jaxvol.data import store as store_lib
from jaxvol.errors import ConfigError
from jaxvol.methods import base
from jaxvol.ops import puzzle as puzzle_lib
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from conftest import write_pet_store


def _config(residual: bool, store: str = "", method: str = "regression"):
  c = base_config.set_method(experiment.packaged_config("ppdm_pet_denoise", "smoke"), method)
  c.model.residual = residual
  c.data.store = store
  return c


def _batch(cond_channels: int = 1, size: int = 8):
  rng = np.random.default_rng(0)
  return {"cond": jnp.asarray(rng.normal(size=(2, size, size, size, cond_channels)), jnp.float32),
          "target": jnp.asarray(rng.normal(size=(2, size, size, size, 1)), jnp.float32)}


@pytest.fixture(scope="module")
def nets():
  plain, residual = methods.build(_config(False)), methods.build(_config(True))
  batch = _batch()
  params = plain.init(jax.random.PRNGKey(0), batch)
  return plain, residual, params, batch


def test_the_prediction_is_the_network_plus_the_input(nets):
  plain, residual, params, batch = nets
  key = jax.random.PRNGKey(1)
  net = np.asarray(plain.sample(params, batch["cond"], key))
  np.testing.assert_allclose(np.asarray(residual.sample(params, batch["cond"], key)),
                             net + np.asarray(batch["cond"]), atol=1e-5)
  loss, _ = residual.loss(params, batch, key)  # L1 of (network + input) against the target
  want = np.mean(np.abs(net + np.asarray(batch["cond"]) - np.asarray(batch["target"])))
  assert float(loss) == pytest.approx(want, rel=1e-5)


def _pair(method: str, inputs=("pet_low",)):
  """(plain, residual) methods of `method` on a condition of len(inputs) channels."""
  built = []
  for residual in (False, True):
    c = _config(residual, method=method)
    c.data.inputs = tuple(inputs)
    built.append(methods.build(c))
  return built


def test_the_diffusion_x0_estimates_add_the_first_input():
  """sparse (and full3d) with x0 parameterisation: x0 = network + condition's first channel; PPDM
  and puzzle regression in the puzzled domain: + puzzle(first channel). Two input channels, so
  adding the wrong one (or all of them) fails."""
  batch = _batch(cond_channels=2)
  y, key = batch["cond"], jax.random.PRNGKey(2)
  first = np.asarray(y[..., :1])
  t = jnp.array([3, 7], jnp.int32)

  plain, residual = _pair("sparse", ("pet_low", "ct"))
  assert residual.diffusion.parameterization == "x0"
  params = plain.init(key, batch)
  z_t = jax.random.normal(key, batch["target"].shape)
  np.testing.assert_allclose(np.asarray(residual._apply(params, z_t, y, t)),
                             np.asarray(plain._apply(params, z_t, y, t)) + first, atol=1e-5)

  plain, residual = _pair("ppdm", ("pet_low", "ct"))
  params = plain.init(key, batch)
  want = np.asarray(plain._denoise(params, z_t, y, t)) + np.asarray(
      puzzle_lib.puzzle(y[..., :1], plain.factor))
  np.testing.assert_allclose(np.asarray(residual._denoise(params, z_t, y, t)), want, atol=1e-5)
  # its sample with one bridge step is that estimate, unpuzzled
  for m in (plain, residual):
    m.config.ppdm.sample_steps, m.config.ppdm.eta = 1, 0.0
  np.testing.assert_allclose(
      np.asarray(residual.sample(params, y, key)),
      np.asarray(plain.sample(params, y, key)) + first, atol=1e-5)

  plain, residual = _pair("puzzle_regression", ("pet_low", "ct"))
  params = plain.init(key, batch)
  np.testing.assert_allclose(np.asarray(residual.sample(params, y, key)),
                             np.asarray(plain.sample(params, y, key)) + first, atol=1e-5)


@pytest.mark.parametrize("method", ["wdm", "ldm", "prdit", "autoencoder"])
def test_methods_without_it_refuse_it(method):
  with pytest.raises(ValueError, match="does not offer residual learning"):
    methods.build(_config(True, method=method))


def test_full3d_needs_the_x0_parameterisation():
  c = _config(True, method="full3d")
  c.diffusion.parameterization = "eps"
  with pytest.raises(ValueError, match="parameterization='x0'"):
    methods.build(c)
  c.diffusion.parameterization = "x0"
  assert methods.build(c).residual


def test_a_plain_checkpoint_does_not_load_as_residual():
  for method in ("regression", "sparse", "ppdm"):
    saved = json.loads(_config(False, method=method).to_json_best_effort())
    ckpt_lib.check_same_model({"config": saved}, _config(False, method=method), "RUN")
    with pytest.raises(ConfigError, match="model.residual saved False vs now True"):
      ckpt_lib.check_same_model({"config": saved}, _config(True, method=method), "RUN")
    # a checkpoint written before the option existed was plain
    del saved["model"]["residual"]
    ckpt_lib.check_same_model({"config": saved}, _config(False, method=method), "RUN")
    with pytest.raises(ConfigError, match="model.residual"):
      ckpt_lib.check_same_model({"config": saved}, _config(True, method=method), "RUN")


def test_a_checkpoint_saved_as_regression_residual_is_residual():
  """Written while the option was config.regression.residual: its saved config is read as
  residual, by the model-field check and by the method built from it (predict, evaluate)."""
  saved = json.loads(_config(False).to_json_best_effort())
  del saved["model"]["residual"]
  saved["regression"]["residual"] = True
  ckpt_lib.check_same_model({"config": saved}, _config(True), "RUN")
  with pytest.raises(ConfigError, match="model.residual saved True vs now False"):
    ckpt_lib.check_same_model({"config": saved}, _config(False), "RUN")
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert base.residual_of(ml_collections.ConfigDict(saved))
  assert methods.build(ml_collections.ConfigDict(saved)).residual


def test_training_refuses_an_input_normalised_unlike_the_target(tmp_path):
  shared = write_pet_store(tmp_path, (16, 16, 16), ["train", "train", "test"])
  c = _config(True, shared)
  c.train.steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 2
  c.mesh.data = 1  # one device of the suite's fake ones
  c.eval.references = ""
  loop.check_residual(c, shared)  # pet_full takes pet_low's scale: one preset
  result = experiment.train(c, tmp_path / "run")
  assert result["step"] == 2 and np.isfinite(result["progress"][-1]["loss"])
  # the same volumes with the target on a scale of its own
  store_lib.convert(tmp_path / "list.csv", tmp_path / "apart",
                    {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "cap": 50.0}})
  c.data.store = str(tmp_path / "apart")
  with pytest.raises(ValueError, match="normalises it unlike the target 'pet_full'"):
    experiment.train(c, tmp_path / "run_apart")
  assert not (tmp_path / "run_apart" / "checkpoints").exists()
  c.model.residual = False
  loop.check_residual(c, c.data.store)  # plain regression learns any scale
  c = _config(True, str(tmp_path / "apart"), method="sparse")  # the same for diffusion
  with pytest.raises(ValueError, match="normalises it unlike the target 'pet_full'"):
    loop.check_residual(c, c.data.store)
