"""PRDiT end to end on a tiny synthetic CT store: two stages, warm start, sampling to NIfTI."""

import json
import os
import pathlib
import shutil
from unittest import mock

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT
from conftest import load_module
from conftest import write_ct_store
from jaxvol import methods
from jaxvol import trees
from jaxvol.eval import generate as generate_lib
from jaxvol.eval import samplers
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from jaxvol.train import state as state_lib
from jaxvol.train import step as step_lib
from jaxvol.train import transfer

# LPS at 1.5 x 2 x 2.5 mm: the store holds it in RAS, whose voxel size is the same three numbers.
AFFINE = np.array([[-1.5, 0, 0, 30], [0, -2.0, 0, 20], [0, 0, 2.5, -10], [0, 0, 0, 1]])
SPACING = (1.5, 2.0, 2.5)


_load = load_module


prdit_config = _load(ROOT / "configs" / "prdit_ct_gen.py", "prdit_ct_gen_config")


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
  """One 24x24x20 'CT' in HU: smooth soft tissue in air."""
  return pathlib.Path(write_ct_store(tmp_path_factory.mktemp("ct"), AFFINE))


def smoke(store, variant="smoke", **prdit):
  c = prdit_config.get_config(variant)
  c.data.store = str(store)
  c.mesh.data = 1
  c.train.steps = 3
  c.train.checkpoint_every = 3
  c.train.log_every = 3
  for k, v in prdit.items():
    c.prdit[k] = v
  return c


def _restore(workdir):
  ck = ckpt_lib.Checkpointer(str(workdir), with_data=False, async_save=False)
  state, _ = ck.restore(None)
  ck.close()
  return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def runs(ct_store, tmp_path_factory):
  """Stage 1 (3 steps), then stage 2 on it (3 steps): (workdir 1, workdir 2)."""
  root = tmp_path_factory.mktemp("runs")
  w1, w2 = str(root / "stage1"), str(root / "stage2")
  loop.train(smoke(ct_store, "stage1,smoke"), w1)
  loop.train(smoke(ct_store, stage1_workdir=w1), w2)
  return w1, w2


def _leaves(tree):
  return {"/".join(p): v for p, v in trees.flat_paths(tree).items()}


def test_stage2_keeps_stage1_weights_bit_identical(runs):
  w1, w2 = runs
  s1, s2 = _restore(w1), _restore(w2)
  assert set(s1["params"]["params"]) == {"local"}
  assert set(s2["params"]["params"]) == {"local", "residual"}
  # The raw stage-1 weights (the authors'; config.prdit.source_weights = "ema" takes the EMA).
  local1 = _leaves(s1["params"]["params"]["local"])
  for tree in (s2["params"], s2["ema_params"]):
    local2 = _leaves(tree["params"]["local"])
    assert local2.keys() == local1.keys()
    for k in local1:
      np.testing.assert_array_equal(local2[k], local1[k], err_msg=k)
  # The residual DiT trained: its zero-initialised read-out moved.
  assert np.abs(s2["params"]["params"]["residual"]["out"]["kernel"]).max() > 0
  # AdamW keeps two moments for the residual DiT and nothing for the frozen local denoiser.
  n_residual = sum(v.size for v in jax.tree.leaves(s2["params"]["params"]["residual"]))
  n_state = sum(v.size for v in jax.tree.leaves(s2["opt_state"]) if np.ndim(v) > 0)
  assert n_state == 2 * n_residual


def test_fresh_stage2_samples_what_stage1_samples(ct_store, runs, tmp_path):
  w1, _ = runs
  c2 = smoke(ct_store, stage1_workdir=w1)
  parts = loop.build_everything(c2, str(tmp_path))
  state = state_lib.create_state(parts.method, parts.optimizer, jax.random.PRNGKey(5),
                                 parts.example, parts.state_sharding)
  state = transfer.load(parts.transfer, state)
  c1 = smoke(ct_store, "stage1,smoke")
  stage1 = methods.build(c1, "cpu")
  cond = jnp.zeros((1, 16, 16, 24, 0))
  key = jax.random.PRNGKey(9)
  for sampler in ("pc", "euler"):
    c1.prdit.sampler = c2.prdit.sampler = sampler
    a = jax.jit(stage1.sample)(_restore(w1)["params"], cond, key)
    b = jax.jit(parts.method.sample)(state["ema_params"], cond, key)
    assert a.shape == (1, 16, 16, 24, 1)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


