"""Every config loads, its smoke variant is small and consistent, and the CLI runs end to end."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxvol import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, variant=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(variant)


def test_expected_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert {"ppdm_pet_denoise", "ppdm_pet_ac", "ppdm_mri_t1_t2", "full3d_mri_t1_t2",
          "wdm_mri_t1_t2", "sparse_ct_denoise", "sparse_mri_sr", "sparse_pet_denoise",
          "prdit_ct_gen"} <= names


def test_prdit_config_variants():
  path = os.path.join(ROOT, "configs", "prdit_ct_gen.py")
  paper = load(path)
  p, t = paper.prdit, paper.train
  assert (paper.method, p.size, p.patch, p.depth, p.stage) == ("prdit", "B", 12, 4, 2)
  assert tuple(paper.data.crop_size) == (128,) * 3
  assert (t.weight_decay, t.grad_clip, t.ema_decay) == (0.0, 1.0, 0.9999)
  assert load(path, "stage1").prdit.stage == 1 and load(path, "xl").prdit.size == "XL"
  assert tuple(load(path, "256").data.crop_size) == (256,) * 3
  assert tuple(load(path, "cpu").data.crop_size) == (64,) * 3
  assert load(path, "stage1,smoke").prdit.stage == 1
  for bad in ("cpu,smoke", "256,cpu", "big"):
    with pytest.raises(ValueError, match="variant"):
      load(path, bad)


def test_sparse_config_variants():
  for task in ("ct_denoise", "mri_sr", "pet_denoise"):
    for variant in (None, "smoke", "cpu"):
      c = load(os.path.join(ROOT, "configs", f"sparse_{task}.py"), variant)
      assert c.method == "sparse" and c.model.stm and c.diffusion.parameterization == "x0"
      assert tuple(c.inference.window) == tuple(c.data.crop_size)
  paper = load(os.path.join(ROOT, "configs", "sparse_ct_denoise.py"))
  assert (paper.model.base_width, tuple(paper.model.channel_mults)) == (64, (1, 1, 2, 2, 4))
  assert tuple(paper.model.attention_levels) == (3,) and paper.train.ema_decay == 0.99
  sr = os.path.join(ROOT, "configs", "sparse_mri_sr.py")
  assert load(sr).data.inputs == ("t1_x2",) and load(sr, "x4,cpu").data.inputs == ("t1_x4",)
  assert load(sr, "x4,smoke").model.base_width <= 16
  for bad in ("x3", "smoke,cpu", "x2,x4"):
    with pytest.raises(ValueError, match="variant"):
      load(sr, bad)


def test_sparse_authors_variant():
  """`authors` sets the authors' sampler and recipe (their network is the default) and keeps
  smoke/cpu sizes."""
  for task in ("ct_denoise", "mri_sr", "pet_denoise"):
    path = os.path.join(ROOT, "configs", f"sparse_{task}.py")
    ours = load(path)
    for variant in ("authors", "authors,cpu", "cpu,authors", "authors,smoke"):
      c = load(path, variant)
      assert (c.model.layout, c.sparse.sampler, c.sparse.levels) == ("authors", "authors", "arange")
      assert (c.train.grad_clip, c.train.warmup_steps, c.compute_dtype) == (0.0, 0, "float32")
      assert (c.data.crops, c.data.flips, c.eval.use_ema) == ("grid", False, False)
      assert c.diffusion.clip_x0 == 1.0 and c.model.stm and c.diffusion.parameterization == "x0"
      method = methods.build(c, "cpu")
      assert method.nfe == 11 and method.net.layout == "authors"  # f_steps 5: 2 f + 1
      assert tuple(c.inference.window) == tuple(c.data.crop_size)
      sized = load(path, variant.replace("authors", "").strip(",") or None)
      if variant != "authors":  # the cpu / smoke network and patch
        assert c.model.base_width == sized.model.base_width <= 16
        assert tuple(c.data.crop_size) == tuple(sized.data.crop_size)
    paper = load(path, "authors")
    assert (paper.model.base_width, paper.model.groups, paper.data.batch_size) == (64, 32, 8)
    crop = (96,) * 3 if task == "pet_denoise" else tuple(ours.data.crop_size)
    assert tuple(paper.data.crop_size) == crop
    # The default uses the authors' network (it measured better) with jaxvol's sampler.
    assert methods.build(ours, "cpu").nfe == 9 and ours.model.layout == "authors"
    assert (ours.data.crops, ours.sparse.sampler) == ("random", "jaxvol")
  assert load(os.path.join(ROOT, "configs", "sparse_mri_sr.py"), "x4,authors,cpu").data.inputs == (
      "t1_x4",)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_and_smoke_variant(path):
  full, smoke = load(path), load(path, "smoke")
  for c in (full, smoke):
    method = methods.build(c, "cpu")
    mult = method.spatial_multiple()
    assert all(s % m == 0 for s, m in zip(c.data.crop_size, mult)), (c.data.crop_size, mult)
    assert c.data.target
    # Priors and generators are unconditional.
    assert c.data.inputs or os.path.basename(path).startswith(("patch_prior", "pnp_", "prdit_"))
  if smoke.method == "prdit":
    assert 0 < smoke.prdit.width <= 32 and 0 < smoke.prdit.local_width <= 32
  else:
    assert smoke.model.base_width <= 16
  assert max(smoke.data.crop_size) <= 32
  assert "python -m jaxvol.main" in open(path).read()  # launch command in the docstring
  with pytest.raises(ValueError, match="variant"):
    load(path, "no-such-variant")


def test_cli_train_evaluate_sample(tmp_path):
  """The documented command line: train (2 steps), evaluate and sample a smoke config."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # One subject, as in the stroke task: the config trains on one half of x and evaluates the other.
  t1 = rng.uniform(0, 100, (32, 16, 16)).astype(np.float32)
  nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "t1.nii.gz")
  nib.save(nib.Nifti1Image(100 - t1, np.eye(4)), tmp_path / "t2.nii.gz")
  (tmp_path / "list.csv").write_text("subject,split,t1,t2\ns0,train,t1.nii.gz,t2.nii.gz\n")
  store_lib.convert(tmp_path / "list.csv", tmp_path / "store", {"t1": "mri", "t2": "mri"})
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
      os.environ.get("TMPDIR", "/tmp"), f"jaxvol-test-cache-{os.getuid()}"))
  base = [sys.executable, "-m", "jaxvol.main", "--config=configs/ppdm_mri_t1_t2.py:smoke",
          f"--workdir={tmp_path / 'run'}", f"--config.data.store={tmp_path / 'store'}",
          "--config.train.steps=2", "--config.mesh.data=1"]
  for mode in ("train", "evaluate", "sample"):
    r = subprocess.run(base + [f"--mode={mode}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  summary = json.load(open(tmp_path / "run" / "eval" / "summary.json"))
  # T1 is not a T2 prediction: no input row; the floor that ignores the input is there (a
  # region split of one subject: the training region's mean intensity).
  assert set(summary["metrics"]["psnr"]) == {"model", "train_mean"}
  assert "mean intensity of 1 training target(s)" in summary["train_mean_floor"]
  pred = nib.load(tmp_path / "run" / "eval" / "nifti" / "s0_pred.nii.gz")
  assert pred.shape == (32, 16, 16) and np.allclose(pred.affine, np.eye(4))  # the input's grid
  data = pred.get_fdata()
  assert np.ptp(data[16:]) > 0 and np.ptp(data[:16]) == 0  # predicted half; background elsewhere
  assert os.path.exists(tmp_path / "run" / "samples" / "nifti" / "s0_pred.nii.gz")
  r = subprocess.run([sys.executable, "-m", "jaxvol.main", "--config=configs/ppdm_mri_t1_t2.py:smoke",
                      f"--workdir={tmp_path / 'run2'}"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode != 0 and "config.data.store" in (r.stdout + r.stderr)
