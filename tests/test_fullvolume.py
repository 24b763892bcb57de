"""Whole-region training batches (pipeline crops="whole") and the PPDM configs' `fullvolume`
token."""

import json

import nibabel as nib
import numpy as np
import pytest

from jaxvol import config as base
from jaxvol.configs import full3d_mri_t1_t2
from jaxvol.configs import ppdm_mri_t1_t2
from jaxvol.configs import ppdm_pet_ac
from jaxvol.configs import ppdm_pet_denoise
from jaxvol.data import pipeline
from jaxvol.data import store as store_lib

MODS = {"cond": "cond", "target": "target"}
SHAPES = {"a": (13, 10, 9), "b": (11, 10, 7)}
REGION = {0: (0.0, 0.5)}
# round(0.5 * 13) = 6 (half to even) and round(0.5 * 11) = 6: both regions are 6 x 10 x (9 or 7);
# the largest, rounded up to a multiple of 4 per axis, is 8 x 12 x 12.
CROP = (8, 12, 12)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
  """Two train subjects of different shapes (identity presets); target = 2 cond. Returns the store
  and each subject's whole cond volume as the store decodes it (its preset round trip)."""
  folder = tmp_path_factory.mktemp("whole")
  rng = np.random.default_rng(0)
  rows = []
  for sid, shape in SHAPES.items():
    cond = rng.random(shape).astype(np.float32)
    for name, x in (("cond", cond), ("target", 2 * cond)):
      nib.save(nib.Nifti1Image(x, np.eye(4)), str(folder / f"{name}_{sid}.nii.gz"))
    rows.append({"subject": sid, "split": "train", "cond": f"cond_{sid}.nii.gz",
                 "target": f"target_{sid}.nii.gz"})
  (folder / "list.json").write_text(json.dumps(rows))
  store_lib.convert(folder / "list.json", folder / "store",
                    {"cond": "identity", "target": "identity"})
  store = store_lib.Store(str(folder / "store"))
  raw = {sid: store.read(sid, "cond") for sid in SHAPES}
  assert all(raw[sid].shape == shape for sid, shape in SHAPES.items())
  return str(folder / "store"), raw


def _edge_padded(x, shape):
  """x padded at the end of each axis by repeating its last voxel, by index clamping."""
  idx = np.ix_(*[np.minimum(np.arange(n), s - 1) for n, s in zip(shape, x.shape)])
  return x[idx]


def _iter(store, **kw):
  args = dict(split="train", modalities=MODS, crop_size=CROP, batch_size=2, seed=0,
              process_index=0, process_count=1, region=REGION, crops="whole", with_meta=True)
  args.update(kw)
  return pipeline.make_train_iterator(store, **args)


def test_whole_crop_size_is_the_largest_region_padded_to_the_multiple(volumes):
  store, _ = volumes
  assert pipeline.whole_crop_size(store, "train", REGION, (4, 4, 4)) == CROP
  assert pipeline.whole_crop_size(store, "train", None, (1, 1, 1)) == (13, 10, 9)
  assert pipeline.whole_crop_size(store, "train", None, (16, 8, 2)) == (16, 16, 10)


def test_a_batch_is_the_whole_padded_training_region(volumes):
  store, raw = volumes
  subjects = [s["id"] for s in store_lib.Store(store).subjects("train")]
  seen = set()
  for batch in [next(it) for it in [_iter(store, flips=False)] for _ in range(3)]:
    assert batch["cond"].shape == (2, *CROP, 1) and not batch["flips"].any()
    for j in range(2):
      sid = subjects[batch["subject_index"][j]]
      seen.add(sid)
      want = _edge_padded(raw[sid][:6], CROP)
      np.testing.assert_array_equal(batch["cond"][j, ..., 0], want)
      np.testing.assert_allclose(batch["target"][j, ..., 0], 2 * want, rtol=2e-3)
      assert tuple(batch["box_start"][j]) == (0, 0, 0)
  assert seen == set(SHAPES)


