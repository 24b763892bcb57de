"""jaxvol.eval.runner, the one inference path: keys, samples, outputs, metrics, skips, timing.

Predictors here are plain functions of the volume and key, so every number the runner writes is
recomputed independently (metrics.compute_all, numpy means) and nothing needs a network.
"""

import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from jaxvol.data import nifti
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import runner
from jaxvol.eval import samplers

SHAPE = (14, 13, 12)


def _volumes(n=3, with_target=True):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    cond = rng.normal(size=(1,) + SHAPE + (1,)).astype(np.float32)
    target = (np.abs(cond[0, ..., 0]) * 100 + 50).astype(np.float32) if with_target else None
    out.append(runner.Volume(
        name=f"v{i}", inputs=cond, to_units=lambda x: x * 100.0 + 50.0,
        target=target, data_range=400.0 if with_target else None,
        references={"input": (cond[0, ..., 0] * 90 + 50).astype(np.float32)} if with_target else {},
        row={"index": i}))
  return out


class Noisy:
  """cond + noise drawn from the key; records the keys and prepare calls."""

  def __init__(self):
    self.keys, self.prepared = [], []

  def prepare(self, volume):
    self.prepared.append(volume.name)
    return {"note": 7}

  def __call__(self, volume, key):
    self.keys.append(np.asarray(key))
    return volume.inputs + 0.1 * np.asarray(jax.random.normal(key, volume.inputs.shape))


def test_keys_metrics_and_references():
  fn = Noisy()
  key = jax.random.PRNGKey(5)
  vols = _volumes()
  rows = runner.run(vols, {"model": fn}, key, None, report=lambda s: None)
  assert [r["subject"] for r in rows] == ["v0", "v1", "v2"] and rows[1]["index"] == 1
  for i, k in enumerate(fn.keys):
    np.testing.assert_array_equal(k, np.asarray(jax.random.fold_in(key, i)))
  assert fn.prepared == ["v0", "v1", "v2"] and rows[0]["model_note"] == 7
  for vol, row, k in zip(vols, rows, fn.keys):
    pred = (vol.inputs + 0.1 * np.asarray(jax.random.normal(k, vol.inputs.shape)))[0, ..., 0]
    mask = metrics_lib.body_mask(vol.target)
    want = metrics_lib.compute_all(pred * 100 + 50, vol.target, mask, 400.0)
    got_input = metrics_lib.compute_all(vol.references["input"], vol.target, mask, 400.0)
    for name in metrics_lib.METRICS:
      assert row[f"model_{name}"] == pytest.approx(want[name], rel=1e-5)
      assert row[f"input_{name}"] == pytest.approx(got_input[name], rel=1e-6)
    assert row["data_range"] == 400.0 and row["seconds"] == row["model_seconds"] >= 0
  means = runner.mean_metrics(rows, ("model", "input", "absent"))
  assert set(means) == {"model", "input"}
  assert means["model"]["psnr"] == pytest.approx(np.mean([r["model_psnr"] for r in rows]))


