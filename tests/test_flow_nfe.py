"""experiments/flow_nfe.py: equal-NFE sampler settings, the table's readings, and one tiny run of
each part end to end (full3d under both objectives on a PET store, PRDiT on a CT store)."""

import json

import numpy as np
import pytest

from jaxvol import config as base
from conftest import ROOT, load_module, write_ct_store, write_pet_store

exp = load_module(ROOT / "experiments" / "flow_nfe.py", "flow_nfe_under_test")


def test_samplers_spend_the_same_network_evaluations():
  args = exp.parse_args(["--out", "x", "--tasks", "pet_denoise", "--val-nfe", "6"])
  runs = {o: exp.run_config("pet_denoise", o, "STORE", 0, args) for o in exp.OBJECTIVES}
  assert runs["flow"].diffusion.objective == "flow" and runs["diffusion"].diffusion.objective == (
      "diffusion")
  # Validation at the same NFE under both objectives; everything else is the same recipe.
  assert runs["diffusion"].diffusion.sample_steps == runs["flow"].flow.sample_steps == 6
  assert runs["flow"].flow.solver == "euler"
  a, b = (json.loads(runs[o].to_json_best_effort()) for o in exp.OBJECTIVES)
  for part in ("model", "data", "train"):
    assert a[part] == b[part], part
  ddim = exp.sampler_config(runs["diffusion"], "diffusion", "ddim", 5)
  euler = exp.sampler_config(runs["flow"], "flow", "euler", 5)
  heun = exp.sampler_config(runs["flow"], "flow", "heun", 8)
  assert ddim.diffusion.sample_steps == 5 and ddim.diffusion.eta == 0.0
  assert (euler.flow.solver, euler.flow.sample_steps) == ("euler", 5)
  assert (heun.flow.solver, heun.flow.sample_steps) == ("heun", 4)  # 2 evaluations per step
  assert exp.sampler_config(runs["flow"], "flow", "heun", 5) is None
  assert runs["flow"].flow.sample_steps == 6  # the run's own config is left as it was
  v = exp.run_config("pet_denoise", "diffusion-v", "STORE", 0, args)
  assert (v.diffusion.objective, v.diffusion.parameterization) == ("diffusion", "v")
  assert runs["diffusion"].diffusion.parameterization == "eps"  # the recipe's
  assert exp.sampler_config(v, "diffusion-v", "ddim", 3).diffusion.sample_steps == 3
  assert exp.parse_args(["--out", "x", "--objectives", "flow,diffusion-x0"]).objectives == [
      "flow", "diffusion-x0"]
  with pytest.raises(SystemExit):
    exp.parse_args(["--out", "x", "--objectives", "diffusion-q"])
  gen = exp.gen_config("diffusion", 2, "STORE", 0, exp.parse_args(["--out", "x"]), "S1")
  assert gen.prdit.stage1_workdir == "S1" and gen.sample.metrics
  assert exp.gen_sampler_config(gen, "diffusion", "euler", 8).prdit.sample_steps == 8
  assert exp.gen_sampler_config(gen, "diffusion", "euler", 16) is None  # 16 does not divide 1000
  fl = exp.gen_config("flow", 1, "STORE", 0, exp.parse_args(["--out", "x"]))
  assert fl.diffusion.objective == "flow" and fl.prdit.stage == 1
  assert exp.gen_sampler_config(fl, "flow", "heun", 6).flow.sample_steps == 3


def test_table_reads_nfe_and_steps_to_a_quality():
  settings = {"steps": 10, "validate_every": 5, "patience": 2, "val_nfe": 4}

  def rec(obj, smp, nfe, psnr, refs=False):
    m = {"psnr": {"model": psnr}, "ssim": {"model": 0.5}, "hfen": {"model": 0.3}}
    if refs:
      for k, v in (("input", 20.0), ("gaussian", 25.0)):
        m["psnr"][k], m["ssim"][k] = v, 0.4
    return {"task": "pet_denoise", "objective": obj, "sampler": smp, "nfe": nfe, "seed": 0,
            "settings": settings, "metrics": m, "best_step": 10, "region": {}, "split": "test",
            "mask": "body", "data_range": [1.0],
            "references": {"gaussian": {"sigma": 1.0}} if refs else {}}

  records = [rec("diffusion", "ddim", 1, 10.0, refs=True), rec("diffusion", "ddim", 4, 24.0),
             rec("diffusion", "ddim", 8, 26.0), rec("flow", "euler", 1, 25.5),
             rec("flow", "euler", 4, 26.5), rec("flow", "euler", 8, 26.6),
             rec("flow", "heun", 4, 26.9), rec("flow", "heun", 8, 27.0)]
  runs = {f"pet_denoise/{o}/0": {"validation": v, "train_seconds": 60.0, "parameterization": p}
          for o, v, p in (("diffusion", [{"step": 5, "psnr": 20.0}, {"step": 10, "psnr": 24.0}],
                           "eps"),
                          ("flow", [{"step": 5, "psnr": 24.5}, {"step": 10, "psnr": 25.0}],
                           "velocity"))}
  assert exp.first_nfe([r for r in records if r["sampler"] == "euler"], 25.0) == 1
  assert exp.first_nfe([r for r in records if r["sampler"] == "ddim"], 30.0) is None
  assert exp.steps_to(runs["pet_denoise/flow/0"]["validation"], 24.0) == 5
  page = exp.markdown(records, runs)
  assert "| diffusion (eps head), ddim | 10 | 10.00 / 0.500 | 24.00 / 0.500 | 26.00 / 0.500 |" \
      in page
  assert "| flow (velocity head), heun | 10 | - | 26.90 / 0.500 | 27.00 / 0.500 |" in page
  # NFE to own best - 0.25 dB and to the best reference (the Gaussian, 25 dB).
  assert "| diffusion, ddim | 0 | 26.00 | 8 | 8 |" in page
  assert "| flow, euler | 0 | 26.60 | 4 | 1 |" in page
  # Steps to the lower of the two best validations (24 dB): 10 for diffusion, 5 for flow.
  assert "| 0 | 24.00 | 10 | 5 | 24.00 (10) | 25.00 (10) | 1.0 | 1.0 |" in page
  assert "--val-nfe 4 --nfe 1,4,8" in page


