"""Grain pipeline: determinism, resumable state, workers, per-host sharding, paired crops."""

import json
import pickle

import nibabel as nib
import numpy as np
import pytest

from jaxvol.data import pipeline
from jaxvol.data import store as store_lib

MODS = {"cond": "cond", "target": "target"}


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory):
  """6 train subjects (one smaller than the crop along axis 2) + 1 val; target = 2 * cond."""
  folder = tmp_path_factory.mktemp("paired")
  rng = np.random.default_rng(0)
  rows = []
  shapes = [(24, 20, 18)] * 5 + [(24, 20, 6), (16, 16, 16)]
  for i, shape in enumerate(shapes):
    cond = rng.random(shape).astype(np.float32) * 0.5
    for name, x in (("cond", cond), ("target", 2 * cond)):
      nib.save(nib.Nifti1Image(x, np.diag([1.0, 1, 1, 1])), str(folder / f"{name}{i}.nii.gz"))
    rows.append({"subject": f"s{i}", "split": "val" if i == 6 else "train",
                 "cond": f"cond{i}.nii.gz", "target": f"target{i}.nii.gz"})
  (folder / "list.json").write_text(json.dumps(rows))
  # Identity presets keep the raw values, so the relation target = 2 * cond survives.
  store_lib.convert(folder / "list.json", folder / "store",
                    {"cond": "identity", "target": "identity"})
  return str(folder / "store")


def _take(it, n):
  return [next(it) for _ in range(n)]


def _iter(store, **kw):
  args = dict(split="train", modalities=MODS, crop_size=(8, 8, 8), batch_size=4, seed=0,
              process_index=0, process_count=1)
  args.update(kw)
  return pipeline.make_train_iterator(store, **args)


