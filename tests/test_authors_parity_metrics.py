"""PRDiT's generation metrics, output for output: jaxvol.eval.generation against their code.

Fixtures (tests/fixtures/authors/metrics_*.npz, README_metrics.md) hold what Fredy-Zhang/PRDiT's
evaluations/fid.py, mmd.py, ms_ssim.py (MONAI-generative's MultiScaleSSIMMetric) and their 3D
ResNet returned on small fixed inputs; make_metrics.py made them.
"""

import itertools

import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from jaxvol.eval import generation
from jaxvol.models import medicalnet

FIXTURES = ROOT / "tests" / "fixtures" / "authors"
CASES = ("full", "singular", "odd")  # N > F; N < F (singular covariances); odd N


@pytest.fixture(scope="module")
def feats():
  with np.load(FIXTURES / "metrics_features.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def msssim():
  with np.load(FIXTURES / "metrics_msssim.npz") as f:
    out = {k: f[k] for k in f.files}
  out["volumes"] = out["codes"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return out


@pytest.mark.parametrize("case", CASES)
def test_fid_matches_their_sqrtm_route(feats, case):
  real, fake, theirs = feats[f"{case}/real"], feats[f"{case}/fake"], float(feats[f"{case}/fid"])
  assert generation.frechet_distance(real, fake, "sqrtm") == pytest.approx(theirs, rel=1e-10)
  # The eigendecomposition route (protocol "jaxvol") is the same quantity; it only rounds
  # differently where the covariances are singular.
  assert generation.frechet_distance(real, fake, "eigh") == pytest.approx(theirs, rel=1e-7)


@pytest.mark.parametrize("case", CASES)
def test_mmd_matches_their_main(feats, case):
  real, fake = feats[f"{case}/real"], feats[f"{case}/fake"]
  sigma = generation.real_median_bandwidth(real)
  # gamma = 1 / (2 m) with m the lower median of all N^2 real-real squared distances.
  assert 1.0 / (2.0 * sigma**2) == pytest.approx(float(feats[f"{case}/mmd_gamma"]), rel=1e-10)
  mmd2 = generation.mmd_rbf(real, fake, sigma)
  assert mmd2 == pytest.approx(float(feats[f"{case}/mmd2"]), rel=1e-10)
  assert np.sqrt(mmd2) == pytest.approx(float(feats[f"{case}/mmd"]), rel=1e-10)
  assert np.sqrt(mmd2) == pytest.approx(float(feats[f"{case}/mmd_printed"]), rel=1e-6)


def test_bandwidth_details_matter(feats):
  real, fake = feats["singular/real"], feats["singular/fake"]
  sq = ((real[:, None] - real[None]) ** 2).sum(-1)
  theirs = 1.0 / (2.0 * float(feats["singular/mmd_gamma"]))
  assert generation.real_median_bandwidth(real) ** 2 == pytest.approx(theirs, rel=1e-12)
  # np.median would average the two middle values of the even count (+3% here), dropping the
  # diagonal moves the median up (+7%); pooling the generated features (protocol "jaxvol")
  # moves it wherever the generated set lies (-0.03% here, +38% in case "full").
  assert np.median(sq) / theirs - 1.0 > 0.02
  assert np.median(sq[np.triu_indices(len(real), 1)]) / theirs - 1.0 > 0.05
  assert abs(generation.median_bandwidth(real, fake) ** 2 / theirs - 1.0) > 1e-4
  full = feats["full/real"], feats["full/fake"]
  assert generation.median_bandwidth(*full) / generation.real_median_bandwidth(full[0]) > 1.1


def _identity_features(dim):
  """Features stored as (N, 1, 1, F) 'volumes', so generation_report runs on fixed features."""
  return generation.FeatureNetwork("identity", lambda x: x.reshape(x.shape[0], -1),
                                   pretrained=True, dim=dim, batch_size=8)


@pytest.mark.parametrize("case", CASES)
def test_report_on_the_authors_protocol(feats, case):
  real, fake = feats[f"{case}/real"], feats[f"{case}/fake"]
  report = generation.generation_report(real[:, None, None], fake[:, None, None],
                                        _identity_features(real.shape[1]))
  assert report["protocol"] == "authors" and report["feature_input"].startswith("as given")
  # The feature network sees float32, as their CUDA features are; the statistics run in float64.
  assert report["fid"] == pytest.approx(float(feats[f"{case}/fid"]), rel=1e-4)
  assert report["mmd"] == pytest.approx(float(feats[f"{case}/mmd"]), rel=1e-4)
  assert report["mmd_squared"] == pytest.approx(float(feats[f"{case}/mmd2"]), rel=1e-4)
  assert (report["n_real"], report["n_fake"]) == (len(real), len(fake))
  assert report["ms_ssim_diversity"] is None and "48" in report["ms_ssim_note"]


def test_their_ms_ssim_loop_scores_every_ordered_pair(msssim):
  n = len(msssim["volumes"])
  assert sorted(map(tuple, msssim["pairs"])) == list(itertools.permutations(range(n), 2))
  assert (int(msssim["kernel_size"]), float(msssim["data_range"])) == (3, 1.0)
  assert float(msssim["mean"]) == pytest.approx(float(msssim["mean_printed"]), abs=1e-6)


def test_ms_ssim_matches_monai(msssim):
  v, pairs, theirs = msssim["volumes"], msssim["pairs"], msssim["values"]
  assert v.shape[1:] == (48, 52, 60)  # odd sizes at coarser scales: pooling drops a voxel
  ours = generation.monai_ms_ssim(v[pairs[:, 0]], v[pairs[:, 1]])
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  assert np.sum(theirs == 0.0) == 2 and np.all(ours[theirs == 0.0] == 0.0)  # negative -> 0
  mean, count = generation.monai_ms_ssim_diversity(v, batch_size=4)
  assert count == len(v) * (len(v) - 1) // 2
  assert mean == pytest.approx(float(msssim["mean"]), rel=1e-4)


def test_ms_ssim_size_limit_is_monais():
  assert generation.monai_ms_ssim_min_size() == 48
  x = np.zeros((48, 48, 47), np.float32)
  with pytest.raises(ValueError, match=">= 48"):
    generation.monai_ms_ssim(x, x)


@pytest.fixture(scope="module")
def resnet():
  with np.load(FIXTURES / "metrics_resnet.npz") as f:
    fixture = {k: f[k] for k in f.files}
  make = load_module(FIXTURES / "make_metrics.py", "make_metrics_under_test")
  assert int(fixture["recipe_seed"]) == make.RECIPE_SEED
  model = medicalnet.resnet(int(fixture["depth"]), width=64)  # their widths are fixed at 64
  names = medicalnet.to_torch_state_dict(medicalnet.init_variables(model, 0))
  assert sorted(names) == list(fixture["names"])
  state = make.recipe_weights({k: v.shape for k, v in names.items()})
  fixture["variables"] = medicalnet.convert_torch_state_dict(
      {"state_dict": {f"module.{k}": v for k, v in state.items()}})
  return fixture


def test_features_take_volumes_as_they_are(resnet):
  vols, theirs = resnet["volumes"], resnet["features"]
  assert vols.shape == (3, 10, 12, 16)  # not cubic, so a wrong axis order could not match
  net = generation.medicalnet_features(resnet["variables"], batch_size=4)
  assert not net.standardize
  # The jaxvol convention, a per-volume z-score before the network, rides in the same batch.
  zscored = (vols[:1] - vols[:1].mean()) / vols[:1].std()
  ours = net(np.concatenate([vols, zscored]))
  np.testing.assert_allclose(ours[:3], theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
  assert np.abs(ours[3] - theirs[0]).max() > 1e-2 * np.abs(theirs).max()
