"""experiments/mri_diagnosis.py: the error bands and the white-matter profile against naive
computations, and a directory without runs refused (no training: the experiment reads trained
runs; rebuilding a run's config from its record is learned_vs_classical's, tested there)."""

import numpy as np

from conftest import ROOT, load_module

diag = load_module(ROOT / "experiments" / "mri_diagnosis.py", "mri_diagnosis_under_test")


def test_band_errors_match_a_naive_loop():
  rng = np.random.default_rng(0)
  target = rng.uniform(0, 300, (6, 7, 8)).astype(np.float32)
  mask = rng.uniform(size=target.shape) > 0.3
  pred = target + rng.normal(5, 10, target.shape).astype(np.float32)
  rows = diag.band_errors({"a": pred}, target, mask)
  t, d = target[mask], (pred - target)[mask]
  cuts = np.percentile(t, [100 / 3, 200 / 3])
  bands = [t < cuts[0], (t >= cuts[0]) & (t < cuts[1]), t >= cuts[1]]
  assert sum(r["voxels"] for r in rows) == mask.sum()
  for row, sel in zip(rows, bands):
    assert row["voxels"] == sel.sum()
    np.testing.assert_allclose(row["a_bias"], d[sel].mean(), rtol=1e-5)
    np.testing.assert_allclose(row["a_rmse"], np.sqrt((d[sel] ** 2).mean()), rtol=1e-5)
  # A prediction biased by +20 everywhere shows +20 in every band.
  shifted = diag.band_errors({"b": target + 20}, target, mask)
  assert all(abs(r["b_bias"] - 20) < 1e-3 and abs(r["b_rmse"] - 20) < 1e-3 for r in shifted)


def test_white_matter_profile_follows_a_gradient_in_t2_alone():
  rng = np.random.default_rng(1)
  shape = (36, 16, 16)
  t1 = np.zeros(shape, np.float32)
  t1[:, 2:14, 2:14] = rng.uniform(50, 200, (36, 12, 12))
  ramp = np.linspace(120, 60, shape[0])[:, None, None]
  t2 = np.where(t1 > 0, ramp, 0).astype(np.float32)
  prof = diag.white_matter_profile(t1, t2, slab=12)
  assert [p["x"] for p in prof] == [[0, 12], [12, 24], [24, 36]]
  t2s = [p["t2_median"] for p in prof]
  assert t2s[0] > t2s[1] > t2s[2]
  wm = (t1 > np.percentile(t1[t1 > 0], 70)) & (t1 < np.percentile(t1[t1 > 0], 95))
  np.testing.assert_allclose(t2s[0], np.median(t2[:12][wm[:12]]), rtol=1e-6)


def test_a_directory_without_runs_is_refused_by_name(tmp_path):
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit, match="no learned_vs_classical.json"):
    diag.main(["--lvc", str(tmp_path)])
  assert not (tmp_path / "mri_diagnosis").exists()  # nothing written
