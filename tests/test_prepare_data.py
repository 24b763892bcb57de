"""tools/prepare_data.py on the shared real volumes, and experiments/quality.py's pure helpers."""

import csv
import json

import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from jaxvol.data import nifti
from jaxvol.data import presets as presets_lib
from jaxvol.data import store as store_lib
from jaxvol.data import tasks
from jaxvol.eval import metrics as metrics_lib

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow


_load = load_module


prepare_data = _load(ROOT / "tools" / "prepare_data.py", "prepare_data_under_test")
quality = _load(ROOT / "experiments" / "quality.py", "quality_under_test")


def _raw(store, sid, modality):
  return store.preset(sid, modality).inverse(store.read(sid, modality))


def _datalist(folder):
  with open(folder / "datalist.csv", newline="") as f:
    return list(csv.DictReader(f))


def test_mri_t1_t2(shared_data, tmp_path, capsys):
  assert prepare_data.main(["--task", "mri_t1_t2", "--out", str(tmp_path),
                            "--source", str(shared_data)]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed[-1] == str(tmp_path / "store")
  store = store_lib.Store(printed[-1])
  assert store.modalities == ["t1", "t2"]
  assert [(s["id"], s["split"]) for s in store.subjects()] == [("stroke", "train")]
  # Presets fitted on the training hemisphere only (RAS x < 62 of 124), as explicit lo/hi.
  for m in ("t1", "t2"):
    raw, _ = nifti.load_volume(shared_data / "mri_stroke" / f"stroke_{m.upper()}.nii.gz")
    want = presets_lib.fit_preset("mri", raw[:62])
    assert store.manifest["presets"][m] == {"kind": "mri", "lo": pytest.approx(want.lo),
                                            "hi": pytest.approx(want.hi)}
    assert want != presets_lib.fit_preset("mri", raw)  # the whole volume would give another scale
  assert store.read("stroke", "t1").shape == store.read("stroke", "t2").shape == (124, 160, 140)
  # A second run refuses to replace the store; --overwrite rebuilds it.
  assert prepare_data.main(["--task", "mri_t1_t2", "--out", str(tmp_path),
                            "--source", str(shared_data)]) == 1
  assert "--overwrite" in capsys.readouterr().err
  assert prepare_data.main(["--task", "mri_t1_t2", "--out", str(tmp_path),
                            "--source", str(shared_data), "--overwrite"]) == 0


def test_pet_denoise(shared_data, tmp_path):
  path = prepare_data.prepare("pet_denoise", tmp_path, source=shared_data, realisations=1)
  store = store_lib.Store(path)
  assert store.modalities == ["pet_low", "pet_full"]
  assert store.manifest["presets"]["pet_full"] == {"kind": "pet", "ref": "pet_low"}
  # The low-count scale: the median over training subjects of their training region's (RAS z in
  # [0, 0.6)) 99.9th percentile, as explicit numbers: no test voxel sets it.
  his = []
  for sid in ("pet_tmpl_0", "pet_t1_0"):
    raw = _raw(store, sid, "pet_low")
    his.append(np.percentile(raw[:, :, :int(round(0.6 * raw.shape[2]))], 99.9))
  assert store.manifest["presets"]["pet_low"] == {"kind": "pet", "lo": 0.0,
                                                  "hi": pytest.approx(np.median(his), rel=1e-4)}
  splits = {s["id"]: s["split"] for s in store.subjects()}
  assert splits == {"pet_tmpl_0": "train", "pet_tmpl_val": "val", "pet_tmpl_test": "test",
                    "pet_t1_0": "train", "pet_t1_val": "val", "pet_t1_test": "test"}
  assert [r["subject"] for r in _datalist(tmp_path)] == list(splits)
  assert store.shape("pet_t1_0") == (62, 80, 70)  # the 1 mm stroke grid pooled to 2 mm
  for sid in splits:
    low, full = _raw(store, sid, "pet_low"), _raw(store, sid, "pet_full")
    assert low.shape == full.shape == store.shape(sid)
    assert store.preset(sid, "pet_low") == store.preset(sid, "pet_full")  # one shared scale
    # Same expectation (the activity) at a tenth of the counts: similar means.
    mask = metrics_lib.body_mask(full)
    assert abs(low[mask].mean() / full[mask].mean() - 1.0) < 0.05
  for anatomy in ("tmpl", "t1"):
    # Train and test realisations of one anatomy differ by their noise only, so their difference
    # measures it: Poisson variance scales with 1 / dose, about 10x more for the low-count image.
    noise_var = {}
    for modality in ("pet_low", "pet_full"):
      a = _raw(store, f"pet_{anatomy}_0", modality)
      b = _raw(store, f"pet_{anatomy}_test", modality)
      assert not np.array_equal(a, b)
      noise_var[modality] = float(np.var(a - b))
    assert noise_var["pet_low"] > 5.0 * noise_var["pet_full"], (anatomy, noise_var)


def test_simulated_t1_pet_grey_matter_hotter_than_white_matter():
  rng = np.random.default_rng(0)
  t1 = np.zeros((40, 40, 40), np.float32)
  t1[8:32, 8:32, 8:32] = 200.0  # white matter (brightest in T1)
  t1[8:32, 8:32, 8:14] = 120.0  # a grey-matter slab
  t1[8:32, 8:32, 8:10] = 40.0   # CSF (darkest)
  t1 += rng.normal(0, 1, t1.shape).astype(np.float32) * (t1 > 0)
  act = prepare_data.simulate_t1_pet(t1, (1.0, 1.0, 1.0), quantiles=(0.05, 0.2), pool=2)
  assert act.shape == (20, 20, 20) and act.min() >= 0
  assert act[10, 10, 5] > 2.0 * act[10, 10, 12]  # GM slab vs WM core
  assert act[1, 1, 1] < 1e-3  # outside the brain


def test_pet_ac(shared_data, tmp_path):
  path = prepare_data.prepare("pet_ac", tmp_path, source=shared_data, realisations=1)
  store = store_lib.Store(path)
  # The names configs/ppdm_pet_ac.py reads.
  config = _load(ROOT / "configs" / "ppdm_pet_ac.py", "pet_ac_config").get_config()
  assert store.modalities == list(config.data.inputs) + [config.data.target]
  assert set(store.manifest["presets"]) == {"pet_nac_low", "pet_ac"}
  for m, spec in store.manifest["presets"].items():  # fixed scales, fitted on training data
    assert set(spec) == {"kind", "lo", "hi"} and spec["lo"] == 0.0, (m, spec)
  assert {s["id"]: s["split"] for s in store.subjects()} == {"pet_ac_0": "train",
                                                             "pet_ac_val": "val",
                                                             "pet_ac_test": "test"}
  for sid in ("pet_ac_0", "pet_ac_test"):
    nac, ac = _raw(store, sid, "pet_nac_low"), _raw(store, sid, "pet_ac")
    assert nac.shape == ac.shape == (91, 109, 91)
    head = metrics_lib.body_mask(ac)
    assert nac[head].mean() < 0.6 * ac[head].mean()  # attenuation removes counts
    centre = tuple(slice(s // 2 - 5, s // 2 + 5) for s in ac.shape)
    assert nac[centre].mean() < ac[centre].mean()


def test_ct_denoise(shared_data, tmp_path, capsys):
  assert prepare_data.main(["--task", "ct_denoise", "--out", str(tmp_path), "--source",
                            str(shared_data), "--realisations", "1", "--dose", "0.1"]) == 0
  printed = capsys.readouterr().out
  assert "RAS z in [0, 0.6)" in printed and "[0.6, 1]" in printed
  store = store_lib.Store(tmp_path / "store")
  assert store.modalities == ["ct_low", "ct"]
  window = {"kind": "ct", "lo": -1000.0, "hi": 1000.0}
  assert store.manifest["presets"] == {"ct_low": window, "ct": dict(window, ref="ct_low")}
  splits = {s["id"]: s["split"] for s in store.subjects()}
  assert splits == {"ct_abdomen_0": "train", "ct_abdomen_val": "val", "ct_abdomen_test": "test"}
  hu, geom = nifti.load_volume(shared_data / "ct_abdomen" / "example_ct.nii.gz")
  low = {}
  for sid in splits:
    assert store.shape(sid) == (122, 101, 112)
    for modality in store.modalities:
      np.testing.assert_allclose(nifti.ras_affine(store.geometry(sid, modality)),
                                 nifti.ras_affine(geom), atol=1e-4)
    assert store.preset(sid, "ct_low") == store.preset(sid, "ct")  # one HU window for both
    ct = _raw(store, sid, "ct")
    np.testing.assert_allclose(ct, np.clip(hu, -1000, 1000), atol=0.05)  # the source, in HU
    low[sid] = _raw(store, sid, "ct_low")
    body = metrics_lib.body_mask(ct)
    err = low[sid][body] - ct[body]
    # Clearly visible noise (~33 HU at dose 0.1, ramp kernel), unbiased up to the log bias of
    # starved rays.
    assert 25.0 < err.std() < 45.0, err.std()
    assert abs(err.mean()) < 6.0, err.mean()
  # The two realisations differ by independent noise only.
  diff = low["ct_abdomen_0"] - low["ct_abdomen_test"]
  assert 25.0 * np.sqrt(2) < diff[metrics_lib.body_mask(hu)].std()


def test_ct_gen(shared_data, tmp_path, capsys):
  assert prepare_data.main(["--task", "ct_gen", "--out", str(tmp_path), "--source",
                            str(shared_data)]) == 0
  printed = capsys.readouterr().out
  assert "one volume" in printed and "mechanics" in printed
  store = store_lib.Store(tmp_path / "store")
  assert store.modalities == ["ct"]
  assert store.manifest["presets"] == {"ct": {"kind": "ct", "lo": -1000.0, "hi": 1000.0}}
  assert [(s["id"], s["split"]) for s in store.subjects()] == [("ct_abdomen", "train")]
  hu, _ = nifti.load_volume(shared_data / "ct_abdomen" / "example_ct.nii.gz")
  assert store.shape("ct_abdomen") == (122, 101, 112)
  np.testing.assert_allclose(_raw(store, "ct_abdomen", "ct"), np.clip(hu, -1000, 1000), atol=0.05)


def test_mri_sr(shared_data, tmp_path, capsys):
  assert prepare_data.main(["--task", "mri_sr", "--out", str(tmp_path),
                            "--source", str(shared_data)]) == 0
  assert "hemisphere" in capsys.readouterr().out
  store = store_lib.Store(tmp_path / "store")
  assert store.modalities == ["t1_x2", "t1_x4", "t1"]
  # One fixed scale for inputs and target, fitted on the target's training hemisphere.
  want = presets_lib.fit_preset("mri", nifti.load_volume(
      shared_data / "mri_stroke" / "stroke_T1.nii.gz")[0][:62])
  fixed = {"kind": "mri", "lo": pytest.approx(want.lo), "hi": pytest.approx(want.hi)}
  assert store.manifest["presets"] == {"t1_x2": fixed, "t1_x4": fixed, "t1": fixed}
  assert [(s["id"], s["split"]) for s in store.subjects()] == [("stroke", "train")]
  t1_src, geom = nifti.load_volume(shared_data / "mri_stroke" / "stroke_T1.nii.gz")
  assert store.shape("stroke") == (124, 160, 140)
  for modality in store.modalities:
    np.testing.assert_allclose(nifti.ras_affine(store.geometry("stroke", modality)),
                               nifti.ras_affine(geom), atol=1e-4)
    assert store.preset("stroke", modality) == store.preset("stroke", "t1")  # the target's scale
  t1 = _raw(store, "stroke", "t1")
  np.testing.assert_allclose(t1, t1_src, atol=1e-3)
  brain = t1_src > 0
  errors = {}
  for f in (2, 4):
    x = _raw(store, "stroke", f"t1_x{f}")
    errors[f] = float(np.sqrt(np.mean((x - t1)[brain] ** 2)))
    assert x.mean() == pytest.approx(t1.mean(), rel=0.01)
    # Blurred through-plane (RAS z) only: detail along z drops far more than along x.
    loss_z = np.mean(np.diff(x, axis=2) ** 2) / np.mean(np.diff(t1, axis=2) ** 2)
    loss_x = np.mean(np.diff(x, axis=0) ** 2) / np.mean(np.diff(t1, axis=0) ** 2)
    assert loss_z < 0.6 and loss_z < loss_x - 0.2, (f, loss_z, loss_x)
  assert 0 < errors[2] < errors[4]


def test_missing_source_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="--source"):
    prepare_data.prepare("pet_denoise", tmp_path / "out", source=tmp_path / "absent")
  assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="task"):
    prepare_data.prepare("ct", tmp_path)
  with pytest.raises(ValueError, match="dose"):
    prepare_data.prepare("pet_denoise", tmp_path, dose=1.5)
  with pytest.raises(ValueError, match="dose"):
    prepare_data.prepare("ct_denoise", tmp_path, dose=0.0)
  assert not (tmp_path / "store").exists()


# ---- experiments/quality.py helpers (no training here).


def _rec(task, method, factor, psnr, **kw):
  rec = {"task": task, "method": method, "factor": factor, "psnr": psnr, "ssim": 0.5,
         "train_step_s": 0.1, "sample_s": 1.0, "steps": 10, "split": "s", "input_psnr": None,
         "input_ssim": None}
  rec.update(kw)
  return rec


def test_quality_table_and_targets():
  records = [
      _rec("pet_denoise", "full3d", 1, 30.0, input_psnr=21.0, input_ssim=0.4),
      _rec("pet_denoise", "ppdm", 2, 29.7, input_psnr=21.0, input_ssim=0.4),
      _rec("pet_denoise", "wdm", 2, 29.9, train_step_s=None),
      _rec("mri_t1_t2", "ppdm", 4, 20.0, train_mean_psnr=12.5, train_mean_ssim=0.25),
  ]
  md = quality.table(records)
  lines = md.splitlines()
  assert lines[0].startswith("| task | method | PSNR")
  assert "| pet_denoise | input (no model) | 21.00 | 0.4000 |" in md
  assert "| pet_denoise | ppdm r=2 | 29.70 |" in md
  assert "| mri_t1_t2 | ppdm r=4 | 20.00 |" in md
  assert "| pet_denoise | wdm | 29.90 | 0.5000 | - |" in md
  # MRI: the T1 input is not a T2 prediction; the floor that ignores the input is listed.
  assert "| mri_t1_t2 | input (no model) | not comparable |" in md
  assert "| mri_t1_t2 | training-target mean (ignores the input) | 12.50 | 0.2500 |" in md
  assert len(lines) == 2 + 2 + 1 + len(records)
  verdicts = quality.targets(records)
  assert any("full3d" in v and "-0.30 dB" in v and v.endswith("MET") and "NOT" not in v
             for v in verdicts)
  assert any("wdm" in v and "NOT MET" in v for v in verdicts)
  assert not any(v.startswith("mri_t1_t2") for v in verdicts)  # no ppdm r=2 there


def test_quality_records_upsert_and_atomic_json(tmp_path):
  path = tmp_path / "quality.json"
  records = quality.upsert([], _rec("mri_t1_t2", "ppdm", 2, 20.0))
  records = quality.upsert(records, _rec("mri_t1_t2", "ppdm", 4, 19.0))
  records = quality.upsert(records, _rec("mri_t1_t2", "ppdm", 2, 21.0))
  quality.write_json_atomic(path, records)
  loaded = json.loads(path.read_text())
  assert [(r["factor"], r["psnr"]) for r in loaded] == [(4, 19.0), (2, 21.0)]
  assert quality.find(loaded, "mri_t1_t2", "ppdm", 2)["psnr"] == 21.0
  assert quality.find(loaded, "mri_t1_t2", "full3d", 1) is None
  assert [p.name for p in tmp_path.iterdir()] == ["quality.json"]  # no temporary file left


def test_quality_step_time_and_eval_region():
  points = [(100.0, 10), (102.0, 20), (103.0, 30), (106.0, 40)]
  assert quality.median_step_seconds(points) == pytest.approx(0.2)  # of 0.2, 0.1, 0.3
  assert quality.median_step_seconds(points[:1]) is None
  assert quality.eval_region({"0": (0.5, 1.0)}, 1.0) == {"0": (0.5, 1.0)}
  assert quality.eval_region({"0": (0.5, 1.0)}, 0.5) == {
      "0": (0.5, 1.0), "1": (0.25, 0.75), "2": (0.25, 0.75)}
  assert quality.eval_region(None, 0.4) == {a: pytest.approx((0.3, 0.7)) for a in "012"}


def test_quality_configs_share_one_budget(tmp_path):
  args = quality.parse_args(["--out", str(tmp_path), "--steps", "7", "--crop", "16",
                             "--width", "8"])
  for task in quality.TASKS:
    configs = {name: quality.make_config(task, name, "STORE", args) for name in quality.METHODS}
    for name, c in configs.items():
      method, factor = quality.METHODS[name]
      assert c.method == method and c.data.store == "STORE"
      assert c.train.steps == 7 and tuple(c.data.crop_size) == (16, 16, 16)
      assert c.model.base_width == 8 and tuple(c.model.channel_mults) == (1, 2, 4)
      if method == "ppdm":
        assert tuple(c.ppdm.factor) == (factor,) * 3
    nets = {json.dumps(c.model.to_dict(), sort_keys=True) for c in configs.values()}
    assert len(nets) == 1
    c = configs["full3d"]
    if task == "mri_t1_t2":
      assert dict(c.data.train_region) == {"0": (0.0, 0.5)}
      assert c.data.eval_region["0"] == (0.6, 1.0) and c.eval.input_baseline is False
      assert c.eval.val_split == "train" and dict(c.eval.val_region) == {"0": (0.5, 0.6)}
    else:
      assert c.data.inputs == ("pet_low",) and c.data.target == "pet_full"
      assert c.eval.input_baseline is True
      # The configs' `heldout` split: the region prepare_data fits the scales on trains.
      assert dict(c.data.train_region) == dict(tasks.get("pet_denoise").train_region)
      assert c.data.eval_region["2"] == (0.6, 1.0) and c.eval.split == "test"


def test_quality_windows_are_the_librarys(tmp_path):
  args = quality.parse_args(["--out", str(tmp_path), "--window-overlap", "0.25",
                             "--window-batch", "3"])
  c = quality.make_config("mri_t1_t2", "ppdm2", "STORE", args)
  assert tuple(c.inference.window) == ()  # the whole-box evaluation
  w = quality.windowed_config(c, args)
  assert tuple(w.inference.window) == (16, 16, 16) and w.inference.overlap == 0.25
  assert w.inference.batch == 3 and tuple(c.inference.window) == ()  # a copy
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  window = methods.build(w).sliding_window()
  assert window.window == (16, 16, 16) and window.batch == 3
  progress = [{"step": 1, "seconds": 0.5}, {"step": 10, "seconds": 2.3},
              {"step": 20, "seconds": 3.3}, {"step": 30, "seconds": 5.3}]
  assert quality.median_step_seconds(quality.progress_points(progress)) == pytest.approx(0.2)

