"""The sparse experiments' bookkeeping: configs per run, speed-up arithmetic, ablation table."""

import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import sparse_ablation  # noqa: E402  pylint: disable=wrong-import-position
import sparse_speedup  # noqa: E402  pylint: disable=wrong-import-position


def _args(mod, *extra):
  return mod.parse_args(["--out", "/tmp/unused", "--crop", "16", "--width", "8", *extra])


def test_speedup_runs_differ_only_in_the_schedule():
  args = _args(sparse_speedup)
  sparse = sparse_speedup.make_config(args, "STORE", dense=False)
  dense = sparse_speedup.make_config(args, "STORE", dense=True)
  assert sparse.sparse.f_steps == 5 and dense.sparse.f_steps == 999
  dense.sparse.f_steps = 5
  assert sparse.to_dict() == dense.to_dict()
  assert sparse.data.store == "STORE" and tuple(sparse.data.crop_size) == (16, 16, 16)
  assert sparse.model.base_width == 8 and sparse.inference.window == ()


def test_reach_finds_the_first_point_at_the_target():
  curve = [{"step": 100, "psnr": 20.0}, {"step": 200, "psnr": 25.5}, {"step": 300, "psnr": 25.0}]
  assert sparse_speedup.reach(curve, 25.0)["step"] == 200
  assert sparse_speedup.reach(curve, 26.0) is None


def test_ablation_variants_change_one_switch_each():
  args = _args(sparse_ablation)
  base = sparse_ablation.make_config(args, "S", {}).to_dict()
  for name, overrides in sparse_ablation.VARIANTS.items():
    c = sparse_ablation.make_config(args, "S", overrides).to_dict()
    changed = {(sec, k) for sec in c for k in (c[sec] if isinstance(c[sec], dict) else {})
               if c[sec][k] != base[sec][k]}
    assert changed == {tuple(key.split(".")) for key in overrides}, name


def test_ablation_table_rows():
  rec = {"variant": "eps", "stm": True, "parameterization": "eps", "f_steps": 5, "nfe": 9,
         "psnr": 30.123, "ssim": 0.81234, "train_seconds": 12.3}
  md = sparse_ablation.table([rec, dict(rec, variant="full", parameterization="x0", stm=False)])
  lines = md.splitlines()
  assert lines[2] == "| eps | jaxvol | jaxvol | on | eps / eps | 6 | 9 | 30.12 | 0.8123 | 12 |"
  assert lines[3].startswith("| full | jaxvol | jaxvol | off | x0 / v-space |")
  authors = sparse_ablation.table([dict(rec, variant="authors", layout="authors", sampler="authors",
                                        parameterization="x0", nfe=11)]).splitlines()[2]
  assert authors.startswith("| authors | authors | authors | on | x0 / v-space | 6 | 11 |")


def test_unknown_ablation_variant_is_an_error(tmp_path, monkeypatch):
  monkeypatch.setattr(sparse_ablation.experiment, "task_store", lambda *a, **k: "S")
  with pytest.raises(SystemExit, match="unknown variants"):
    sparse_ablation.main(["--out", str(tmp_path), "--variants", "full,nope"])
  assert isinstance(_args(sparse_ablation), argparse.Namespace)


def test_layout_flag_picks_the_unet_layout():
  assert sparse_speedup.make_config(_args(sparse_speedup), "S", dense=False).model.layout == (
      "authors")  # the sparse configs' default
  ours = sparse_speedup.make_config(_args(sparse_speedup, "--layout", "jaxvol"), "S", dense=False)
  assert ours.model.layout == "jaxvol"
