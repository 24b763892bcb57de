"""config.eval.max_box (the scored box, centred in the evaluation region) and output folders that
each evaluation replaces as a whole (jaxvol.fileio.fresh_dir).

The sampler is a stand-in (replacing `jaxvol.eval.samplers.choose`): prediction = 0.5 x the condition, so every number
written can be recomputed here from the store alone; no network is compiled.
"""

import csv
import json
import os
from unittest import mock

import jax
import nibabel as nib
import numpy as np
import pytest

from conftest import write_pet_store
from jaxvol import config as base
from jaxvol import fileio
from jaxvol.data import store as store_lib
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.eval import volumes
from jaxvol.eval import metrics as metrics_lib
from jaxvol.eval import samplers

SHAPE = (30, 27, 24)
MAX_BOX = (12, 12, 32)
# eval_region {2: (0.25, 1)} is z 6..24; depth 30 -> 12 centred: 9..21; height 27 -> 12: a margin
# of 15 splits 7 before, 8 after; 18 <= 32 along z: the region's own extent.
WANT_BOX = [[9, 21], [7, 19], [6, 24]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """Two training and two test 'subjects' of 30x27x24 (smooth activity, noisy condition)."""
  root = tmp_path_factory.mktemp("box")
  return store_lib.Store(write_pet_store(root, SHAPE, ["train", "train", "test", "test"]))


class HalfSampler:
  """Predicts 0.5 x the first condition channel and records the conditions it was given."""

  def __init__(self, fail_on_call=None):
    self.conds, self._fail = [], fail_on_call

  def put_params(self, params):
    return params

  def __call__(self, params, cond, rng):
    del params, rng
    self.conds.append(np.array(cond))
    if self._fail is not None and len(self.conds) == self._fail:
      raise RuntimeError("sampler failed")
    return 0.5 * cond[..., :1]


@pytest.fixture
def no_checkpoint(monkeypatch):
  """load_params without a checkpoint: the stand-in sampler needs no parameters."""
  def load_params(config, workdir, with_meta=False):
    del config, workdir
    return ({}, 5, {}) if with_meta else ({}, 5)
  monkeypatch.setattr(volumes, "load_params", load_params)


def _config(store, max_box=MAX_BOX, split="test"):
  c = base.base_config()
  c.method = "regression"
  base.smoke_overrides(c)
  c.data.store = store.path
  c.data.inputs = ("pet_low",)
  c.data.target = "pet_full"
  c.data.eval_region = {"2": (0.25, 1.0)}
  c.eval.max_box = max_box
  c.eval.split = split
  c.eval.input_baseline = True
  c.mesh.data = 1
  return c


def _run(c, workdir, sampler=None, mode="evaluate"):
  sampler = sampler or HalfSampler()
  with mock.patch.object(samplers, "choose", lambda config, method: sampler):
    return getattr(evaluate_lib, mode)(c, str(workdir)), sampler


def _raw(store, sid, modality, box=None):
  return store.preset(sid, modality).inverse(store.read(sid, modality, box)).astype(np.float32)


def _slices(box):
  return tuple(slice(a, b) for a, b in box)


def _leftovers(workdir):
  return [f for f in os.listdir(workdir) if f.startswith(".")]


@pytest.mark.parametrize("box,limit,want", [
    (((0, 20), (0, 18), (0, 16)), (8, 7, 32), ((6, 14), (5, 12), (0, 16))),
    (((3, 13), (4, 9), (2, 3)), (4, 5, 1), ((6, 10), (4, 9), (2, 3))),
    (((10, 21), (0, 8), (5, 9)), (2, 3, 3), ((14, 16), (2, 5), (5, 8))),
    (((0, 20), (0, 18), (0, 16)), None, ((0, 20), (0, 18), (0, 16))),
])
def test_clipped_box_is_centred_inside_the_region(box, limit, want):
  got = volumes.clip_box(box, limit)
  assert got == want
  for (a, b), (lo, hi), m in zip(got, box, limit or (np.inf,) * 3):
    assert lo <= a < b <= hi and b - a == min(m, hi - lo)
    assert 0 <= (hi - b) - (a - lo) <= 1  # centred; an odd margin's extra voxel after the box


@pytest.mark.parametrize("value", [(16, 16), (16, 0, 16), (16, 16.5, 16), (16, 10, 16)])
def test_bad_max_box_is_an_error(store, value):
  c = _config(store, max_box=value)
  with pytest.raises(ValueError, match="max_box"):
    volumes.max_box(c)


def test_evaluation_scores_and_writes_the_clipped_box(store, tmp_path, no_checkpoint):
  c = _config(store)
  summary, sampler = _run(c, tmp_path)
  out = tmp_path / "eval"
  on_disk = json.loads((out / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  assert on_disk["max_box"] == list(MAX_BOX)
  assert on_disk["boxes"] == {"s2": WANT_BOX, "s3": WANT_BOX}
  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [json.loads(r["box"]) for r in rows] == [WANT_BOX, WANT_BOX]
  box = tuple(map(tuple, WANT_BOX))
  # The sampler saw the box's condition: the store's input over that box, nothing more.
  for sid, cond in zip(("s2", "s3"), sampler.conds):
    np.testing.assert_array_equal(cond[0, ..., 0], store.read(sid, "pet_low", box))
  train_mean = np.mean([_raw(store, s, "pet_full", box) for s in ("s0", "s1")], axis=0)
  for sid, row in zip(("s2", "s3"), rows):
    preset = store.preset(sid, "pet_full")
    data_range = float(preset.hi - preset.lo)
    img = nib.load(out / "nifti" / f"{sid}_pred.nii.gz").get_fdata(dtype=np.float32)
    assert img.shape == SHAPE
    inside = np.zeros(SHAPE, bool)
    inside[_slices(box)] = True
    # The NIfTI holds the prediction in the box and the background value everywhere else.
    want = preset.inverse(0.5 * store.read(sid, "pet_low", box))
    np.testing.assert_allclose(img[inside].reshape(want.shape), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(img[~inside], preset.inverse(-1.0), atol=1e-4)
    target = _raw(store, sid, "pet_full", box)
    mask = metrics_lib.body_mask(target)
    for name, pred in (("model", img[_slices(box)]), ("input", _raw(store, sid, "pet_low", box)),
                       ("train_mean", train_mean)):
      for k, v in metrics_lib.compute_all(pred, target, mask, data_range).items():
        assert float(row[f"{name}_{k}"]) == pytest.approx(v, rel=1e-4, abs=1e-5), (sid, name, k)
  assert on_disk["metrics"]["psnr"]["model"] == pytest.approx(
      np.mean([float(r["model_psnr"]) for r in rows]))
  # Without a limit the whole region is scored, and the summary says so.
  c.eval.max_box = ()
  summary, sampler = _run(c, tmp_path)
  assert summary["max_box"] is None
  assert summary["boxes"]["s2"] == [[0, 30], [0, 27], [6, 24]]
  assert sampler.conds[0].shape == (1, 30, 27, 18, 1)


def test_a_new_evaluation_replaces_every_file_of_the_previous_one(store, tmp_path, no_checkpoint):
  _run(_config(store, split="test"), tmp_path)
  first = sorted(os.listdir(tmp_path / "eval" / "nifti"))
  assert first == ["s2_pred.nii.gz", "s3_pred.nii.gz"]
  (tmp_path / "eval" / "notes.txt").write_text("an earlier run's file")
  c = _config(store, split="train")
  c.data.eval_region = None
  c.eval.previews = False
  summary, _ = _run(c, tmp_path)
  out = tmp_path / "eval"
  assert sorted(os.listdir(out)) == ["metrics.csv", "nifti", "references.json", "summary.json"]
  assert sorted(os.listdir(out / "nifti")) == ["s0_pred.nii.gz", "s1_pred.nii.gz"]
  assert json.loads((out / "summary.json").read_text())["boxes"] == summary["boxes"]
  assert oct(os.stat(out).st_mode & 0o777) == oct(fileio.default_mode(directory=True))
  assert not _leftovers(tmp_path)
  # --mode=sample likewise: fewer subjects, no file of the run before.
  _run(_config(store, split="train"), tmp_path, mode="sample")
  _run(_config(store, split="test", max_box=(11, 11, 11)), tmp_path, mode="sample")
  assert sorted(os.listdir(tmp_path / "samples")) == ["nifti"]
  assert sorted(os.listdir(tmp_path / "samples" / "nifti")) == ["s2_pred.nii.gz", "s3_pred.nii.gz"]
  assert sorted(os.listdir(tmp_path)) == ["eval", "references_tuned.json", "samples"]


def test_a_failed_evaluation_leaves_the_previous_outputs(store, tmp_path, no_checkpoint):
  _run(_config(store), tmp_path)
  before = {f: (tmp_path / "eval" / f).read_bytes()
            for f in ("summary.json", "metrics.csv", "nifti/s2_pred.nii.gz")}
  with pytest.raises(RuntimeError, match="sampler failed"):
    _run(_config(store, max_box=(16, 16, 16)), tmp_path, HalfSampler(fail_on_call=2))
  assert {f: (tmp_path / "eval" / f).read_bytes() for f in before} == before
  assert sorted(os.listdir(tmp_path / "eval" / "nifti")) == ["s2_pred.nii.gz", "s3_pred.nii.gz"]
  assert not _leftovers(tmp_path)


def test_processes_other_than_0_write_nothing(store, tmp_path, no_checkpoint, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  summary, _ = _run(_config(store), tmp_path / "w")
  assert summary["boxes"] == {"s2": WANT_BOX, "s3": WANT_BOX}
  _run(_config(store), tmp_path / "w", mode="sample")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize("failing", ["eval", ".eval.new-"])
def test_a_folder_that_cannot_be_replaced_keeps_both(tmp_path, monkeypatch, failing):
  """The previous folder cannot be moved aside (held open), or the new one cannot be moved in."""
  final = tmp_path / "eval"
  final.mkdir()
  (final / "old.txt").write_text("old")
  real_rename = os.rename

  def rename(src, dst):
    if os.path.basename(src).startswith(failing):
      raise PermissionError("in use")
    real_rename(src, dst)

  monkeypatch.setattr(os, "rename", rename)
  with pytest.raises(OSError, match="could not replace") as err:
    with fileio.fresh_dir(str(final)) as work:
      with open(os.path.join(work, "new.txt"), "w") as f:
        f.write("new")
  assert os.listdir(final) == ["old.txt"]
  assert work in str(err.value) and os.listdir(work) == ["new.txt"]
  assert sorted(os.listdir(tmp_path)) == sorted(["eval", os.path.basename(work)])
