"""Validation during training: the best checkpoint by validation score, patience, resume, and the
checkpoint that evaluate / sample / predict use (jaxvol.train.loop.Validation,
jaxvol.train.checkpoint.restore_selected, jaxvol.eval.evaluate.validator)."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxvol.data import pipeline
from jaxvol.eval import evaluate
from jaxvol.eval import volumes
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from test_train import smoke_config
from test_train import tiny_store  # noqa: F401  pylint: disable=unused-import

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

# A validation score that peaks early (step 4) and never recovers.
SCORES = {2: 20.0, 4: 25.0, 6: 22.0, 8: 21.0, 10: 23.0, 12: 24.0, 14: 20.0}


def _config(store, steps, patience=0):
  c = smoke_config(store, steps=steps)
  c.train.validate_every = c.train.checkpoint_every = c.train.log_every = 2
  c.train.keep_checkpoints = 10
  c.train.patience = patience
  c.eval.val_split = "test"
  return c


class FakeValidation:
  """validate(params, step) with the scores of SCORES; keeps the parameters it was given."""

  def __init__(self):
    self.params = {}

  def __call__(self, params, step):
    self.params[step] = jax.tree.map(np.asarray, params)
    return {"psnr": SCORES[step], "ssim": SCORES[step] / 100}


@pytest.fixture(scope="module")
def peaked(tiny_store, tmp_path_factory):  # pylint: disable=redefined-outer-name
  workdir = str(tmp_path_factory.mktemp("val") / "w")
  validate = FakeValidation()
  result = loop.train(_config(tiny_store / "store", 10), workdir, validate=validate)
  return workdir, result, validate


def _restored(workdir, selection):
  found = ckpt_lib.restore_selected(workdir, selection)
  return found.state, found.step, found.why


def test_best_checkpoint_is_the_step_with_the_best_validation_score(peaked):
  workdir, result, validate = peaked
  assert result["step"] == 10 and result["best_step"] == 4 and result["best"] == 25.0
  records = loop.read_validation(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
  assert [r["psnr"] for r in records] == [SCORES[s] for s in (2, 4, 6, 8, 10)]
  assert [r["best_step"] for r in records] == [2, 4, 4, 4, 4]
  state, step, why = _restored(workdir, "auto")
  assert step == 4 and "best validation" in why
  # The kept state is the one validated at step 4 (the EMA weights the validation saw).
  for a, b in zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(validate.params[4])):
    np.testing.assert_array_equal(np.asarray(a), b)
  # ... and equals the run's own checkpoint of step 4.
  same, _, _ = _restored(workdir, 4)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(same["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  latest, step, why = _restored(workdir, "latest")
  assert step == 10 and "latest" in why
  assert int(state["step"]) == 4 and int(latest["step"]) == 10


def test_evaluate_names_the_checkpoint_it_used(tiny_store, peaked):  # pylint: disable=redefined-outer-name
  workdir, _, _ = peaked
  c = _config(tiny_store / "store", 10)
  summary = evaluate.evaluate(c, workdir)
  assert summary["checkpoint_step"] == 4
  assert summary["checkpoint"] == "best validation checkpoint (step 4)"
  with open(os.path.join(workdir, "eval", "summary.json")) as f:
    assert json.load(f)["checkpoint"] == summary["checkpoint"]
  assert "gaussian" in summary["metrics"]["psnr"] and summary["references"]["gaussian"]["params"]
  c.eval.checkpoint = "latest"
  summary = evaluate.evaluate(c, workdir, out_name="eval_latest")
  assert summary["checkpoint_step"] == 10 and "latest" in summary["checkpoint"]
  c.eval.checkpoint = "6"
  assert evaluate.evaluate(c, workdir, out_name="eval_6")["checkpoint_step"] == 6
  c.eval.checkpoint = "7"
  with pytest.raises(FileNotFoundError, match="no checkpoint for step 7.*available"):
    evaluate.evaluate(c, workdir, out_name="eval_7")


def test_patience_stops_training_on_a_plateau(tiny_store, peaked, tmp_path):  # pylint: disable=redefined-outer-name
  del peaked  # (shares its compiled programs through the cache)
  workdir = str(tmp_path / "w")
  result = loop.train(_config(tiny_store / "store", 14, patience=2), workdir,
                      validate=FakeValidation())
  # Best at 4; 6 and 8 do not improve: the second miss stops at step 8, with a checkpoint there.
  assert result["step"] == 8 and "plateau" in result["stopped"] and result["best_step"] == 4
  assert ckpt_lib.restore_selected(workdir, "latest").step == 8


def test_resumed_run_keeps_the_best_and_drops_later_records(tiny_store, peaked, tmp_path):  # pylint: disable=redefined-outer-name
  src, _, _ = peaked
  workdir = str(tmp_path / "w")
  shutil.copytree(src, workdir)
  # Records of a run that died after its last checkpoint (step 10): they are dropped.
  with open(os.path.join(workdir, loop.VALIDATION_FILE), "a") as f:
    f.write(json.dumps({"step": 12, "psnr": 99.0, "best_step": 12, "best": 99.0}) + "\n")
  result = loop.train(_config(tiny_store / "store", 14), workdir, validate=FakeValidation())
  records = loop.read_validation(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12, 14]
  assert result["best_step"] == 4 and records[-1]["best_step"] == 4  # 24 < 25: still step 4
  assert ckpt_lib.restore_selected(workdir, "best").step == 4


class SignalAfter(FakeValidation):
  """FakeValidation that sends itself SIGTERM while validating `step`: the signal lands during
  a validation and acts at the next step."""

  def __init__(self, step):
    super().__init__()
    self.step = step

  def __call__(self, params, step):
    if step == self.step:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__call__(params, step)


def test_a_signal_saves_without_validating(tiny_store, peaked, tmp_path):  # pylint: disable=redefined-outer-name
  del peaked  # (shares its compiled programs through the cache)
  workdir = str(tmp_path / "w")
  validate = SignalAfter(4)
  result = loop.train(_config(tiny_store / "store", 14), workdir, validate=validate)
  # Stopped at step 5, off the validation schedule: saved there, and not validated there
  # (SCORES has no step 5: validating would raise).
  assert result["step"] == 5 and result["stopped"] == "signal 15" and result["signal"] == 15
  assert sorted(validate.params) == [2, 4]
  assert [r["step"] for r in loop.read_validation(workdir)] == [2, 4]
  assert ckpt_lib.restore_selected(workdir, "latest").step == 5
  assert ckpt_lib.restore_selected(workdir, "best").step == 4


def test_selection_parsing_and_errors(tiny_store, tmp_path):  # pylint: disable=redefined-outer-name
  assert ckpt_lib.parse_selection("BEST") == "best"
  assert ckpt_lib.parse_selection(" 12 ") == 12 and ckpt_lib.parse_selection(-1) == "latest"
  with pytest.raises(ValueError, match="checkpoint selection"):
    ckpt_lib.parse_selection("newest")
  with pytest.raises(FileNotFoundError, match="train first"):
    ckpt_lib.restore_selected(str(tmp_path / "empty"), "auto")
  with pytest.raises(FileNotFoundError, match="no best checkpoint"):
    ckpt_lib.restore_selected(str(tmp_path / "empty"), "best")
  assert not os.path.exists(tmp_path / "empty")  # looking creates nothing


def test_real_validator_scores_the_validation_split(tiny_store, peaked):  # pylint: disable=redefined-outer-name
  workdir, _, _ = peaked
  c = _config(tiny_store / "store", 10)
  validate = evaluate.validator(c, workdir)
  params, _ = volumes.load_params(c, workdir)
  scores = validate(jax.device_get(params), 4)
  assert set(scores) >= {"psnr", "ssim", "nmse", "mae", "hfen"}
  # The same number as evaluating that checkpoint on the same split (references aside).
  summary = evaluate.evaluate(c, workdir, out_name="eval_val")
  assert scores["psnr"] == pytest.approx(summary["metrics"]["psnr"]["model"], abs=1e-4)
  c.eval.val_split = "val"
  with pytest.raises(ValueError, match="no validation volume"):
    evaluate.validator(c, workdir)
  c.eval.val_split = "train"
  with pytest.raises(ValueError, match="overlaps the training crops"):
    evaluate.validator(c, workdir)
  c.data.train_region = {"0": (0.0, 0.5)}
  c.eval.val_region = {"0": (0.5, 1.0)}
  c.data.eval_region = {"0": (0.5, 1.0)}
  assert volumes.plain_region(evaluate.validation_config(c).data.eval_region) == {"0": [0.5, 1.0]}


def test_regions_overlap():
  assert pipeline.regions_overlap(None, {"0": (0.5, 1.0)})
  assert not pipeline.regions_overlap({"0": (0.0, 0.5)}, {"0": (0.5, 1.0)})
  assert pipeline.regions_overlap({"0": (0.0, 0.6)}, {"0": (0.5, 1.0)})
  assert not pipeline.regions_overlap({"2": (0.0, 0.6)}, {"2": (0.6, 0.7), "0": (0.0, 1.0)})
  assert pipeline.regions_overlap({"2": (0.0, 0.6)}, {"1": (0.6, 1.0)})