@pytest.mark.slow  # training runs: `pytest -m 'not slow'` skips it
def test_one_tiny_run_of_each_part_end_to_end(tmp_path, monkeypatch):
  (tmp_path / "pet").mkdir()
  (tmp_path / "ct").mkdir()
  stores = {"pet_denoise": write_pet_store(tmp_path / "pet", (24, 24, 32),
                                           ["train", "train", "val", "test"]),
            "ct_gen": write_ct_store(tmp_path / "ct", np.diag([2.0, 2.0, 2.0, 1.0]))}
  monkeypatch.setattr(exp.experiment, "task_store", lambda out, task, source: stores[task])
  run_config, gen_config = exp.run_config, exp.gen_config

  def tiny(task, objective, store, seed, args):
    c = run_config(task, objective, store, seed, args)
    base.smoke_overrides(c)
    c.inference.window, c.mesh.data = (), 1
    c.eval.references = "gaussian"
    c.train.steps, c.train.validate_every, c.train.checkpoint_every = 4, 2, 2
    return c

  def tiny_gen(objective, stage, store, seed, args, stage1=""):
    c = gen_config(objective, stage, store, seed, args, stage1)
    smoke = exp.experiment.packaged_config(
        "prdit_ct_gen", "smoke" + (",stage1" if stage == 1 else "")
        + (",flow" if objective == "flow" else ""))
    c.prdit, c.model, c.data.crop_size = smoke.prdit, smoke.model, smoke.data.crop_size
    c.prdit.stage1_workdir = stage1
    c.eval.feature_width, c.mesh.data = 4, 1
    return c

  monkeypatch.setattr(exp, "run_config", tiny)
  monkeypatch.setattr(exp, "gen_config", tiny_gen)
  out = tmp_path / "out"
  argv = ["--out", str(out), "--tasks", "pet_denoise,ct_gen", "--steps", "4",
          "--validate-every", "2", "--val-nfe", "2", "--nfe", "2", "--gen-steps", "2",
          "--gen-samples", "2"]
  records = exp.main(argv)
  got = {(r["task"], r["objective"], r["sampler"], r["nfe"]) for r in records}
  assert got == {("pet_denoise", "diffusion", "ddim", 2), ("pet_denoise", "flow", "euler", 2),
                 ("pet_denoise", "flow", "heun", 2), ("ct_gen", "diffusion", "euler", 2),
                 ("ct_gen", "flow", "euler", 2), ("ct_gen", "flow", "heun", 2)}
  pet = [r for r in records if r["task"] == "pet_denoise"]
  # The references once per task, on the first evaluation; whole test region, best checkpoint.
  assert sum(bool(r["references"]) for r in pet) == 1
  assert all(r["split"] == "test" and r["region"] == {"2": [0.6, 1.0]} for r in pet)
  saved = json.loads((out / "flow_nfe.json").read_text())
  for obj in exp.OBJECTIVES:
    run = saved["runs"][f"pet_denoise/{obj}/0"]
    best = max(run["validation"], key=lambda v: v["psnr"])["step"]
    assert all(r["best_step"] == best for r in pet if r["objective"] == obj)
    assert saved["runs"][f"ct_gen/{obj}/0"]["stage2_steps"] == 2
  gen = [r for r in records if r["task"] == "ct_gen"]
  assert all(np.isfinite(r["gen"]["fid"]) and r["gen"]["n_fake"] == 2 for r in gen)
  page = (out / "flow_nfe.md").read_text()
  assert "## pet_denoise" in page and "## ct_gen (PRDiT `cpu`, generation)" in page
  # A rerun with the same settings scores nothing again.
  monkeypatch.setattr(exp, "score", lambda *a, **k: pytest.fail("scored again"))
  monkeypatch.setattr(exp, "draw", lambda *a, **k: pytest.fail("drew again"))
  assert len(exp.main(argv)) == len(records)
