"""A checkpoint written on a 4-device mesh resumes on 2 devices and on 1 and trains on the same.

The reference is one uninterrupted run on data=2 x spatial=2 (batch and volume depth sharded);
each resumed run takes its step-3 checkpoint onto a smaller data-only mesh and trains 3 more
steps. Parameters, EMA, optimizer state and the data iterator's position must match the
reference (up to the order of cross-device sums), and evaluation reads the same checkpoint onto
one device. (tests/test_multihost.py resumes a data=4 checkpoint of two hosts on one device.)
"""

import os
import shutil

import jax
import nibabel as nib
import numpy as np
import pytest

from test_train import _next_batch_after_restore
from test_train import _params
from test_train import smoke_config
from test_train import tiny_store  # noqa: F401  (a fixture)
from jaxvol import methods
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.eval import volumes
from jaxvol.eval import samplers
from jaxvol.train import loop

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

STEPS, SPLIT = 6, 3
LAYOUT = (2, 2)  # (data, spatial) of the run that writes the checkpoint


def _config(store, layout):
  c = smoke_config(store, steps=STEPS)
  c.train.checkpoint_every = SPLIT
  c.mesh.data, c.mesh.spatial = layout
  return c


@pytest.fixture(scope="module")
def four_device_run(tiny_store, tmp_path_factory):  # noqa: F811
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 (fake) devices")
  c = _config(tiny_store / "store", LAYOUT)
  workdir = str(tmp_path_factory.mktemp("four_devices") / "work")
  loop.train(c, workdir)
  return dict(config=c, workdir=workdir)


@pytest.mark.parametrize("devices", [2, 1])
def test_resume_on_fewer_devices_equals_uninterrupted(four_device_run, devices, tmp_path):
  ref_dir = four_device_run["workdir"]
  workdir = str(tmp_path / "work")
  shutil.copytree(ref_dir, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))  # resume from step 3
  c = four_device_run["config"].copy_and_resolve_references()
  c.mesh.data, c.mesh.spatial = devices, 1
  assert loop.train(c, workdir)["step"] == STEPS
  (got, step), (want, ref_step) = _params(workdir), _params(ref_dir)
  assert step == ref_step == STEPS and int(got["step"]) == STEPS
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
  got_batch, want_batch = (_next_batch_after_restore(c, d) for d in (workdir, ref_dir))
  for k in want_batch:
    np.testing.assert_array_equal(got_batch[k], want_batch[k])


def test_evaluation_reads_a_four_device_checkpoint_on_one_device(four_device_run):
  c = four_device_run["config"]
  params, step = volumes.load_params(c, four_device_run["workdir"])
  saved, _ = _params(four_device_run["workdir"])
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["ema_params"]), strict=True):
    assert a.sharding.device_set == {jax.local_devices()[0]}
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _predictions(out_dir) -> dict:
  nifti_dir = os.path.join(out_dir, "nifti")
  return {f: np.asarray(nib.load(os.path.join(nifti_dir, f)).dataobj)
          for f in sorted(os.listdir(nifti_dir))}


def test_sharded_evaluation_of_a_four_device_checkpoint_equals_one_device(four_device_run,
                                                                          tmp_path, monkeypatch):
  """--mode=evaluate with config.mesh.spatial = 2: each volume's depth split over 2 devices."""
  c, workdir = four_device_run["config"], four_device_run["workdir"]
  one = evaluate_lib.predict_split(c, workdir, c.eval.split, str(tmp_path / "one"), True)
  sharded = c.copy_and_resolve_references()
  sharded.mesh.data, sharded.mesh.spatial = 1, 2
  used, choose = [], samplers.choose
  monkeypatch.setattr(samplers, "choose", lambda config, method: used.append(
      choose(config, method)) or used[-1])
  two = evaluate_lib.predict_split(sharded, workdir, c.eval.split, str(tmp_path / "two"), True)
  assert isinstance(used[0], samplers.VolumeSampler)
  assert dict(used[0].mesh.shape) == {"data": 1, "spatial": 2, "model": 1}
  # 20 slices -> 10 puzzled: the full-resolution level's convolutions exchange halos themselves.
  assert used[0].halo_convolutions((20, 18, 16)) > 0
  want, got = _predictions(tmp_path / "one"), _predictions(tmp_path / "two")
  assert list(got) == list(want) and want
  for name in want:
    scale = float(np.abs(want[name]).max())
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-4 * scale)
  for a, b in zip(one["rows"], two["rows"], strict=True):
    assert b["model_psnr"] == pytest.approx(a["model_psnr"], abs=1e-3)


def test_evaluation_sampler_padding_and_errors(tiny_store):  # noqa: F811
  c = _config(tiny_store / "store", (1, 3))
  method = methods.build(c, "cpu")
  assert method.spatial_multiple() == (4, 4, 4)
  sampler = samplers.evaluation_sampler(c, method)
  assert sampler.multiple == (12, 4, 4)  # lcm(4, 3) slices on depth
  assert sampler.padded_shape((20, 18, 16)) == (24, 20, 16)
  assert sampler.padded_shape((24, 17, 16)) == (24, 20, 16)
  c.mesh.spatial = 1
  assert samplers.evaluation_sampler(c, method) is None  # one device: the local sampler
  c.mesh.spatial = jax.device_count() + 1
  with pytest.raises(ValueError, match="--config.mesh.spatial=1"):
    samplers.evaluation_sampler(c, method)