def test_stage2_without_stage1_is_a_clear_error(ct_store, tmp_path):
  with pytest.raises(ValueError, match="stage1_workdir"):
    loop.train(smoke(ct_store), str(tmp_path / "w"))
  with pytest.raises(FileNotFoundError, match="no checkpoints"):
    loop.build_everything(smoke(ct_store, stage1_workdir=str(tmp_path / "nothing")), str(tmp_path))


@pytest.mark.slow
def test_warm_start_copies_matching_shapes_with_scaled_learning_rate(ct_store, runs, tmp_path):
  _, w2 = runs  # depth 1; the new model has depth 2: block1 has no counterpart
  c = smoke(ct_store, depth=2, warm_start_workdir=w2, warm_start_lr_scale=0.1)
  parts = loop.build_everything(c, str(tmp_path))
  plan = parts.transfer
  labels = _leaves(plan.labels)
  assert {v for k, v in labels.items() if k.startswith("params/local/")} == {"frozen"}
  assert {v for k, v in labels.items() if k.startswith("params/residual/block1/")} == {"fresh"}
  assert {v for k, v in labels.items() if k.startswith("params/residual/block0/")} == {"warm_start"}
  assert labels["params/residual/out/kernel"] == "warm_start"
  # The time fine head is re-initialised and trains at the full rate, as the authors do.
  assert {v for k, v in labels.items() if k.startswith("params/residual/time_fine/")} == {"fresh"}
  assert plan.lr_scales == {"warm_start": 0.1, "fresh": 1.0}

  fresh = state_lib.create_state(parts.method, parts.optimizer, jax.random.PRNGKey(0),
                                 parts.example, parts.state_sharding)
  warm = transfer.load(plan, fresh)
  src = _leaves(_restore(w2)["params"])  # the raw weights (config.prdit.source_weights)
  before, after = _leaves(fresh["params"]), _leaves(warm["params"])
  for k, lab in labels.items():
    want = src[k] if lab in ("warm_start", "frozen") else before[k]
    np.testing.assert_array_equal(np.asarray(after[k]), want, err_msg=k)

  # With unit gradients AdamW's update is -lr per element (after one warm-up step at lr 0).
  opt = parts.optimizer
  ones = jax.tree.map(jnp.ones_like, warm["params"])
  opt_state = opt.init(warm["params"])
  for _ in range(2):
    updates, opt_state = opt.update(ones, opt_state, warm["params"])
  lr = c.train.learning_rate
  for k, u in _leaves(updates).items():
    want = {"frozen": 0.0, "fresh": -lr, "warm_start": -0.1 * lr}[labels[k]]
    np.testing.assert_allclose(np.asarray(u), want, rtol=1e-4, err_msg=k)


def test_frozen_leaves_pass_through_the_step_unchanged(ct_store, runs, tmp_path):
  """Even a non-zero EMA decay leaves frozen EMA weights bit-identical (no rounding drift)."""
  w1, _ = runs
  c = smoke(ct_store, stage1_workdir=w1)
  parts = loop.build_everything(c, str(tmp_path))
  state = transfer.load(parts.transfer, state_lib.create_state(
      parts.method, parts.optimizer, jax.random.PRNGKey(0), parts.example,
      parts.state_sharding))
  step = jax.jit(step_lib.make_train_step(parts.method, parts.optimizer, 0.9,
                                          frozen=parts.transfer.frozen))
  batch = {"cond": jnp.zeros((2, 16, 16, 16, 0)),
           "target": jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 16, 1), minval=-1)}
  new = jax.tree.map(jnp.copy, state)
  for _ in range(2):  # the first step is the warm-up's zero learning rate
    new, metrics = step(new, batch, jax.random.PRNGKey(2))
    assert float(metrics["finite"]) == 1.0
  for name in ("params", "ema_params"):
    old, updated = _leaves(state[name]["params"]["local"]), _leaves(new[name]["params"]["local"])
    for k, v in old.items():
      np.testing.assert_array_equal(np.asarray(updated[k]), np.asarray(v), err_msg=k)
  assert not np.array_equal(np.asarray(new["params"]["params"]["residual"]["out"]["kernel"]),
                            np.asarray(state["params"]["params"]["residual"]["out"]["kernel"]))


