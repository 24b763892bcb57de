"""Residual regression (config.regression.residual): the network's output plus the first input,
its checkpoints kept apart from plain regression's, and training refused on a store that
normalises the input unlike the target."""

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
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from conftest import write_pet_store


def _config(residual: bool, store: str = ""):
  c = base_config.set_method(experiment.packaged_config("ppdm_pet_denoise", "smoke"), "regression")
  c.regression.residual = residual
  c.data.store = store
  return c


@pytest.fixture(scope="module")
def nets():
  plain, residual = methods.build(_config(False)), methods.build(_config(True))
  rng = np.random.default_rng(0)
  batch = {"cond": jnp.asarray(rng.normal(size=(2, 8, 8, 8, 1)), jnp.float32),
           "target": jnp.asarray(rng.normal(size=(2, 8, 8, 8, 1)), jnp.float32)}
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


def test_a_plain_checkpoint_does_not_load_as_residual():
  saved = json.loads(_config(False).to_json_best_effort())
  ckpt_lib.check_same_model({"config": saved}, _config(False), "RUN")
  with pytest.raises(ConfigError, match="regression.residual saved False vs now True"):
    ckpt_lib.check_same_model({"config": saved}, _config(True), "RUN")
  # a checkpoint written before the option existed was plain regression
  del saved["regression"]["residual"]
  ckpt_lib.check_same_model({"config": saved}, _config(False), "RUN")
  with pytest.raises(ConfigError, match="regression.residual"):
    ckpt_lib.check_same_model({"config": saved}, _config(True), "RUN")


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
  c.regression.residual = False
  loop.check_residual(c, c.data.store)  # plain regression learns any scale
