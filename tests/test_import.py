"""`jaxvol import`: the authors' checkpoints as runs that sample, evaluate and warm-start.

The weights are fixture-sized state dicts in the authors' PyTorch names (the parity fixtures'
synthetic PRDiT weights and the stored sparse U-Net; tests/fixtures/authors), written as .npz as a
user's converted checkpoint would be: no download, no torch.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from conftest import CLI_ENV, ROOT, load_module, write_ct_store
from jaxvol import cli
from jaxvol import config as base
from jaxvol import experiment
from jaxvol import methods
from jaxvol.data import store as store_lib
from jaxvol.errors import ConfigError
from jaxvol.eval import volumes
from jaxvol.models import convert_prdit
from jaxvol.models import convert_sparse
from jaxvol.train import importer

FIXTURES = ROOT / "tests" / "fixtures" / "authors"
make_prdit = load_module(FIXTURES / "make_prdit.py", "make_prdit_for_import")
# The prdit_stage2 fixture's network: paper-layout stage 1 (12^3 windows, stride 8) + a 24-wide,
# 2-block, 2-head residual DiT.
PRDIT_OVERRIDES = {"prdit.patch": 12, "prdit.stride": 8, "prdit.width": 24, "prdit.heads": 2,
                   "prdit.depth": 2, "prdit.local_width": 0, "prdit.mlp_ratio": 4.0}


@pytest.fixture(scope="module")
def ct_store(tmp_path_factory):
  """One 24x24x20 'CT' in HU."""
  return write_ct_store(tmp_path_factory.mktemp("ct_import"), np.diag([1.5, 1.5, 2.0, 1.0]))


@pytest.fixture(scope="module")
def prdit_npz(tmp_path_factory):
  with np.load(FIXTURES / "prdit_stage2.npz") as fx:
    names, shapes = fx["names"], fx["shapes"]
  sd = {str(n): make_prdit.synthetic_weight(str(n), s)
        for n, s in zip(names, make_prdit.table_shapes(shapes))}
  path = tmp_path_factory.mktemp("theirs") / "prdit_ema.npz"
  np.savez(path, **sd)
  return str(path), sd


def _prdit_config(store, **extra):
  c = experiment.packaged_config("prdit_ct_gen", "smoke")
  c.data.store, c.mesh.data = store, 1
  for key, value in {**PRDIT_OVERRIDES, **extra}.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_import_argv_translates_the_command_line():
  assert cli.import_argv(["--from", "prdit", "x.pt", "--config=c", "--weights=model"]) == [
      "--import_from=prdit", "--config=c", "--import_weights=model", "--import_checkpoint=x.pt"]
  with pytest.raises(ValueError, match="one checkpoint"):
    cli.import_argv(["a.pt", "b.pt"])


def test_mismatches_are_refused_by_name_and_nothing_is_written(ct_store, prdit_npz, tmp_path):
  path, _ = prdit_npz
  workdir = str(tmp_path / "run")
  with pytest.raises(ConfigError, match=r"--config.prdit.width=24 \(the config has 16\)"):
    importer.import_checkpoint(_prdit_config(ct_store, **{"prdit.width": 16}), workdir, "prdit",
                               path)
  with pytest.raises(ConfigError, match="use --from prdit"):
    importer.import_checkpoint(_prdit_config(ct_store, **{"diffusion.objective": "flow"}),
                               workdir, "prdit-fm", path)
  with pytest.raises(FileNotFoundError):
    importer.import_checkpoint(_prdit_config(ct_store), workdir, "prdit", path + ".missing")
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
      os.path.join(workdir, "checkpoints"))


def test_sparse_import_restores_the_converted_weights(ct_store, tmp_path):
  f = np.load(FIXTURES / "sparse_unet.npz")
  sd = {k[2:]: f[k].astype(np.float32) * f["s/" + k[2:]] for k in f.files if k.startswith("q/")}
  path = tmp_path / "sparse.npz"
  np.savez(path, **sd)
  c = base.sparse_config("ct_denoise", "authors,smoke")
  c.data.store, c.mesh.data = ct_store, 1
  c.data.inputs = ("ct",)  # the one-volume store: the condition channel is the CT itself
  c.model.groups, c.model.num_heads = 4, 2
  with pytest.raises(ConfigError, match=r"--config.model.attention_levels=\(2,\)"):
    importer.import_checkpoint(c, str(tmp_path / "run"), "sparse", str(path))
  c.model.attention_levels, c.model.channel_mults, c.model.stm_dim = (2,), (1, 2, 2), 128
  record = importer.import_checkpoint(c, str(tmp_path / "run"), "sparse", str(path))
  assert record["from"] == "sparse" and record["parameters"] == int(f["num_params"])
  params, step = volumes.load_params(c, str(tmp_path / "run"))
  assert step == 0
  fields = convert_sparse.infer_model_fields(sd, num_heads=2, groups=4)
  want = convert_sparse.convert_torch_state_dict(sd, convert_sparse.net_from_fields(fields))
  for (k, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                            jax.tree_util.tree_flatten_with_path(want)[0]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
  with pytest.raises(ConfigError, match="already holds checkpoints"):
    importer.import_checkpoint(c, str(tmp_path / "run"), "sparse", str(path))


@pytest.mark.slow
def test_import_then_sample_through_the_cli(ct_store, prdit_npz, tmp_path):
  """`jaxvol import --from prdit` then `jaxvol sample`: the generated volume is the converted
  network's own sample (same key), in HU."""
  path, sd = prdit_npz
  workdir = tmp_path / "imported"
  overrides = [f"--config.{k}={v}" for k, v in PRDIT_OVERRIDES.items()]
  common = ["--config=prdit_ct_gen:smoke", f"--workdir={workdir}",
            f"--config.data.store={ct_store}", "--config.mesh.data=1", *overrides]
  run = lambda *args: subprocess.run([sys.executable, "-m", "jaxvol", *args], cwd=ROOT,
                                     env=CLI_ENV, capture_output=True, text=True, timeout=600)
  r = run("import", "--from", "prdit", path, *common)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  meta = json.loads((workdir / "checkpoints" / "0" / "meta" / "metadata").read_text())
  assert meta["imported"]["from"] == "prdit" and len(meta["imported"]["sha256"]) == 64
  r = run("sample", *common, "--config.sample.num=1", "--config.sample.shape=(16,16,16)",
          "--config.sample.metrics=False")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  got = np.asarray(nib.load(workdir / "samples" / "sample_000.nii.gz").dataobj)
  info = json.loads((workdir / "samples" / "samples.json").read_text())
  assert info["checkpoint_step"] == 0
  c = _prdit_config(ct_store)
  method = methods.build(c)
  params = convert_prdit.convert_state_dict(sd)
  key = jax.random.fold_in(jax.random.PRNGKey(c.sample.seed), 0)
  x = np.asarray(method.sample(params, jnp.zeros((1, 16, 16, 16, 0)), key))[0, ..., 0]
  preset = store_lib.Store(ct_store).preset("ct0", "ct")
  want = np.asarray(preset.inverse(np.clip(x, -1, 1)), np.float32)
  np.testing.assert_allclose(got, want, atol=0.5)  # HU
  assert np.std(got) > 1.0