def test_sample_mode_writes_nifti_with_documented_affine_and_metrics(ct_store, runs):
  _, w2 = runs
  c = smoke(ct_store)
  c.sample.num = 2
  c.sample.shape = (16, 16, 24)
  c.sample.metrics = True
  result = generate_lib.generate(c, w2)
  out = os.path.join(w2, "samples")
  names = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
  assert names == ["sample_000.nii.gz", "sample_001.nii.gz"]
  want_affine = np.diag([*SPACING, 1.0])
  want_affine[:3, 3] = -np.array(SPACING) * (np.array([16, 16, 24]) - 1) / 2
  vols = []
  for name in names:
    img = nib.load(os.path.join(out, name))
    assert img.shape == (16, 16, 24)
    np.testing.assert_allclose(img.affine, want_affine, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = img.get_fdata()
    assert np.all(np.isfinite(data)) and data.min() >= -1000 - 1e-3 and data.max() <= 1000 + 1e-3
    vols.append(data)
  assert not np.array_equal(vols[0], vols[1])  # fold_in(seed, i): different noise per volume
  meta = json.load(open(os.path.join(out, "samples.json")))
  assert meta["units"] == "HU" and meta["spacing_mm"] == list(SPACING)
  assert meta == json.loads(json.dumps(result["samples"]))
  report = json.load(open(os.path.join(out, "generation_metrics.json")))
  assert report["fid_label"] == "FD (random features)" and report["pretrained"] is False
  assert "NOT pretrained" in report["feature_network"] and "MedicalNet" in report["feature_network"]
  assert np.isfinite(report["fid"]) and np.isfinite(report["mmd"])
  assert report["n_real"] == report["n_fake"] == 2
  assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_shapes_off_the_token_grid_are_a_clear_error(ct_store, runs):
  c = smoke(ct_store)
  method = methods.build(c, "cpu")
  params = _restore(runs[1])["ema_params"]
  with pytest.raises(ValueError, match="multiples of the token stride 8"):
    method.sample(params, jnp.zeros((1, 16, 20, 16, 0)), jax.random.PRNGKey(0))
  c.sample.shape = (16, 20, 16)
  with pytest.raises(ValueError, match="multiple of"):
    generate_lib.generate(c, runs[1])


def test_attention_memory_train_step_record(tmp_path):
  am = _load(ROOT / "experiments" / "attention_memory.py", "attention_memory_under_test")
  records = am.main(["--out", str(tmp_path), "--tokens", "", "--sizes", "16", "--backends",
                     "chunked", "--width", "16", "--heads", "2", "--depth", "1", "--local-width",
                     "8", "--dtype", "float32"])
  (rec,) = records
  assert rec["kind"] == "train_step" and rec["skipped"] is None, rec["skipped"]
  assert rec["bytes"] > 0 and rec["tokens"] == 8 and rec["size"] == 16
  assert rec["trainable_params"] < rec["params"]
  assert json.loads((tmp_path / "attention_memory.json").read_text()) == json.loads(
      json.dumps(records))


def test_sample_mode_split_over_devices_equals_one_device(ct_store, runs, tmp_path):
  """--mode=sample with config.mesh spatial = 2 x model = 2: tokens and DiT kernels split."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (fake) devices")
  vols = []
  for name, (spatial, model) in (("one", (1, 1)), ("split", (2, 2))):
    c = smoke(ct_store)
    c.sample.num, c.sample.shape, c.sample.metrics = 1, (16, 16, 24), False
    c.mesh.spatial, c.mesh.model = spatial, model
    workdir = str(tmp_path / name)
    shutil.copytree(runs[1], workdir)
    used, choose = [], samplers.choose
    with mock.patch.object(samplers, "choose", lambda config, method, used=used: used.append(
        choose(config, method)) or used[-1]):
      generate_lib.generate(c, workdir)
    assert isinstance(used[0], samplers.VolumeSampler) == (name != "one")
    vols.append(np.asarray(nib.load(os.path.join(workdir, "samples", "sample_000.nii.gz")).dataobj))
  np.testing.assert_allclose(vols[1], vols[0], rtol=0, atol=1e-3)  # HU


def _old_layout_run(workdir, config, keep_layout_field=False):
  """A checkpoint as the layout-1 code wrote it: old parameter names, no prdit.layout saved."""
  saved = json.loads(config.to_json_best_effort())
  if not keep_layout_field:
    del saved["prdit"]["layout"]
  params = {"params": {"local": {"time": {"hidden": {"kernel": jnp.zeros((256, 16))}},
                                 "block0": {"gate_value": {"kernel": jnp.zeros((16, 32))}}}}}
  state = {"step": jnp.int32(3), "params": params, "ema_params": params}
  ck = ckpt_lib.Checkpointer(str(workdir), with_data=False, async_save=False)
  ck.save(3, state, {"config": saved})
  ck.close()
  return str(workdir)


def test_old_layout_checkpoints_are_refused(ct_store, tmp_path):
  old = _old_layout_run(tmp_path / "old", smoke(ct_store, "stage1,smoke"))
  message = "prdit.layout saved 1 vs now 2.*layout 1"
  with pytest.raises(ValueError, match=message):  # stage 2 on an old stage 1
    loop.build_everything(smoke(ct_store, stage1_workdir=old), str(tmp_path))
  with pytest.raises(ValueError, match=message):  # warm start
    loop.build_everything(smoke(ct_store, "stage1,smoke", warm_start_workdir=old), str(tmp_path))
  ck = ckpt_lib.Checkpointer(old, with_data=False, async_save=False)
  with pytest.raises(ValueError, match=message):  # resume and evaluation check this first
    ckpt_lib.check_same_model(ck.restore_meta(), smoke(ct_store, "stage1,smoke"), ck.directory)
  ck.close()
  # Without the config field, the parameter names still give the old layout away.
  named = _old_layout_run(tmp_path / "named", smoke(ct_store, "stage1,smoke"),
                          keep_layout_field=True)
  with pytest.raises(ValueError, match="parameter layout 1 .*local/time"):
    loop.build_everything(smoke(ct_store, stage1_workdir=named), str(tmp_path))
  # Another method's old checkpoint is not mistaken for an old PRDiT one.
  other = json.loads(smoke(ct_store).to_json_best_effort())
  other["method"] = "full3d"
  del other["prdit"]["layout"]
  c = smoke(ct_store)
  c.method = "full3d"
  ckpt_lib.check_same_model({"config": other}, c, "somewhere")


def test_stage2_can_freeze_the_stage1_ema_instead(ct_store, runs, tmp_path):
  w1, _ = runs
  parts = loop.build_everything(smoke(ct_store, stage1_workdir=w1, source_weights="ema"),
                                str(tmp_path))
  state = transfer.load(parts.transfer, state_lib.create_state(
      parts.method, parts.optimizer, jax.random.PRNGKey(0), parts.example,
      parts.state_sharding))
  s1 = _restore(w1)
  ema, raw = _leaves(s1["ema_params"]["params"]["local"]), _leaves(s1["params"]["params"]["local"])
  got = _leaves(state["params"]["params"]["local"])
  assert any(not np.array_equal(ema[k], raw[k]) for k in ema)
  for k in ema:
    np.testing.assert_array_equal(np.asarray(got[k]), ema[k], err_msg=k)


def test_sample_mode_replaces_the_samples_of_an_earlier_run(ct_store, runs, tmp_path):
  """Fewer samples, no metrics: no sample or generation_metrics.json of the run before stays."""
  workdir = str(tmp_path / "w")
  shutil.copytree(runs[1], workdir)
  old = os.path.join(workdir, "samples")
  shutil.rmtree(old, ignore_errors=True)  # runs[1] may hold another test's samples
  os.makedirs(old)
  for name in ("sample_000.nii.gz", "sample_001.nii.gz", "samples.json",
               "generation_metrics.json"):
    with open(os.path.join(old, name), "w") as f:
      f.write("an earlier run's file")
  c = smoke(ct_store)
  c.sample.num, c.sample.shape, c.sample.metrics = 1, (16, 16, 16), False
  result = generate_lib.generate(c, workdir)
  assert sorted(os.listdir(old)) == ["sample_000.nii.gz", "samples.json"]
  assert result["files"] == [os.path.join(old, "sample_000.nii.gz")]
  assert nib.load(result["files"][0]).shape == (16, 16, 16)
  assert json.load(open(os.path.join(old, "samples.json")))["num"] == 1
  assert not [f for f in os.listdir(workdir) if f.startswith(".samples")]
