"""Preconverted store: datalists, conversion, manifest, reads, presets, bad inputs, resume."""

import json
import os
import pickle
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from jaxvol.data import nifti
from jaxvol.data import presets as presets_lib
from jaxvol.data import store as store_lib
from jaxvol.data.nifti import VolumeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LPS = np.array([[-1.0, 0, 0, 30], [0, -1.5, 0, 40], [0, 0, 2.0, -10], [0, 0, 0, 1]])


def _save(path, data, affine=LPS, dtype=None):
  nib.save(nib.Nifti1Image(data, affine, dtype=dtype), str(path))
  return os.path.basename(str(path))


def _subjects(folder, n=3, shape=(20, 18, 16)):
  """Writes n subjects with 'mr' (MRI-like) and paired 'pet_low'/'pet_full' volumes."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(n):
    full = rng.gamma(2.0, 3.0, size=shape).astype(np.float32)
    low = rng.poisson(full).astype(np.float32)
    mr = np.where(rng.random(shape) > 0.2, rng.normal(300, 50, size=shape), 0).astype(np.int16)
    rows.append({
        "subject": f"s{i}", "split": ["train", "train", "val"][i % 3],
        "mr": _save(folder / f"mr{i}.nii.gz", mr, dtype=np.int16),
        "pet_low": _save(folder / f"low{i}.nii.gz", low),
        "pet_full": _save(folder / f"full{i}.nii.gz", full),
    })
  return rows


PRESETS = {"mr": {"kind": "mri"}, "pet_low": {"kind": "pet", "ref": "pet_full"},
           "pet_full": "pet"}


def _csv(path, rows, columns=None):
  columns = columns or list(rows[0])
  lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
  path.write_text("\n".join(lines) + "\n")
  return path


def test_convert_csv_and_read(tmp_path):
  rows = _subjects(tmp_path)
  dl = _csv(tmp_path / "list.csv", rows)
  out = tmp_path / "store"
  manifest = store_lib.convert(dl, out, PRESETS)
  on_disk = json.loads((out / "manifest.json").read_text())
  assert on_disk == json.loads(json.dumps(manifest))
  assert not (out / "manifest.partial.json").exists()
  assert manifest["version"] == 2 and manifest["modalities"] == ["mr", "pet_low", "pet_full"]
  assert [s["id"] for s in manifest["subjects"]] == ["s0", "s1", "s2"]
  assert [s["split"] for s in manifest["subjects"]] == ["train", "train", "val"]

  store = store_lib.Store(out)
  assert [s["id"] for s in store.subjects("train")] == ["s0", "s1"]
  assert [s["id"] for s in store.subjects("val")] == ["s2"]
  for i, row in enumerate(rows):
    sid = row["subject"]
    entry = store.subjects()[i]
    for mod in ("mr", "pet_low", "pet_full"):
      raw, geom = nifti.load_volume(tmp_path / row[mod])
      vol = entry["volumes"][mod]
      assert vol["path"] == f"volumes/{sid}/{mod}.zarr"
      assert vol["source"] == str(tmp_path / row[mod])
      assert store.geometry(sid, mod) == geom
      assert entry["shape"] == list(raw.shape) == list(geom.ras_shape)
      assert set(vol["stats"]) == {"min", "max", "mean", "std", "p01", "p99"}
      assert vol["stats"]["max"] == pytest.approx(float(raw.max()))
      assert vol["stats"]["mean"] == pytest.approx(float(raw.mean()), rel=1e-5)
      full = store.read(sid, mod)
      assert full.dtype == np.float32 and full.shape == raw.shape
      preset = store.preset(sid, mod)
      # The inverse preset gives back the raw volume (PET/MRI are not clipped).
      np.testing.assert_allclose(preset.inverse(full), raw, rtol=1e-5, atol=1e-3)
      box = ((3, 11), (0, 18), (5, 6))
      np.testing.assert_array_equal(store.read(sid, mod, box), full[3:11, 0:18, 5:6])
      np.testing.assert_array_equal(store.read(sid, mod, (slice(2, 4), slice(None), slice(0, 16))),
                                    full[2:4])
    # Paired PET shares one scale, fitted on the training split's full-count volumes (fit=train:
    # the median of the training subjects' 99.9th percentiles; the val subject s2 plays no part).
    assert store.preset(sid, "pet_low") == store.preset(sid, "pet_full")
    train_full = [nifti.load_volume(tmp_path / r["pet_full"])[0] for r in rows[:2]]
    assert store.preset(sid, "pet_full").hi == pytest.approx(
        np.median([np.percentile(v, 99.9) for v in train_full]), rel=1e-6)
    assert store.preset(sid, "mr").name == "mri"
  assert manifest["presets"]["pet_full"]["fit"] == "train"
  assert manifest["fitted"]["pet_full"] == store.preset("s2", "pet_full").to_dict()
  # Chunked zarr on disk, chunks clipped to the shape.
  zarray = json.loads((out / "volumes" / "s0" / "mr.zarr" / ".zarray").read_text())
  assert zarray["chunks"] == [20, 18, 16] and zarray["dtype"] == "<f4"
  with pytest.raises(ValueError, match="outside"):
    store.read("s0", "mr", ((0, 99), (0, 1), (0, 1)))
  with pytest.raises(KeyError, match="nope"):
    store.read("nope", "mr")


def test_convert_json_datalist_defaults(tmp_path):
  rows = _subjects(tmp_path, n=2)
  for r in rows:
    del r["subject"], r["split"]
  (tmp_path / "sub").mkdir()
  dl = tmp_path / "sub" / "list.json"
  # Relative paths resolve against the datalist's folder.
  dl.write_text(json.dumps({"subjects": [{k: f"../{v}" for k, v in r.items()} for r in rows]}))
  manifest = store_lib.convert(dl, tmp_path / "store", PRESETS)
  assert [(s["id"], s["split"]) for s in manifest["subjects"]] == [("sub-0000", "train"),
                                                                   ("sub-0001", "train")]
  assert manifest["subjects"][1]["volumes"]["mr"]["source"] == str(tmp_path / rows[1]["mr"])


def test_store_pickles_cheaply(tmp_path):
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=1))
  store_lib.convert(dl, tmp_path / "store", PRESETS)
  store = store_lib.Store(tmp_path / "store")
  a = store.read("s0", "mr", ((0, 4), (0, 4), (0, 4)))
  blob = pickle.dumps(store)
  assert len(blob) < 300  # only the path travels, never tensorstore handles or the manifest
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone.read("s0", "mr", ((0, 4), (0, 4), (0, 4))), a)
  assert repr(clone) == repr(store)


def test_existing_store_and_overwrite(tmp_path):
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=1))
  out = tmp_path / "store"
  store_lib.convert(dl, out, PRESETS)
  with pytest.raises(FileExistsError, match="overwrite"):
    store_lib.convert(dl, out, PRESETS)
  manifest = store_lib.convert(dl, out, dict(PRESETS, mr={"kind": "mri", "upper": 90}),
                               overwrite=True)
  assert manifest["presets"]["mr"]["upper"] == 90
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "x.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not a store"):
    store_lib.convert(dl, tmp_path / "junk", PRESETS)


def _bad_case(tmp_path, case):
  """Datalist with one bad input; returns (datalist, name of the offending file)."""
  rows = _subjects(tmp_path, n=3)
  bad = rows[2]
  if case == "4d":
    bad["mr"] = _save(tmp_path / "bad_4d.nii.gz", np.ones((20, 18, 16, 2), np.float32))
  elif case == "truncated":
    blob = (tmp_path / bad["pet_full"]).read_bytes()
    (tmp_path / "bad_trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
    bad["pet_full"] = "bad_trunc.nii.gz"
  elif case == "nan":
    x = np.ones((20, 18, 16), np.float32)
    x[3, 4, 5] = np.nan
    bad["pet_low"] = _save(tmp_path / "bad_nan.nii.gz", x)
  elif case == "shape":
    bad["pet_low"] = _save(tmp_path / "bad_shape.nii.gz", np.ones((20, 18, 15), np.float32))
  elif case == "affine":
    bad["pet_low"] = _save(tmp_path / "bad_affine.nii.gz", np.ones((20, 18, 16), np.float32),
                           affine=np.diag([2.0, 2, 2, 1]))
  elif case == "missing":
    bad["mr"] = "bad_missing.nii.gz"
  elif case == "zero_pet":
    bad["pet_full"] = _save(tmp_path / "bad_zero.nii.gz", np.zeros((20, 18, 16), np.float32))
  return _csv(tmp_path / "list.csv", rows), [v for v in bad.values() if "bad_" in v][0]


@pytest.mark.parametrize("case", ["4d", "truncated", "nan", "shape", "affine", "missing",
                                  "zero_pet"])
def test_bad_input_names_file_and_writes_nothing(tmp_path, case):
  dl, bad_name = _bad_case(tmp_path, case)
  out = tmp_path / "store"
  with pytest.raises(VolumeError, match=bad_name.replace(".", r"\.")) as info:
    store_lib.convert(dl, out, PRESETS)
  if case in ("shape", "affine"):  # both files of the pair are named
    assert "full2.nii.gz" in str(info.value) or "mr2.nii.gz" in str(info.value)
  assert not out.exists()
  # Into an existing empty folder: it stays empty.
  out.mkdir()
  with pytest.raises(VolumeError, match=bad_name.replace(".", r"\.")):
    store_lib.convert(dl, out, PRESETS)
  assert os.listdir(out) == []


@pytest.mark.parametrize("content,name", [("mr,pet_low,pet_full\n", "empty.csv"),
                                          ("[]", "empty.json"),
                                          ('{"subjects": []}', "empty2.json")])
def test_empty_datalist(tmp_path, content, name):
  (tmp_path / name).write_text(content)
  with pytest.raises(VolumeError, match=f"{name}.*empty"):
    store_lib.convert(tmp_path / name, tmp_path / "store", PRESETS)
  assert not (tmp_path / "store").exists()


def test_datalist_errors(tmp_path):
  rows = _subjects(tmp_path, n=2)
  rows[1]["split"] = "holdout"
  with pytest.raises(VolumeError, match="list.csv.*holdout"):
    store_lib.read_datalist(_csv(tmp_path / "list.csv", rows))
  rows[1]["split"] = "train"
  rows[1]["subject"] = "s0"
  with pytest.raises(VolumeError, match="list.csv.*twice"):
    store_lib.read_datalist(_csv(tmp_path / "list.csv", rows))
  (tmp_path / "list.json").write_text(json.dumps([{"a": "x.nii"}, {"b": "y.nii"}]))
  with pytest.raises(VolumeError, match="list.json.*modalities"):
    store_lib.read_datalist(tmp_path / "list.json")
  with pytest.raises(VolumeError, match="nope.csv.*not found"):
    store_lib.read_datalist(tmp_path / "nope.csv")
  dl = _csv(tmp_path / "ok.csv", _subjects(tmp_path, n=1))
  with pytest.raises(ValueError, match="no intensity preset.*mr"):
    store_lib.convert(dl, tmp_path / "store", {"pet_low": "pet", "pet_full": "pet"})
  with pytest.raises(ValueError, match="ref"):
    store_lib.convert(dl, tmp_path / "store", dict(PRESETS, pet_low={"kind": "pet", "ref": "x"}))
  assert not (tmp_path / "store").exists()



def test_ref_shares_the_fitted_scale_of_its_reference(tmp_path):
  """`ref=` copies the reference's FITTED preset (also when it was given a cap); the modality's own
  keywords override it; chained refs and mixed kinds are refused before anything is written."""
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=1))

  def presets(**pets):
    return store_lib.convert(dl, tmp_path / "store", {"mr": "mri", **pets},
                             overwrite=True)["subjects"][0]["volumes"]

  vols = presets(pet_low={"kind": "pet", "cap": 5.0}, pet_full={"kind": "pet", "ref": "pet_low"})
  assert vols["pet_low"]["preset"] == vols["pet_full"]["preset"] == {"name": "pet", "lo": 0.0,
                                                                     "hi": 5.0}
  vols = presets(pet_low="pet", pet_full={"kind": "pet", "ref": "pet_low"})  # percentile of low
  low, _ = nifti.load_volume(tmp_path / "low0.nii.gz")
  assert vols["pet_full"]["preset"] == vols["pet_low"]["preset"]
  assert vols["pet_full"]["preset"]["hi"] == pytest.approx(float(np.percentile(low, 99.9)))
  vols = presets(pet_low={"kind": "pet", "cap": 5.0},
                 pet_full={"kind": "pet", "ref": "pet_low", "cap": 7.0})  # its own cap wins
  assert vols["pet_full"]["preset"]["hi"] == 7.0
  with pytest.raises(ValueError, match="has a ref itself"):
    store_lib.convert(dl, tmp_path / "s2", {"mr": {"kind": "mri", "ref": "pet_full"},
                                            "pet_low": "pet",
                                            "pet_full": {"kind": "pet", "ref": "pet_low"}})
  with pytest.raises(ValueError, match="cannot share the scale"):
    store_lib.convert(dl, tmp_path / "s2", {"mr": {"kind": "mri", "ref": "pet_low"},
                                            "pet_low": "pet", "pet_full": "pet"})
  assert not (tmp_path / "s2").exists()

def test_resume_after_interruption(tmp_path, monkeypatch):
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=3))
  out = tmp_path / "store"
  real_write = store_lib._write_zarr
  calls = []

  def interrupted_write(path, data):
    calls.append(path)
    if len(calls) == 5:  # the second modality of the second subject
      raise KeyboardInterrupt
    real_write(path, data)

  monkeypatch.setattr(store_lib, "_write_zarr", interrupted_write)
  with pytest.raises(KeyboardInterrupt):
    store_lib.convert(dl, out, PRESETS)
  partial = json.loads((out / "manifest.partial.json").read_text())
  assert [s["id"] for s in partial["subjects"]] == ["s0"]
  assert not (out / "manifest.json").exists()
  with pytest.raises(VolumeError, match="not a converted store.*resume"):
    store_lib.Store(out)
  # No half-written volume: only complete zarr folders, no temporaries.
  for root, dirs, _ in os.walk(out / "volumes"):
    assert not [d for d in dirs if ".tmp-" in d]

  # An error on resume keeps s0 (from the earlier call) and the subjects finished since.
  calls.clear()

  def failing_write(path, data):
    calls.append(path)
    if len(calls) == 4:
      raise OSError("disk full")
    real_write(path, data)

  monkeypatch.setattr(store_lib, "_write_zarr", failing_write)
  with pytest.raises(OSError, match="disk full"):
    store_lib.convert(dl, out, PRESETS)
  partial = json.loads((out / "manifest.partial.json").read_text())
  assert [s["id"] for s in partial["subjects"]] == ["s0", "s1"]
  assert sorted(os.listdir(out / "volumes")) == ["s0", "s1"]

  calls.clear()
  monkeypatch.setattr(store_lib, "_write_zarr", interrupted_write)
  manifest = store_lib.convert(dl, out, PRESETS)
  assert len(calls) == 3  # only s2 was written
  assert [s["id"] for s in manifest["subjects"]] == ["s0", "s1", "s2"]
  assert not (out / "manifest.partial.json").exists()
  store = store_lib.Store(out)
  raw, _ = nifti.load_volume(tmp_path / "full1.nii.gz")
  np.testing.assert_allclose(store.preset("s1", "pet_full").inverse(store.read("s1", "pet_full")),
                             raw, rtol=1e-5, atol=1e-3)
  # A different preset set does not silently mix with the partial store.
  (out / "manifest.json").unlink()
  (out / "manifest.partial.json").write_text(json.dumps(dict(partial, presets={})))
  with pytest.raises(ValueError, match="overwrite"):
    store_lib.convert(dl, out, PRESETS)


def test_error_midway_removes_created_store(tmp_path, monkeypatch):
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=3))
  real_write = store_lib._write_zarr
  calls = []

  def failing_write(path, data):
    calls.append(path)
    if len(calls) == 5:
      raise OSError("disk full")
    real_write(path, data)

  monkeypatch.setattr(store_lib, "_write_zarr", failing_write)
  with pytest.raises(OSError):
    store_lib.convert(dl, tmp_path / "store", PRESETS)
  assert not (tmp_path / "store").exists()


def test_presets_unit():
  ct = presets_lib.fit_preset("ct", None)
  assert (ct.lo, ct.hi) == (-1000.0, 1000.0)
  np.testing.assert_allclose(ct.forward(np.array([-3000.0, -1000.0, 0.0, 1000.0, 3000.0])),
                             [-1, -1, 0, 1, 1])
  assert presets_lib.fit_preset("ct", lo=-160, hi=240).hi == 240.0
  x = np.random.default_rng(0).gamma(2.0, 2.0, size=10000).astype(np.float32)
  pet = presets_lib.fit_preset("pet", x)
  assert pet.lo == 0 and pet.hi == pytest.approx(np.percentile(x, 99.9))
  assert pet.forward(x).max() > 1.0  # not clipped
  np.testing.assert_allclose(pet.inverse(pet.forward(x)), x, rtol=1e-5, atol=1e-5)
  assert presets_lib.fit_preset("pet", x, cap=8.0).hi == 8.0
  mr = np.concatenate([np.zeros(5000), x])
  p = presets_lib.fit_preset("mri", mr)
  assert p.lo == pytest.approx(np.percentile(x, 0.5))
  assert p.hi == pytest.approx(np.percentile(x, 99.5))
  ident = presets_lib.fit_preset("identity")
  np.testing.assert_allclose(ident.forward(np.array([-1.0, 0.3, 1.0])), [-1.0, 0.3, 1.0])
  assert presets_lib.Preset.from_dict(json.loads(json.dumps(p.to_dict()))) == p
  assert ident.forward(np.float32([1.0])).dtype == np.float32
  with pytest.raises(ValueError, match="kind"):
    presets_lib.fit_preset("xray", x)
  with pytest.raises(ValueError, match="cap"):
    presets_lib.fit_preset("ct", x, cap=3)
  with pytest.raises(ValueError, match="lo < hi"):
    presets_lib.fit_preset("pet", np.zeros(10))
  with pytest.raises(ValueError, match="all-zero"):
    presets_lib.fit_preset("mri", np.zeros(10))


def test_cli(tmp_path):
  dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=2))
  cmd = [sys.executable, os.path.join(ROOT, "tools", "convert.py"), "--datalist", str(dl),
         "--out", str(tmp_path / "store"), "--preset", "mr=mri:upper=99",
         "--preset", "pet_low=pet:ref=pet_full", "--preset", "pet_full=pet"]
  ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert "2 subjects" in ok.stdout and "pet_low: pet" in ok.stdout
  manifest = store_lib.Store(tmp_path / "store").manifest
  assert manifest["presets"]["mr"] == {"kind": "mri", "upper": 99.0, "fit": "train"}
  # Bad input: exit 1, the message names the file, no traceback, nothing written.
  x = np.ones((20, 18, 16), np.float32)
  x[0, 0, 0] = np.inf
  _save(tmp_path / "full1.nii.gz", x)
  cmd[cmd.index(str(tmp_path / "store"))] = str(tmp_path / "store2")
  bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert bad.returncode == 1
  assert "full1.nii.gz" in bad.stderr and "non-finite" in bad.stderr
  assert "Traceback" not in bad.stderr
  assert not (tmp_path / "store2").exists()


def test_real_stroke_store(shared_data, tmp_path):
  folder = shared_data / "mri_stroke"
  dl = tmp_path / "list.csv"
  t1, t2 = folder / "stroke_T1.nii.gz", folder / "stroke_T2.nii.gz"
  dl.write_text(f"subject,t1,t2\nstroke,{t1},{t2}\n")
  store_lib.convert(dl, tmp_path / "store", {"t1": "mri", "t2": "mri"})
  store = store_lib.Store(tmp_path / "store")
  raw, _ = nifti.load_volume(folder / "stroke_T2.nii.gz")
  box = ((40, 72), (50, 82), (60, 92))
  t2 = store.preset("stroke", "t2").inverse(store.read("stroke", "t2", box))
  np.testing.assert_allclose(t2, raw[40:72, 50:82, 60:92], rtol=1e-5, atol=1e-3)
  assert store.subjects()[0]["volumes"]["t2"]["stats"]["max"] == pytest.approx(raw.max())


# ----------------------------------------------------------------------------------------------
# MONAI Decathlon JSON datalists.


def _decathlon(folder, obj, name="dataset.json"):
  path = folder / name
  path.write_text(json.dumps(obj))
  return path


def test_decathlon_datalist_splits_ids_and_dataroot(tmp_path):
  obj = {
      "name": "Toy", "labels": {"0": "background", "1": "lesion"}, "numTraining": 4,
      "dataroot": "data",
      "training": [
          {"image": "imagesTr/case_a.nii.gz", "label": "labelsTr/case_a.nii.gz", "fold": 0},
          {"image": "other/case_a.nii.gz", "label": "labelsTr/case_a2.nii.gz", "fold": 1},
          {"label": "labelsTr/z.nii.gz", "image": "imagesTr/z.nii.gz", "id": "case_a-2"},
          {"image": "x/case_a.nii", "label": "y/l.nii"},
      ],
      "validation": [{"image": "imagesTr/v 1+b.nii.gz", "label": "labelsTr/v.nii.gz"}],
      "test": ["imagesTs/case_t.nii.gz", "imagesTs/case_a.NII.GZ", {"image": "/abs/t.nii"}],
  }
  dl = _decathlon(tmp_path, obj)
  subjects = store_lib.read_datalist(dl)
  root = tmp_path / "data"
  assert [(s["subject"], s["split"]) for s in subjects] == [
      ("case_a", "train"), ("case_a-1", "train"), ("case_a-2", "train"),
      ("case_a-3", "train"),  # the explicit id case_a-2 is skipped over
      ("v_1_b", "val"), ("case_t", "test"), ("case_a-4", "test"), ("t", "test")]
  assert subjects[0]["volumes"] == {"image": str(root / "imagesTr" / "case_a.nii.gz"),
                                    "label": str(root / "labelsTr" / "case_a.nii.gz")}
  # Volumes keep the datalist's modality order, whatever the key order of an entry.
  assert list(subjects[2]["volumes"]) == ["image", "label"]
  # Bare-string test entries are the "image"; test subjects lack the label.
  assert subjects[5]["volumes"] == {"image": str(root / "imagesTs" / "case_t.nii.gz")}
  assert subjects[7]["volumes"] == {"image": "/abs/t.nii"}
  # The dataroot argument wins over the JSON's; without either, the JSON's folder.
  other = tmp_path / "elsewhere"
  assert store_lib.read_datalist(dl, dataroot=other)[0]["volumes"]["image"] == str(
      other / "imagesTr" / "case_a.nii.gz")
  del obj["dataroot"]
  obj["testing"] = obj.pop("test")  # MONAI's spelling
  subjects = store_lib.read_datalist(_decathlon(tmp_path, obj, "plain.json"))
  assert subjects[0]["volumes"]["label"] == str(tmp_path / "labelsTr" / "case_a.nii.gz")
  assert [s["split"] for s in subjects][-3:] == ["test"] * 3
  # Multi-modal entries: one modality per key; a given "subject" is kept.
  subjects = store_lib.read_datalist(_decathlon(tmp_path, {"training": [
      {"subject": "p1", "t1": "p1_t1.nii.gz", "t2": "p1_t2.nii.gz"}]}, "mm.json"))
  assert subjects == [{"subject": "p1", "split": "train", "volumes": {
      "t1": str(tmp_path / "p1_t1.nii.gz"), "t2": str(tmp_path / "p1_t2.nii.gz")}}]


def test_test_subjects_may_lack_modalities_in_csv(tmp_path):
  dl = tmp_path / "list.csv"
  dl.write_text("subject,split,mr,target\na,train,a.nii,at.nii\nb,test,b.nii,\n")
  subjects = store_lib.read_datalist(dl)
  assert subjects[1]["volumes"] == {"mr": str(tmp_path / "b.nii")}
  dl.write_text("subject,split,mr,target\na,train,a.nii,at.nii\nb,val,b.nii,\n")
  with pytest.raises(VolumeError, match="list.csv.*'b' has no file for modality 'target'"):
    store_lib.read_datalist(dl)
  # A test subject listed first does not decide the store's modalities.
  for name in ("a", "at", "b"):
    _save(tmp_path / f"{name}.nii", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
  dl.write_text("subject,split,mr,target\nb,test,b.nii,\na,train,a.nii,at.nii\n")
  manifest = store_lib.convert(dl, tmp_path / "store", {"mr": "ct", "target": "ct"})
  assert manifest["modalities"] == ["mr", "target"]
  assert [list(s["volumes"]) for s in manifest["subjects"]] == [["mr"], ["mr", "target"]]
  # A target fitted on its own volume needs no preset where it is missing.
  manifest = store_lib.convert(dl, tmp_path / "store", {"mr": "ct", "target": {
      "kind": "mri", "fit": "volume"}}, overwrite=True)
  preset = manifest["subjects"][1]["volumes"]["target"]["preset"]
  # The default 0.5 / 99.5 percentiles of the non-zero voxels 1..23.
  assert [preset["lo"], preset["hi"]] == pytest.approx([1.11, 22.89], rel=1e-6)


@pytest.mark.parametrize("obj,match", [
    ({"name": "x", "numTraining": 0}, "Decathlon lists"),
    ({"training": {"image": "a.nii"}}, "\"training\" must be a list"),
    ({"training": [{"image": "a.nii"}, 3]}, "\"training\" entry 1 must be an object"),
    ({"training": [], "test": []}, "empty"),
    ({"training": [{"image": ["a.nii", "b.nii"]}]}, "list of files"),
    ({"training": [{"image": "a.nii", "label": "al.nii"}], "validation": [{"image": "b.nii"}]},
     "'b' has modalities \\['image'\\], subject 'a' has \\['image', 'label'\\]"),
    ({"training": [{"image": "a.nii"}], "test": [{"image": "b.nii", "extra": "c.nii"}]},
     "test subject 'b' has modalities \\['extra'\\]"),
    ({"training": [{"image": "a.nii", "split": "val"}]}, "split 'val'"),
    ({"dataroot": 3, "training": ["a.nii"]}, "dataroot"),
    ({"training": [{"image": "a.nii", "id": "s"}, {"image": "b.nii", "id": "s"}]}, "twice"),
])
def test_malformed_decathlon_names_the_file(tmp_path, obj, match):
  with pytest.raises(VolumeError, match=f"bad.json.*{match}"):
    store_lib.read_datalist(_decathlon(tmp_path, obj, "bad.json"))


def test_decathlon_converts_test_subjects_without_label(tmp_path):
  """Test subjects without the target convert; fit=train scales come from train subjects only."""
  rng = np.random.default_rng(1)
  shape = (6, 5, 4)
  (tmp_path / "imagesTr").mkdir()
  (tmp_path / "imagesTs").mkdir()
  raw = {}

  def pair(name, scale, label=True):
    full = rng.gamma(2.0, scale, size=shape).astype(np.float32)
    image = tmp_path / ("imagesTr" if label else "imagesTs") / f"{name}.nii.gz"
    _save(image, rng.poisson(full).astype(np.float32))
    raw[name] = nifti.load_volume(image)[0]  # RAS, as the store holds it
    if label:
      _save(tmp_path / "imagesTr" / f"{name}_label.nii.gz", full)
      raw[name + "_label"] = nifti.load_volume(tmp_path / "imagesTr" / f"{name}_label.nii.gz")[0]
      return {"image": f"imagesTr/{name}.nii.gz", "label": f"imagesTr/{name}_label.nii.gz"}
    return f"imagesTs/{name}.nii.gz"

  obj = {"training": [pair("tr0", 3.0), pair("tr1", 4.0)],
         "validation": [pair("va0", 50.0)],  # a scale far from the training split's
         "test": [pair("te0", 3.0, label=False), pair("te1", 60.0, label=False)]}
  dl = _decathlon(tmp_path, obj)
  presets = {"image": {"kind": "pet", "ref": "label"}, "label": "pet"}
  manifest = store_lib.convert(dl, tmp_path / "store", presets)
  assert manifest["modalities"] == ["image", "label"]
  store = store_lib.Store(tmp_path / "store")
  assert [s["id"] for s in store.subjects("test")] == ["te0", "te1"]
  hi = float(np.median([np.percentile(raw[f"tr{i}_label"], 99.9) for i in range(2)]))
  for sid in ("tr0", "va0", "te0", "te1"):
    preset = store.preset(sid, "image")
    assert (preset.name, preset.lo) == ("pet", 0.0) and preset.hi == pytest.approx(hi, rel=1e-6)
    np.testing.assert_allclose(store.preset(sid, "image").inverse(store.read(sid, "image")),
                               raw[sid], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(store.read("va0", "label"), raw["va0_label"] * 2 / hi - 1,
                             rtol=1e-5, atol=1e-5)
  for sid in ("te0", "te1"):
    assert list(store.subjects("test")[int(sid[-1])]["volumes"]) == ["image"]
    assert sorted(os.listdir(tmp_path / "store" / "volumes" / sid)) == ["image.zarr"]
    for read in (store.read, store.preset, store.geometry):
      with pytest.raises(KeyError, match=f"{sid}' has no modality 'label'"):
        read(sid, "label")
  # A target scale fitted on each volume itself cannot be had for a test subject without it.
  with pytest.raises(VolumeError, match="te0.nii.gz.*no 'label' volume"):
    store_lib.convert(dl, tmp_path / "store2",
                      {"image": {"kind": "pet", "ref": "label"},
                       "label": {"kind": "pet", "fit": "volume"}})
  assert not (tmp_path / "store2").exists()


def test_complex_voxels_refused_by_convert(tmp_path):
  rows = _subjects(tmp_path, n=2, shape=(6, 5, 4))
  rows[1]["pet_low"] = _save(tmp_path / "cplx.nii.gz", np.ones((6, 5, 4), np.complex64))
  dl = _csv(tmp_path / "list.csv", rows)
  with pytest.raises(VolumeError, match=r"cplx\.nii\.gz.*complex64.*not real"):
    store_lib.convert(dl, tmp_path / "store", PRESETS)
  assert not (tmp_path / "store").exists()


def test_store_is_group_readable_under_the_usual_umask(tmp_path):
  import stat  # pylint: disable=g-import-not-at-top
  old = os.umask(0o022)
  try:
    dl = _csv(tmp_path / "list.csv", _subjects(tmp_path, n=2))
    store_lib.convert(dl, tmp_path / "store", PRESETS)
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "store" / "manifest.json").st_mode) == 0o644
  vol = tmp_path / "store" / "volumes" / "s0" / "mr.zarr"
  assert stat.S_IMODE(os.stat(vol).st_mode) == 0o755