def _same(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_batches_shapes_and_paired_crops(paired_store):
  it = _iter(paired_store, with_meta=True)
  saw_padding = False
  for batch in _take(it, 6):
    assert batch["cond"].shape == (4, 8, 8, 8, 1) and batch["cond"].dtype == np.float32
    padded = batch["cond"] == pipeline.PAD_VALUE
    saw_padding |= bool(padded.any())
    # Same box and same flips for both modalities: the pixel relation holds everywhere.
    np.testing.assert_allclose(np.where(padded, -2.0, 2 * batch["cond"]), np.where(
        padded, -2.0, batch["target"]), atol=1e-6)
    assert np.array_equal(batch["target"] == pipeline.PAD_VALUE, padded)
  assert saw_padding  # subject s5 is thinner (6) than the crop (8) along axis 2


def test_crop_matches_store_read(paired_store):
  store = store_lib.Store(paired_store)
  it = _iter(store, with_meta=True, flips=False)
  batch = next(it)
  source = pipeline.CropSource(store, "train")
  for j in range(4):
    sid = source.subject_ids[batch["subject_index"][j]]
    if store.shape(sid)[2] < 8:
      continue
    start = batch["box_start"][j]
    box = [(int(s), int(s) + 8) for s in start]
    np.testing.assert_array_equal(batch["cond"][j, ..., 0], store.read(sid, "cond", box))
    assert not batch["flips"][j].any()


def test_deterministic_and_seed_dependent(paired_store):
  a, b = _take(_iter(paired_store), 3), _take(_iter(paired_store), 3)
  assert _same(a, b)
  c = _take(_iter(paired_store, seed=1), 3)
  assert not _same(a, c)


def test_state_checkpoint_resumes_exactly(paired_store):
  it = _iter(paired_store)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = _iter(paired_store)
  fresh.set_state(json.loads(json.dumps(state, default=int)) if isinstance(state, dict) else state)
  assert _same(_take(fresh, 3), expected)


@pytest.mark.slow
def test_workers_give_the_same_batches(paired_store):
  ref = _take(_iter(paired_store), 3)
  it = _iter(paired_store, num_workers=2)
  try:
    assert _same(_take(it, 3), ref)
  finally:
    del it  # Stop the workers before the temporary store goes away.


def test_per_host_sharding(paired_store):
  global_batches = _take(_iter(paired_store, batch_size=2, with_meta=True), 6)
  host = [_take(_iter(paired_store, batch_size=2, process_index=p, process_count=2,
                      with_meta=True), 6) for p in (0, 1)]
  # Hosts read disjoint elements; together they make the single-host global batch, crops included.
  for k in range(6):
    for key in global_batches[k]:
      np.testing.assert_array_equal(
          np.concatenate([host[0][k][key], host[1][k][key]]), global_batches[k][key])
  # Within the first epoch (6 subjects), the two hosts see disjoint subjects covering all of them.
  first = [set(int(b["subject_index"][0]) for b in host[p][:3]) for p in (0, 1)]
  assert not first[0] & first[1] and first[0] | first[1] == set(range(6))
  assert host[0][0]["cond"].shape[0] == 1


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_feed_contiguous_rows_of_the_global_batch(paired_store, hosts):
  # Rows keep their place in the global batch (each row draws its own noise in the train step),
  # and one host's iterator state puts every host, on any host count, at the same global batch.
  global_batches = _take(_iter(paired_store, batch_size=4, with_meta=True), 5)
  its = [_iter(paired_store, batch_size=4, process_index=p, process_count=hosts, with_meta=True)
         for p in range(hosts)]
  host = [_take(it, 3) for it in its]
  for k in range(3):
    for key in global_batches[k]:
      np.testing.assert_array_equal(np.concatenate([h[k][key] for h in host]),
                                    global_batches[k][key])
  state = its[hosts - 1].get_state()
  assert all(it.get_state() == state for it in its)
  single = _iter(paired_store, batch_size=4, with_meta=True)
  single.set_state(state)
  assert _same([next(single)], [global_batches[3]])


def test_region_restricts_crops(paired_store):
  store = store_lib.Store(paired_store)
  region = {0: (0.5, 1.0)}
  it = _iter(store, region=region, with_meta=True)
  for batch in _take(it, 4):
    assert (batch["box_start"][:, 0] >= 12).all()
  # Config files give string keys and lists.
  it = _iter(store, region={"1": [0.0, 0.5]}, with_meta=True)
  for batch in _take(it, 4):
    assert (batch["box_start"][:, 1] + 8 <= 10).all()
  assert pipeline.region_box((24, 20, 18), {"0": (0.0, 0.5)}) == ((0, 12), (0, 20), (0, 18))
  assert pipeline.region_box((25, 20, 18), {0: (0.5, 1.0)})[0] == (12, 25)
  assert pipeline.region_box((25, 20, 18), None) == ((0, 25), (0, 20), (0, 18))
  with pytest.raises(ValueError, match="lo < hi"):
    pipeline.region_box((24, 20, 18), {1: (0.6, 0.2)})


def test_source_and_validation(paired_store):
  src = pipeline.CropSource(paired_store, "train")
  assert len(src) == 6 and src[2] == {"subject": "s2", "index": 2}
  assert repr(src) == repr(pickle.loads(pickle.dumps(src)))
  assert "split='train'" in repr(src)
  with pytest.raises(ValueError, match="no subjects"):
    pipeline.CropSource(paired_store, "test")
  with pytest.raises(ValueError, match="crop_size"):
    _iter(paired_store, crop_size=(8, 8))
  with pytest.raises(ValueError, match="divisible"):
    _iter(paired_store, batch_size=3, process_count=2)
  with pytest.raises(ValueError, match="no modalities"):
    _iter(paired_store, modalities={"x": "ct"})
  with pytest.raises(ValueError, match="process_index"):
    _iter(paired_store, process_index=2, process_count=2)


def test_defaults_to_jax_process(paired_store):
  it = pipeline.make_train_iterator(paired_store, "val", MODS, (8, 8, 8), 2, seed=0)
  assert next(it)["cond"].shape == (2, 8, 8, 8, 1)


def test_position_grid_maps_voxel_centres_to_minus_one_one():
  g = pipeline.position_grid((4, 2, 6))
  assert g.shape == (4, 2, 6, 3) and g.dtype == np.float32
  np.testing.assert_allclose(g[:, 0, 0, 0], [-0.75, -0.25, 0.25, 0.75])
  np.testing.assert_allclose(g[0, :, 0, 1], [-0.5, 0.5])
  # A box is the same voxels' positions; boxes past the border extrapolate.
  np.testing.assert_array_equal(pipeline.position_grid((4, 2, 6), ((1, 3), (0, 2), (2, 5))),
                                g[1:3, :, 2:5])
  np.testing.assert_allclose(pipeline.position_grid((4, 2, 6), ((-1, 1), (0, 1), (0, 1)))[:, 0, 0, 0],
                             [-1.25, -0.75])


def test_crops_carry_their_positions_flipped_with_the_image(paired_store):
  store = store_lib.Store(paired_store)
  source = pipeline.CropSource(store, "train")
  seen_flip = seen_pad = False
  for batch in _take(_iter(store, with_meta=True, positions=True), 6):
    assert batch["position"].shape == (4, 8, 8, 8, 3)
    for j in range(4):
      sid = source.subject_ids[batch["subject_index"][j]]
      shape = store.shape(sid)
      # Thin axes are read whole and centred in the crop (offset (8 - n) // 2).
      box = [(int(s), int(s) + 8) if n >= 8 else (-((8 - n) // 2), -((8 - n) // 2) + 8)
             for s, n in zip(batch["box_start"][j], shape)]
      want = pipeline.position_grid(shape, box)
      flips = [a for a in range(3) if batch["flips"][j][a]]
      if flips:
        want = np.flip(want, axis=flips)
        seen_flip = True
      seen_pad |= min(shape) < 8
      np.testing.assert_allclose(batch["position"][j], want, atol=1e-6)
  assert seen_flip and seen_pad


def test_position_grid_zeroes_the_axes_it_does_not_encode():
  full = pipeline.position_grid((4, 2, 6))
  g = pipeline.position_grid((4, 2, 6), ((1, 3), (0, 2), (2, 5)), axes=(1, 2))
  np.testing.assert_array_equal(g[..., 0], 0.0)
  np.testing.assert_array_equal(g[..., 1:], full[1:3, :, 2:5, 1:])
  np.testing.assert_array_equal(pipeline.position_grid((4, 2, 6), axes=()), 0.0)


def test_position_axes_reads_the_data_config():
  assert pipeline.position_axes({"position_channels": False, "position_axes": (1, 2)}) == ()
  assert pipeline.position_axes({"position_channels": True}) == (0, 1, 2)  # older configs
  assert pipeline.position_axes({"position_channels": True, "position_axes": [2, 1]}) == (1, 2)
  for bad in ((), (0, 0), (3,)):
    with pytest.raises(ValueError, match="position_axes"):
      pipeline.position_axes({"position_channels": True, "position_axes": bad})


def test_position_coverage_refuses_coordinates_training_never_saw():
  half, other = {"0": (0.0, 0.5)}, {"0": (0.5, 1.0)}
  # The hemisphere split with an x channel: x in [0.5, 1) at evaluation, [0, 0.5) in training.
  with pytest.raises(ValueError, match=r"axis 0 evaluated on \(0.5, 1.0\) but trained on "
                     r"\(0.0, 0.5\).*position_axes = \(1, 2\)"):
    pipeline.check_position_coverage(half, other, (0, 1, 2))
  # Evaluating the whole volume leaves the training half too; the axes training covers pass.
  with pytest.raises(ValueError, match="axis 0"):
    pipeline.check_position_coverage(half, None, (0,))
  pipeline.check_position_coverage(half, other, (1, 2))
  pipeline.check_position_coverage(half, other, ())
  pipeline.check_position_coverage(None, other, (0, 1, 2))  # trained on every coordinate
  pipeline.check_position_coverage({2: (0.0, 0.8)}, {2: (0.1, 0.8)}, (0, 1, 2))  # inside
  # Splitting on another axis moves the problem there; a partial overlap is refused too.
  with pytest.raises(ValueError, match="axis 2"):
    pipeline.check_position_coverage({"2": (0.0, 0.6)}, {"2": (0.6, 1.0)}, (0, 1, 2))
  with pytest.raises(ValueError, match="axis 1"):
    pipeline.check_position_coverage({1: (0.2, 0.7)}, {1: (0.5, 0.9)}, (1,))
  with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
    pipeline.check_position_coverage({0: (0.5, 0.2)}, None, (1,))


def test_crops_carry_only_the_encoded_position_axes(paired_store):
  store = store_lib.Store(paired_store)
  source = pipeline.CropSource(store, "train")
  for crops in ("random", "grid"):
    batch = next(_iter(store, with_meta=True, positions=(1, 2), crops=crops,
                       region={0: (0.0, 0.5)}))
    for j in range(4):
      shape = store.shape(source.subject_ids[batch["subject_index"][j]])
      np.testing.assert_array_equal(batch["position"][j][..., 0], 0.0)
      # Axis 0's crop lies in the first half, but its channel carries nothing of it; axes 1, 2
      # are the crop's own coordinates (flipped with the image).
      start = batch["box_start"][j]
      y = (2.0 * (start[1] + np.arange(8)) + 1.0) / shape[1] - 1.0
      if batch["flips"][j][1]:
        y = y[::-1]
      np.testing.assert_allclose(batch["position"][j][0, :, 0, 1], y, atol=1e-6)


def test_grid_starts_follow_the_authors_rule():
  # 50% overlap, plus one patch ending at the edge when the grid stops short of it.
  assert pipeline.grid_starts(0, 24, 8, 4) == [0, 4, 8, 12, 16]
  assert pipeline.grid_starts(0, 20, 8, 4) == [0, 4, 8, 12]
  assert pipeline.grid_starts(0, 18, 8, 4) == [0, 4, 8, 10]
  assert pipeline.grid_starts(0, 6, 8, 4) == [0]  # shorter than the patch: read, then pad
  assert pipeline.grid_starts(12, 24, 8, 4) == [12, 16]
  with pytest.raises(ValueError, match="positive"):
    pipeline.grid_starts(0, 8, 8, 0)


def test_grid_crops_cover_the_grid_each_epoch_unflipped(paired_store):
  store = store_lib.Store(paired_store)
  src = pipeline.GridSource(store, "train", (8, 8, 8))
  # 5 subjects of 24x20x18 (5 x 4 x 4 patches) and one of 24x20x6 (5 x 4 x 1).
  assert len(src) == 5 * 80 + 20 and repr(src) == repr(pickle.loads(pickle.dumps(src)))
  it = _iter(store, crops="grid", with_meta=True, batch_size=4)
  seen = []
  for batch in _take(it, len(src) // 4):
    assert not batch["flips"].any()
    for j in range(4):
      sid = src.subject_ids[batch["subject_index"][j]]
      start = tuple(int(s) for s in batch["box_start"][j])
      seen.append((sid, start))
      n = store.shape(sid)
      box = [(s, min(s + 8, m)) for s, m in zip(start, n)]
      data = store.read(sid, "cond", box)
      got = batch["cond"][j, ..., 0]
      np.testing.assert_array_equal(got[:data.shape[0], :data.shape[1], :data.shape[2]], data)
      if n[2] < 8:  # padded after the data with -1, as the authors' loader pads
        assert (got[:, :, n[2]:] == pipeline.PAD_VALUE).all()
      np.testing.assert_allclose(batch["target"][j, ..., 0][got != pipeline.PAD_VALUE],
                                 2 * got[got != pipeline.PAD_VALUE], atol=1e-6)
  expected = [(src.subject_ids[i], tuple(int(s) for s in start)) for i, start in src.patches]
  assert sorted(seen) == sorted(expected)  # every grid patch once per epoch, shuffled
  assert seen != expected
  a, b = _take(_iter(store, crops="grid"), 2), _take(_iter(store, crops="grid"), 2)
  assert _same(a, b) and not _same(a, _take(_iter(store, crops="grid", seed=1), 2))
  region = _take(_iter(store, crops="grid", region={0: (0.5, 1.0)}, with_meta=True), 3)
  assert all((b["box_start"][:, 0] >= 12).all() for b in region)
  with pytest.raises(ValueError, match="crops"):
    _iter(store, crops="sliding")
