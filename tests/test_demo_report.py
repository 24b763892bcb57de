"""tools/demo.py's verdict: PPDM must beat the input, every tuned classical reference and the
floor, or the demo says which it missed and exits 1."""

from conftest import ROOT, load_module

demo = load_module(ROOT / "tools" / "demo.py", "demo_under_test")


def _summary(model_psnr, ssim=None):
  names = {"input": 23.0, "gaussian": 28.3, "bm4d": 29.9, "model": model_psnr, "train_mean": 11.8}
  return {
      "metrics": {"psnr": names, "ssim": {k: 0.6 if k == "model" else 0.5 for k in names} if ssim is None else ssim},
      "n_volumes": 1, "region": {"2": [0.6, 1.0]}, "train_region": {"2": [0.0, 0.6]},
      "checkpoint": "best validation checkpoint (step 800)", "checkpoint_step": 800,
      "train_mean_floor": "metrics[*].train_mean scores ...: mean intensity inside the body",
      "references": {
          "gaussian": {"label": "Gaussian blur", "params": {"sigma": 1.0},
                       "tuned_on": {"split": "train", "subjects": ["sub-00", "sub-01"]}},
          "bm4d": {"label": "BM4D", "params": {"sigma": 1.09, "sigma_over_noise": 2.5},
                   "tuned_on": {"split": "train", "subjects": ["sub-00", "sub-01"]}}}}


def test_demo_fails_unless_ppdm_beats_every_reference(capsys):
  assert demo.report(_summary(29.0), "W") == 1
  out = capsys.readouterr().out
  assert "BM4D (tuned: sigma 1.09)" in out and "Gaussian blur (tuned: sigma 1)" in out
  assert "did NOT beat BM4D" in out and "Gaussian" not in out.split("did NOT beat")[1]
  assert "best validation checkpoint (step 800)" in out
  assert demo.report(_summary(30.5), "W") == 0
  out = capsys.readouterr().out
  assert "beat the low-count input, every tuned classical reference" in out
  assert "not in SSIM" not in out
  # A PSNR win with BM4D still ahead in SSIM passes, and says so.
  ssim = {"input": 0.64, "gaussian": 0.83, "bm4d": 0.88, "model": 0.86, "train_mean": 0.08}
  assert demo.report(_summary(30.5, ssim), "W") == 0
  out = capsys.readouterr().out
  assert "not in SSIM: BM4D (tuned: sigma 1.09) 0.8800 against PPDM's 0.8600" in out
  assert "Gaussian" not in out.split("not in SSIM")[1]