def test_flips_act_on_the_padded_region_the_same_for_every_modality(volumes):
  store, raw = volumes
  subjects = [s["id"] for s in store_lib.Store(store).subjects("train")]
  it = _iter(store, flips=True)
  flipped = 0
  for _ in range(4):
    batch = next(it)
    for j in range(2):
      axes = [a for a in range(3) if batch["flips"][j][a]]
      flipped += bool(axes)
      want = _edge_padded(raw[subjects[batch["subject_index"][j]]][:6], CROP)
      want = np.flip(want, axes) if axes else want
      np.testing.assert_array_equal(batch["cond"][j, ..., 0], want)
      np.testing.assert_allclose(batch["target"][j, ..., 0], 2 * want, rtol=2e-3)
  assert flipped


def test_a_crop_size_smaller_than_a_region_is_refused_naming_the_region(volumes):
  store, _ = volumes
  with pytest.raises(ValueError, match=r"at least \(6, 10, 9\)"):
    _iter(store, crop_size=(8, 12, 8))
  with pytest.raises(ValueError, match="crops"):
    _iter(store, crops="wholevolume")


@pytest.mark.parametrize("module,variant", [
    (ppdm_mri_t1_t2, ""), (ppdm_mri_t1_t2, "heldout"), (ppdm_mri_t1_t2, "cpu,heldout"),
    (ppdm_pet_denoise, "heldout"), (ppdm_pet_denoise, "demo"), (ppdm_pet_ac, "smoke,whole")])
def test_fullvolume_token_switches_to_whole_regions_and_nothing_else(module, variant):
  plain = module.get_config(variant)
  full = module.get_config(base.with_tokens(variant, base.FULLVOLUME))
  assert plain.data.crops == "random"
  assert full.data.crops == "whole" and tuple(full.inference.window) == ()
  a, b = json.loads(plain.to_json_best_effort()), json.loads(full.to_json_best_effort())
  a["data"].pop("crops"), b["data"].pop("crops")
  a["inference"].pop("window"), b["inference"].pop("window")
  assert a == b  # the split (`heldout` / `whole`), network and budget are untouched


def test_whole_keeps_naming_the_split_and_fullvolume_is_ppdm_only():
  whole = ppdm_mri_t1_t2.get_config("whole,fullvolume")
  held = ppdm_mri_t1_t2.get_config("heldout,fullvolume")
  assert whole.data.train_region is None and whole.eval.split == "test"
  assert dict(held.data.train_region) == {"0": (0.0, 0.5)} and held.eval.split == "train"
  assert ppdm_mri_t1_t2.get_config("whole").data.crops == "random"
  with pytest.raises(ValueError, match="unknown token"):
    full3d_mri_t1_t2.get_config("heldout,fullvolume")


def test_training_sets_the_crop_to_the_whole_region(volumes):
  """loop.resolve_whole_crop: what `jaxvol train` does with the token, from the store's manifest."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  store, _ = volumes
  c = ppdm_mri_t1_t2.get_config("smoke,fullvolume")
  c.data.inputs, c.data.target = ("cond",), "target"
  c.data.store, c.data.train_split, c.data.train_region = store, "train", REGION
  c.ppdm.factor = (2, 2, 2)  # spatial multiple 4 with the smoke U-Net's two levels
  loop.resolve_whole_crop(c)
  assert tuple(c.data.crop_size) == CROP
  c.data.store = ""  # no store to read (jaxvol plan without data): left as configured
  c.data.crop_size = (16, 16, 16)
  loop.resolve_whole_crop(c)
  assert tuple(c.data.crop_size) == (16, 16, 16)
  crops = ppdm_mri_t1_t2.get_config("smoke")  # random crops: never touched
  crops.data.store = store
  loop.resolve_whole_crop(crops)
  assert tuple(crops.data.crop_size) == (16, 16, 16)
