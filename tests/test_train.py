"""Training end to end on a tiny synthetic store: sharding, resume, clean stops, evaluation."""

import csv
import json
import os
import signal

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from jaxvol import config as base
from jaxvol.data import store as store_lib
from jaxvol.eval import evaluate as evaluate_lib
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from jaxvol.train import state as state_lib
from jaxvol.train import step as step_lib

AFFINE = np.array([[-2.0, 0, 0, 40], [0, 2.0, 0, -30], [0, 0, 2.0, -20], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
  """Three 20x18x16 'subjects' (smooth activity; noisy copy as the condition), LAS affine."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  rows = []
  for i, split in enumerate(["train", "train", "test"]):
    clean = ndimage.gaussian_filter(rng.gamma(2.0, 1.0, (20, 18, 16)), 2.0).astype(np.float32) * 10
    noisy = np.maximum(clean + rng.normal(0, 1.0, clean.shape), 0).astype(np.float32)
    for name, vol in (("low", noisy), ("full", clean)):
      nib.save(nib.Nifti1Image(vol, AFFINE), root / f"s{i}_{name}.nii.gz")
    rows.append(f"s{i},{split},s{i}_low.nii.gz,s{i}_full.nii.gz")
  (root / "list.csv").write_text("subject,split,pet_low,pet_full\n" + "\n".join(rows) + "\n")
  store_lib.convert(root / "list.csv", root / "store",
                    {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "ref": "pet_low"}})
  return root


def smoke_config(store, method="ppdm", steps=4):
  c = base.base_config()
  c.method = method
  c.data.store = str(store)
  c.data.inputs = ("pet_low",)
  c.data.target = "pet_full"
  base.smoke_overrides(c)
  c.train.steps = steps
  c.eval.input_baseline = True
  c.mesh.data = 1
  return c


@pytest.fixture(scope="module")
def parts_and_batch(tiny_store):
  c = smoke_config(tiny_store / "store")
  c.data.batch_size = 4
  rng = np.random.default_rng(1)
  batch = {"cond": rng.normal(size=(4, 16, 16, 16, 1)).astype(np.float32),
           "target": rng.normal(size=(4, 16, 16, 16, 1)).astype(np.float32)}
  return c, batch


def _run_steps(c, batch, devices, n=2):
  mesh = mesh_lib.make_mesh(c.mesh, devices)
  from jaxvol import methods  # pylint: disable=g-import-not-at-top
  method = methods.build(c, "cpu")
  opt = state_lib.make_optimizer(c.train)
  example = method.abstract_batch(4, (16, 16, 16))
  repl = mesh_lib.replicated(mesh)
  shapes = state_lib.state_shapes(method, opt, example)
  shard = jax.tree.map(lambda _: repl, shapes)
  state = state_lib.create_state(method, opt, jax.random.PRNGKey(0), example, shard)
  fn = step_lib.jit_train_step(step_lib.make_train_step(method, opt, 0.99), shard,
                               mesh_lib.batch_sharding(mesh), repl)
  b = {k: jax.device_put(v, mesh_lib.batch_sharding(mesh)) for k, v in batch.items()}
  rng = jax.device_put(jax.random.PRNGKey(3), repl)
  for _ in range(n):
    state, metrics = fn(state, b, rng)
  return jax.device_get(state), jax.device_get(metrics)


# (data, spatial): data parallel, mixed, and one volume over all four devices. The other methods'
# spatial layouts are in test_spatial.
@pytest.mark.slow
@pytest.mark.parametrize("layout", [(4, 1), (2, 2), (1, 4)])
def test_sharded_step_equals_unsharded(parts_and_batch, layout):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 (fake) devices")
  c, batch = parts_and_batch
  ref_state, ref_m = _run_steps(c, batch, jax.devices()[:1])
  c4 = c.copy_and_resolve_references()
  c4.mesh.data, c4.mesh.spatial = layout
  state, m = _run_steps(c4, batch, jax.devices()[:4])
  np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _params(workdir):
  ck = ckpt_lib.Checkpointer(workdir, with_data=False, async_save=False)
  state, _ = ck.restore(None)
  step = ck.latest_step()
  ck.close()
  return state, step


def _next_batch_after_restore(c, workdir):
  from jaxvol.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(c.data.store, "train", loop.modality_keys(c),
                                    tuple(c.data.crop_size), c.data.batch_size, seed=c.seed)
  ck = ckpt_lib.Checkpointer(workdir, async_save=False)
  ck.restore(None, data_iter=it)
  ck.close()
  return next(it)


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tiny_store, tmp_path):
  c = smoke_config(tiny_store / "store", steps=6)
  c.train.checkpoint_every = 3
  loop.train(c, str(tmp_path / "a"))
  c_short = smoke_config(tiny_store / "store", steps=3)
  c_short.train.checkpoint_every = 3
  loop.train(c_short, str(tmp_path / "b"))
  loop.train(c, str(tmp_path / "b"))  # resumes at 3
  (sa, step_a), (sb, step_b) = _params(str(tmp_path / "a")), _params(str(tmp_path / "b"))
  assert step_a == step_b == 6
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  na, nb = _next_batch_after_restore(c, str(tmp_path / "a")), _next_batch_after_restore(
      c, str(tmp_path / "b"))
  for k in na:
    np.testing.assert_array_equal(na[k], nb[k])


@pytest.mark.slow
def test_non_finite_loss_stops_before_checkpoint(tiny_store, tmp_path, monkeypatch):
  c = smoke_config(tiny_store / "store", steps=6)
  c.train.checkpoint_every = 2
  calls = {"n": 0}
  real = loop.assemble_batch

  def poisoned(raw, n):
    calls["n"] += 1
    out = real(raw, n)
    if calls["n"] == 3:
      out["target"] = out["target"] * np.nan
    return out

  monkeypatch.setattr(loop, "assemble_batch", poisoned)
  with pytest.raises(FloatingPointError, match="non-finite"):
    loop.train(c, str(tmp_path / "w"))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "w"), async_save=False)
  assert ck.all_steps() == [2]
  ck.close()


@pytest.mark.slow
def test_sigterm_saves_and_resume_finishes(tiny_store, tmp_path, monkeypatch):
  c = smoke_config(tiny_store / "store", steps=8)
  c.train.checkpoint_every = 100
  calls = {"n": 0}
  real = loop.assemble_batch

  def interrupt(raw, n):
    calls["n"] += 1
    if calls["n"] == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(raw, n)

  monkeypatch.setattr(loop, "assemble_batch", interrupt)
  result = loop.train(c, str(tmp_path / "w"))
  assert result["step"] == 3  # the step in progress when the signal came, then a checkpoint
  assert result["signal"] == signal.SIGTERM and result["stopped"] == f"signal {signal.SIGTERM}"
  monkeypatch.setattr(loop, "assemble_batch", real)
  result = loop.train(c, str(tmp_path / "w"))
  assert result["step"] == 8 and result["stopped"] is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppdm", "full3d", "wdm", "regression", "sparse"])
def test_train_then_evaluate_writes_everything(tiny_store, tmp_path, method):
  c = smoke_config(tiny_store / "store", method=method, steps=2)
  if method == "sparse":
    base.set_method(c, "sparse")
    c.model.stm_dim = 8
    c.inference.window = (16, 16, 16)  # the 20x18x16 volumes are sampled in blended windows
    c.inference.batch = 1  # 4 windows over the 4 fake devices
  workdir = str(tmp_path / method)
  loop.train(c, workdir)
  summary = evaluate_lib.evaluate(c, workdir)
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == json.loads(json.dumps(summary))
  for k in ("psnr", "ssim", "nmse", "mae", "hfen"):
    assert np.isfinite(on_disk["metrics"][k]["model"]) and np.isfinite(on_disk["metrics"][k]["input"])
  with open(os.path.join(out, "metrics.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["subject"] for r in rows] == ["s2"]
  pred = nib.load(os.path.join(out, "nifti", "s2_pred.nii.gz"))
  src = nib.load(str(tiny_store / "s2_full.nii.gz"))
  assert pred.shape == src.shape
  np.testing.assert_allclose(pred.affine, src.affine, atol=1e-5)
  assert os.path.exists(os.path.join(out, "previews", "s2.png"))
  assert not [f for f in os.listdir(out) if ".tmp" in f]
  if method == "ppdm":
    table = open(os.path.join(workdir, "parameters.txt")).read()
    assert "Total:" in table and "kernel" in table  # the table goes to a file, not the log
    _check_training_mean_floor(c, on_disk)
    _evaluate_without_targets(tiny_store, c, workdir, pred.get_fdata(), tmp_path)


def _check_training_mean_floor(c, summary):
  """The floor that ignores its input: the voxelwise mean of the two training targets."""
  from jaxvol.eval import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  store = store_lib.Store(c.data.store)
  raw = lambda sid: store.preset(sid, "pet_full").inverse(store.read(sid, "pet_full"))
  target = raw("s2")
  want = metrics_lib.compute_all((raw("s0") + raw("s1")) / 2, target, metrics_lib.body_mask(target),
                                 float(store.preset("s2", "pet_full").hi
                                       - store.preset("s2", "pet_full").lo))
  for k, v in want.items():
    assert summary["metrics"][k]["train_mean"] == pytest.approx(v, rel=1e-5, abs=1e-6), k
  assert "voxelwise mean of 2 training target(s)" in summary["train_mean_floor"]


def _evaluate_without_targets(tiny_store, c, workdir, pred_with_target, tmp_path):
  """A store holding only the inputs (a user's own scans): evaluation predicts, writes, does not
  score, and finishes cleanly; the prediction equals the one made with the target in the store."""
  rows = [f"s{i},{split},{tiny_store}/s{i}_low.nii.gz"
          for i, split in enumerate(["train", "train", "test"])]
  (tmp_path / "inputs.csv").write_text("subject,split,pet_low\n" + "\n".join(rows) + "\n")
  store_lib.convert(tmp_path / "inputs.csv", tmp_path / "inputs", {"pet_low": {"kind": "pet"}})
  c = c.copy_and_resolve_references()
  c.data.store = str(tmp_path / "inputs")
  summary = evaluate_lib.evaluate(c, workdir)
  assert summary["n_scored"] == 0 and summary["metrics"] == {} and summary["unscored"] == ["s2"]
  out = os.path.join(workdir, "eval")
  with open(os.path.join(out, "metrics.csv")) as f:
    (row,) = list(csv.DictReader(f))
  assert row["subject"] == "s2" and "prediction only" in row["note"]
  pred = nib.load(os.path.join(out, "nifti", "s2_pred.nii.gz"))
  np.testing.assert_allclose(pred.get_fdata(), pred_with_target, rtol=0, atol=1e-4)


def test_checkpoint_from_a_4_device_mesh_restores_on_one_device(tmp_path):
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 (fake) devices")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
  value = np.arange(24, dtype=np.float32).reshape(4, 6)
  state = {"w": jax.device_put(value, NamedSharding(mesh, P("data"))), "step": jnp.int32(7)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False, with_data=False)
  ck.save(7, state, {"config": {}})
  ck.wait()
  restored, _ = ck.restore(None)
  ck.close()
  assert restored["w"].sharding.device_set == {jax.local_devices()[0]}
  np.testing.assert_array_equal(np.asarray(restored["w"]), value)


@pytest.mark.slow
def test_resume_with_another_network_is_a_clear_error(tiny_store, tmp_path):
  c = smoke_config(tiny_store / "store", steps=2)
  loop.train(c, str(tmp_path / "w"))
  c.model.base_width = 16
  c.train.steps = 4
  with pytest.raises(ValueError, match="model.base_width"):
    loop.train(c, str(tmp_path / "w"))
