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
