"""Every config loads, its smoke variant is small and consistent, and the CLI runs end to end."""

import ast
import glob
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from jaxvol import config as base
from jaxvol import methods
from jaxvol import prepare
from jaxvol.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The config modules themselves (configs/*.py re-export them for the path form).
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "jaxvol", "configs", "[!_]*.py")))


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


@pytest.mark.slow
def test_cli_train_evaluate_sample(tmp_path):
  """The documented command line: train (2 steps), evaluate and sample a smoke config."""
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # One subject, as in the stroke task: `heldout` trains on one half of x and evaluates the other.
  t1 = rng.uniform(0, 100, (32, 16, 16)).astype(np.float32)
  nib.save(nib.Nifti1Image(t1, np.eye(4)), tmp_path / "t1.nii.gz")
  nib.save(nib.Nifti1Image(100 - t1, np.eye(4)), tmp_path / "t2.nii.gz")
  (tmp_path / "list.csv").write_text("subject,split,t1,t2\ns0,train,t1.nii.gz,t2.nii.gz\n")
  store_lib.convert(tmp_path / "list.csv", tmp_path / "store", {"t1": "mri", "t2": "mri"})
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(
      os.environ.get("TMPDIR", "/tmp"), f"jaxvol-test-cache-{os.getuid()}"))
  base = [sys.executable, "-m", "jaxvol.main",
          "--config=configs/ppdm_mri_t1_t2.py:smoke,heldout",
          f"--workdir={tmp_path / 'run'}", f"--config.data.store={tmp_path / 'store'}",
          "--config.train.steps=2", "--config.mesh.data=1"]
  for mode in ("train", "evaluate", "sample"):
    r = subprocess.run(base + [f"--mode={mode}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  summary = json.load(open(tmp_path / "run" / "eval" / "summary.json"))
  # T1 is not a T2 prediction: no input row; the floor that ignores the input is there (a
  # region split of one subject: the training region's mean intensity).
  assert set(summary["metrics"]["psnr"]) == {"model", "train_mean", "lut"}
  assert "mean intensity inside the body of 1 training target(s)" in summary["train_mean_floor"]
  pred = nib.load(tmp_path / "run" / "eval" / "nifti" / "s0_pred.nii.gz")
  assert pred.shape == (32, 16, 16) and np.allclose(pred.affine, np.eye(4))  # the input's grid
  data = pred.get_fdata()
  assert np.ptp(data[16:]) > 0 and np.ptp(data[:16]) == 0  # predicted half; background elsewhere
  assert os.path.exists(tmp_path / "run" / "samples" / "nifti" / "s0_pred.nii.gz")
  r = subprocess.run([sys.executable, "-m", "jaxvol.main", "--config=configs/ppdm_mri_t1_t2.py:smoke",
                      f"--workdir={tmp_path / 'run2'}"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode != 0 and "config.data.store" in (r.stdout + r.stderr)


# Every config with a region split, and the task of tools/prepare_data.py whose store its
# `heldout` token is for (the patch prior and the reconstructions use the stroke T1 of mri_t1_t2).
SPLIT_TASKS = {
    "ppdm_pet_denoise": "pet_denoise", "sparse_pet_denoise": "pet_denoise", "ppdm_pet_ac": "pet_ac",
    "ppdm_mri_t1_t2": "mri_t1_t2", "full3d_mri_t1_t2": "mri_t1_t2", "wdm_mri_t1_t2": "mri_t1_t2",
    "regression_mri_t1_t2": "mri_t1_t2", "patch_prior_train": "mri_t1_t2",
    "pnp_mri_recon": "mri_t1_t2", "pnp_mri_sr": "mri_t1_t2", "sparse_mri_sr": "mri_sr",
    "sparse_ct_denoise": "ct_denoise", "mri_t1_t2": "mri_t1_t2", "ldm_autoencoder": "mri_t1_t2",
    "ldm_mri_t1_t2": "mri_t1_t2", "ldm_pet_denoise": "pet_denoise",
}
CPU_CONFIGS = ("ppdm_pet_denoise", "ppdm_pet_ac", "ppdm_mri_t1_t2", "full3d_mri_t1_t2",
               "wdm_mri_t1_t2", "regression_mri_t1_t2")


def _path(name):
  return os.path.join(ROOT, "configs", f"{name}.py")


def _json(c):
  return json.loads(c.to_json_best_effort())


def _plain(region):
  return None if region is None else {str(k): tuple(float(f) for f in v) for k, v in region.items()}


def test_every_split_config_is_listed():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert names - set(SPLIT_TASKS) == {"prdit_ct_gen"}  # generation from one volume: no split


@pytest.mark.parametrize("name", sorted(SPLIT_TASKS))
def test_default_is_whole_volumes_and_the_test_split(name):
  """A user's datalist with train/val/test splits needs no override: whole volumes train on the
  `train` split and whole volumes of the `test` split are scored; `whole` is that default."""
  for variant in (None, "smoke", "whole", "smoke,whole"):
    c = load(_path(name), variant)
    assert c.data.train_region is None and c.data.eval_region is None, (name, variant)
    assert (c.data.train_split, c.eval.split) == ("train", "test"), (name, variant)
  assert _json(load(_path(name), "whole")) == _json(load(_path(name)))
  with pytest.raises(ValueError, match="variant"):
    load(_path(name), "heldout,whole")


@pytest.mark.parametrize("name", sorted(SPLIT_TASKS))
def test_heldout_gives_the_regions_prepare_data_fits_on(name):
  """`heldout` is the split of the repository's stores: the regions of the task's record
  (jaxvol.data.tasks, where jaxvol.prepare fits their scales on the training region),
  complementary slabs of one axis; the one-subject MRI stores score the other half of their only
  (train) subject."""
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  task = SPLIT_TASKS[name]
  first = "smoke" if name.startswith(("patch_prior", "pnp_")) else "cpu"
  for variant in ("heldout", "smoke,heldout", f"heldout,{first}"):
    c = load(_path(name), variant)
    assert _plain(c.data.train_region) == _plain(tasks.get(task).train_region), (name, variant)
    assert _plain(c.data.eval_region) == _plain(tasks.get(task).eval_region), (name, variant)
    assert c.eval.split == ("train" if task in ("mri_t1_t2", "mri_sr") else "test"), name
  # The regions tile the split axis of a volume without overlap: training, then (for the
  # one-subject stores, whose validation set is a slab of the same subject) validation, then
  # evaluation.
  shape = (62, 80, 70)
  train = pipeline.region_box(shape, c.data.train_region)
  evaluate = pipeline.region_box(shape, c.data.eval_region)
  (axis,) = [a for a in range(3) if train[a] != (0, shape[a])]
  middle = train[axis][1]
  if c.eval.val_split == c.eval.split:
    val = pipeline.region_box(shape, c.eval.val_region)
    assert val[axis][0] == middle
    middle = val[axis][1]
  else:
    assert c.eval.val_split == "val" and c.eval.val_region is None  # another realisation
  assert train[axis][0] == 0 and middle == evaluate[axis][0] and evaluate[axis][1] == \
      shape[axis]
  assert [train[a] for a in range(3) if a != axis] == [evaluate[a] for a in range(3) if a != axis]
  # Apart from the split, the held-out config is the default one.
  a, b = _json(load(_path(name))), _json(load(_path(name), "heldout"))
  for d in (a, b):
    del d["data"]["train_region"], d["data"]["eval_region"], d["eval"]["split"]
    del d["eval"]["val_split"], d["eval"]["val_region"]  # the split's validation set
    d["data"].pop("position_axes")
  assert a == b


def test_every_prepared_task_has_a_record_and_a_builder():
  assert set(prepare.TASKS) == set(prepare._BUILDERS) <= set(tasks.TASKS)  # pylint: disable=protected-access
  for name in prepare.TASKS:
    t = tasks.get(name)
    assert t.target in t.modalities and set(t.inputs) <= set(t.modalities), name
    assert t.heldout == (t.eval_region is not None), name
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.get("nope")
  with pytest.raises(ValueError, match="no held-out split"):
    base.apply_split(base.base_config(), "ct_gen", heldout=True)
  assert tasks.describe_split(tasks.get("pet_denoise")) == (
      "training crops from RAS z in [0, 0.6) of split 'train'; validation on split 'val', "
      "RAS z in [0.6, 1]; scored on RAS z in [0.6, 1] of split 'test'")


def test_demo_keeps_its_held_out_split_and_whole_is_an_alias():
  path = _path("ppdm_pet_denoise")
  demo = load(path, "demo")
  assert _plain(demo.data.eval_region) == {"2": (0.6, 1.0)} and demo.eval.split == "test"
  # demo = the cpu budget, held out, with validation and its sampler and reference settings.
  assert (demo.train.validate_every, demo.ppdm.sample_steps, demo.ppdm.max_var) == (300, 1, 0.1)
  assert (tuple(demo.inference.window), tuple(demo.inference.flip_axes)) == ((32,) * 3, (0, 1, 2))
  assert (demo.ppdm.loss, demo.train.steps, demo.train.time_limit_minutes) == ("l2", 4200, 12.0)
  assert load(path, "cpu,heldout").ppdm.max_var == 1.0  # BBDM's, elsewhere
  assert load(path, "cpu,heldout").ppdm.loss == "l1"

  def common(c):
    c.train.validate_every = c.ppdm.sample_steps = c.eval.reference_tune_subjects = 0
    c.ppdm.max_var, c.ppdm.loss, c.train.steps, c.train.time_limit_minutes = 0.0, "", 0, 0.0
    c.eval.reference_tune_box = c.inference.window = c.inference.flip_axes = ()
    return _json(c)

  assert common(demo) == common(load(path, "cpu,heldout"))
  assert (demo.model.base_width, tuple(demo.data.crop_size)) == (16, (32, 32, 32))
  assert load(path, "demo,whole").data.eval_region is None  # the old `demo,whole` command
  assert common(load(path, "demo,whole")) == common(load(path, "cpu"))
  for bad in ("demo,smoke", "cpu,demo", "heldout,whole", "hold"):
    with pytest.raises(ValueError, match="variant"):
      load(path, bad)


def test_position_axes_follow_the_split():
  """The prior encodes every axis on whole volumes, only those the training region covers under
  `heldout`; the reconstructions restore the same axes."""
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  for split, axes in (("", (0, 1, 2)), (",heldout", (1, 2))):
    for name in ("patch_prior_train", "pnp_mri_recon", "pnp_mri_sr"):
      c = load(_path(name), "cpu,positions" + split)
      assert pipeline.position_axes(c.data) == axes, (name, split)
      pipeline.check_position_coverage(c.data.train_region, c.data.eval_region, axes)
  c = load(_path("patch_prior_train"), "positions,heldout")
  with pytest.raises(ValueError, match="axis 0 evaluated on"):
    pipeline.check_position_coverage(c.data.train_region, c.data.eval_region, (0, 1, 2))


def test_shared_data_launch_commands_carry_the_token():
  """Every docstring command that trains on a store of tools/prepare_data.py (data/...) uses
  `heldout`; the commands for a user's STORE use no split token."""
  pattern = re.compile(r"python -m jaxvol\.main --config=(\S+?)(?::(\S+))? .*?"
                       r"--config\.data\.store=(\S+)", re.S)
  seen = 0
  for path in CONFIGS:
    name = os.path.basename(path)[:-3]
    doc = ast.get_docstring(ast.parse(open(path).read()))
    for command in doc.split("python -m jaxvol.main")[1:]:
      m = pattern.match("python -m jaxvol.main" + command)
      if not m or name not in SPLIT_TASKS:
        continue
      seen += 1
      tokens = (m.group(2) or "").split(",")
      if m.group(3).startswith("data/"):
        assert "heldout" in tokens, (name, m.group(0))
      else:
        assert "heldout" not in tokens, (name, m.group(0))
  assert seen >= 20


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_variant_is_a_ten_minute_cpu_budget(name):
  """`cpu`: a small network on small crops, stopped after 10 minutes, whose train step and
  sampler trace at those shapes (measured: 0.5-0.65 s per step on a busy 2-core CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  c = load(_path(name), "cpu")
  assert c.train.time_limit_minutes == 10.0 and c.train.learning_rate == 5e-4
  assert c.model.base_width <= 16 and max(c.data.crop_size) <= 32 and c.data.batch_size <= 4
  # Half-resolution networks (PPDM r=2, WDM) afford the demo's 32^3 crops and width 16.
  half = methods.method_class(c).LOW_RESOLUTION
  assert half == (c.method in ("ppdm", "wdm", "ldm"))
  assert (c.model.base_width, max(c.data.crop_size)) == ((16, 32) if half else (8, 16))
  assert load(_path(name), "cpu").data.eval_region is None
  assert _plain(load(_path(name), "cpu,heldout").data.eval_region) == _plain(
      tasks.get(SPLIT_TASKS[name]).eval_region)
  with pytest.raises(ValueError, match="variant"):
    load(_path(name), "smoke,cpu")
  c.mesh.data = 1
  parts = loop.build_everything(c, "")
  method, example = parts.method, parts.example
  loss, _ = jax.eval_shape(method.loss, parts.abstract_state["params"], example,
                           jax.random.PRNGKey(0))
  assert loss.shape == ()
  cond = jax.ShapeDtypeStruct((1, 24, 40, 32, method.cond_channels), example["cond"].dtype)
  pred = jax.eval_shape(method.sample, parts.abstract_state["params"], cond,
                        jax.random.PRNGKey(0))
  assert pred.shape == (1, 24, 40, 32, method.target_channels)


_PARSE = """
import json, sys
from jaxvol import configs, main
main.FLAGS(configs.resolve_argv(sys.argv))
d = main.FLAGS.config.data
print(json.dumps({"train": d.train_region, "eval": d.eval_region}))
"""


@pytest.mark.parametrize("variant,overrides,want", [
    ("smoke,heldout", ["--config.data.eval_region=None", "--config.data.train_region=None"],
     {"train": None, "eval": None}),
    ("smoke", ["--config.data.eval_region={'2': (0.6, 1.0)}",
               "--config.data.train_region={'2': [0.0, 0.6]}"],
     {"train": {"2": [0.0, 0.6]}, "eval": {"2": [0.6, 1.0]}}),
])
def test_regions_override_from_the_command_line(variant, overrides, want):
  """jaxvol.main's flags take None for a region a config sets and a dict for one it leaves
  None (ml_collections would otherwise fix the field's type when the config is built)."""
  argv = [f"--config=ppdm_pet_denoise:{variant}", "--workdir=unused", *overrides]
  r = subprocess.run([sys.executable, "-c", _PARSE, *argv], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == want


@pytest.mark.parametrize("method", ["ppdm", "full3d", "wdm", "regression"])
def test_mri_t1_t2_is_one_config_and_the_method_names_are_aliases(method):
  """One module per task, the method a variant token; the older names give the same config."""
  for variant in ("", "cpu,heldout", "smoke"):
    alias = load(_path(f"{method}_mri_t1_t2"), variant or None)
    one = load(_path("mri_t1_t2"), ",".join(t for t in (method, variant) if t))
    assert alias.method == method and _json(alias) == _json(one), (method, variant)
  assert load(_path("mri_t1_t2")).method == "ppdm"
  with pytest.raises(ValueError, match="at most one of"):
    load(_path("mri_t1_t2"), f"{method},{'wdm' if method != 'wdm' else 'ppdm'}")


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_selecting_a_method_applies_its_declared_defaults(method):
  """set_method writes the Method's CONFIG_DEFAULTS (the paper's choices), and nothing else."""
  before = base.base_config().to_dict()
  c = base.set_method(base.base_config(), method)
  declared = methods.method_class(c).CONFIG_DEFAULTS
  for field, value in declared.items():
    section, name = field.split(".")
    assert c[section][name] == value, field
  after = c.to_dict()
  changed = {f"{sec}.{k}" for sec in after if isinstance(after[sec], dict)
             for k in after[sec] if after[sec][k] != before[sec][k]}
  assert changed <= set(declared), changed - set(declared)
  assert methods.METHODS["wdm"].CONFIG_DEFAULTS and methods.METHODS["sparse"].CONFIG_DEFAULTS