def test_samples_mean_std_and_nifti(tmp_path):
  geometry = nifti.load_volume(_write_scan(tmp_path))[1]
  fn = Noisy()
  key = jax.random.PRNGKey(1)
  vol = _volumes(1, with_target=False)[0]
  vol.geometry = geometry
  vol.place = lambda x: np.pad(x, [(0, 20 - SHAPE[0]), (0, 18 - SHAPE[1]), (0, 16 - SHAPE[2])],
                               constant_values=-5.0)
  rows = runner.run([vol], {"model": fn, "other": fn}, key, str(tmp_path / "out"), samples=3,
                    write=["model", "other"], report=lambda s: None)
  vkey = jax.random.fold_in(key, 0)
  draws = np.stack([(vol.inputs + 0.1 * np.asarray(jax.random.normal(
      jax.random.fold_in(vkey, k), vol.inputs.shape)))[0, ..., 0] * 100 + 50 for k in range(3)])
  out = tmp_path / "out" / "nifti"
  assert sorted(os.listdir(out)) == ["v0_other.nii.gz", "v0_other_std.nii.gz", "v0_pred.nii.gz",
                                     "v0_std.nii.gz"]
  mean = nib.load(out / "v0_pred.nii.gz")
  np.testing.assert_allclose(np.asarray(mean.dataobj)[:14, :13, :12], draws.mean(0), rtol=1e-5,
                             atol=1e-3)
  std = np.asarray(nib.load(out / "v0_std.nii.gz").dataobj)[:14, :13, :12]
  np.testing.assert_allclose(std, draws.std(0), rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(mean.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
  assert int(mean.header["sform_code"]) == 2 and rows[0]["samples"] == 3
  assert "data_range" not in rows[0] and "model_psnr" not in rows[0]  # nothing to score against


def _write_scan(tmp_path):
  img = nib.Nifti1Image(np.ones((20, 18, 16), np.float32), np.diag([1.5, 1.5, 2.0, 1.0]))
  img.set_qform(img.affine, code=1)
  img.set_sform(img.affine, code=2)
  path = str(tmp_path / "scan.nii.gz")
  nib.save(img, path)
  return path


def test_skip_existing_and_progress(tmp_path):
  geometry = nifti.load_volume(_write_scan(tmp_path))[1]
  vols = _volumes(2, with_target=False)
  for v in vols:
    v.geometry = geometry
    v.place = lambda x: np.zeros((20, 18, 16), np.float32) + x.mean()
  lines = []
  runner.run(vols[:1], {"model": Noisy()}, jax.random.PRNGKey(0), str(tmp_path), nifti_dir="",
             report=lines.append)
  fn = Noisy()
  rows = runner.run(vols, {"model": fn}, jax.random.PRNGKey(0), str(tmp_path), nifti_dir="",
                    skip_existing=True, report=lines.append)
  assert rows[0]["skipped"] and "skipped" not in rows[1]
  # The skipped volume still counts: volume 1 gets fold_in(key, 1) as in a run without skips.
  np.testing.assert_array_equal(fn.keys[0], np.asarray(jax.random.fold_in(jax.random.PRNGKey(0), 1)))
  assert lines[0].startswith("[1/1] v0:") and "skipped" in lines[1]
  assert lines[2].startswith("[2/2] v1:") and lines[2].endswith("v1_pred.nii.gz")


def test_compiled_predictor_times_without_compilation():
  calls = []

  def build(volume):
    calls.append(volume.name)
    w = jnp.asarray(volume.inputs)
    return (lambda x, k: jnp.tanh(x[0, ..., 0] @ jnp.ones((SHAPE[2], SHAPE[2])) * 1e-3)), (w,)

  vols = _volumes(2, with_target=False)
  rows = runner.run(vols, {"model": samplers.CompiledPredictor(build)}, jax.random.PRNGKey(0), None,
                    report=lambda s: None)
  assert calls == ["v0", "v1"]  # compiled once per volume, in prepare
  assert all(r["model_bytes"] > 0 and r["compile_seconds"] > 0 for r in rows)
  assert runner.warm_seconds(rows) == pytest.approx(np.mean([r["model_seconds"] for r in rows]))


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="samples"):
    runner.run(_volumes(1), {"model": Noisy()}, jax.random.PRNGKey(0), None, samples=0)
  with pytest.raises(ValueError, match="no predictor"):
    runner.run(_volumes(1), {}, jax.random.PRNGKey(0), None)
  vol = _volumes(1)[0]
  vol.data_range = None
  with pytest.raises(ValueError, match="data range"):
    runner.run([vol], {"model": Noisy()}, jax.random.PRNGKey(0), None, report=lambda s: None)
  with pytest.raises(ValueError, match="shape"):
    runner.run(_volumes(1), {"model": lambda v, k: np.zeros((2, 3))}, jax.random.PRNGKey(0), None,
               report=lambda s: None)


class _Sampler:
  """A sampler whose output depends on position (a cumulative sum along every axis, plus the
  key's noise): it is not flip-equivariant, so the ensemble's average is a real mean of 8
  different predictions. Records the conditions and keys it was called with."""

  def __init__(self, squeeze=False):
    self.calls, self.squeeze = [], squeeze

  def __call__(self, params, cond, rng):
    self.calls.append((np.array(cond), np.asarray(rng)))
    out = np.cumsum(np.cumsum(np.cumsum(cond, 1), 2), 3) * params
    out = out + 0.1 * np.asarray(jax.random.normal(rng, cond.shape))
    return out[0, ..., 0] if self.squeeze else out


@pytest.mark.parametrize("squeeze", [False, True])
def test_flip_ensemble_is_the_mean_of_the_flipped_back_predictions(squeeze):
  assert samplers.flip_sets((2, 0)) == [(), (0,), (2,), (0, 2)]
  assert len(samplers.flip_sets((0, 1, 2))) == 8 and samplers.flip_sets(()) == [()]
  vol = _volumes(1)[0]
  key = jax.random.PRNGKey(3)
  sampler = _Sampler(squeeze)
  got = samplers.SamplerPredictor(sampler, 2.0, (0, 1, 2))(vol, key)
  # Naively: each flip of the condition's axes 1-3, sampled, flipped back, averaged.
  want = []
  for j, axes in enumerate(samplers.flip_sets((0, 1, 2))):
    ax = [1 + a for a in axes]
    cond = np.flip(vol.inputs, ax)
    np.testing.assert_array_equal(sampler.calls[j][0], cond)
    np.testing.assert_array_equal(sampler.calls[j][1], np.asarray(jax.random.fold_in(key, j)))
    pred = np.flip(_Sampler()(2.0, cond, jax.random.fold_in(key, j)), ax)
    want.append(pred[0, ..., 0] if squeeze else pred)
  np.testing.assert_allclose(got, np.mean(want, 0), rtol=1e-5, atol=1e-5)
  assert not np.allclose(want[0], want[7], atol=1e-2)  # the flips did give different predictions
  # No axes: one call, the sampler's own output and key.
  single = _Sampler(squeeze)
  out = samplers.SamplerPredictor(single, 2.0)(vol, key)
  assert len(single.calls) == 1
  np.testing.assert_array_equal(out, _Sampler(squeeze)(2.0, vol.inputs, key))


def test_flip_ensemble_from_config_and_bad_axes():
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({"inference": {"flip_axes": (1, 2)}})
  assert samplers.SamplerPredictor.from_config(c, None, None).flips == [(), (1,), (2,), (1, 2)]
  assert samplers.SamplerPredictor.from_config(None, None, None).flips == [()]
  with pytest.raises(ValueError, match="flip_axes"):
    samplers.SamplerPredictor(None, None, (3,))
  vol = _volumes(1)[0]
  flat = runner.Volume(name="flat", inputs=vol.inputs[0], to_units=vol.to_units)
  with pytest.raises(ValueError, match="B, D, H, W, C"):
    samplers.SamplerPredictor(_Sampler(), 1.0, (0,))(flat, jax.random.PRNGKey(0))
