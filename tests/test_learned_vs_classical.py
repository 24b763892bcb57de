"""experiments/learned_vs_classical.py: recipes with disjoint validation and test sets, and one
tiny run end to end (validation-selected checkpoint, whole region, references, table)."""

import json
import pathlib

import pytest

from jaxvol import config as base
from jaxvol.data import pipeline
from jaxvol.eval import evaluate
from conftest import ROOT, load_module, write_pet_store

exp = load_module(ROOT / "experiments" / "learned_vs_classical.py", "lvc_under_test")


@pytest.mark.parametrize("task", exp.TASKS)
def test_recipes_validate_on_voxels_neither_trained_nor_tested(task):
  args = exp.parse_args(["--out", "x", "--tasks", task])
  for method in exp.METHODS[task]:
    c = exp.recipe(task, method, "STORE", 1, args)
    assert c.method == method and c.seed == 1 and c.eval.max_box == ()
    assert c.train.validate_every == args.validate_every and c.train.patience == args.patience
    val = evaluate.validation_config(c)  # raises if it overlaps the training crops
    # Validation and test: another split, or disjoint regions of one.
    assert (val.eval.split != c.eval.split
            or not pipeline.regions_overlap(val.data.eval_region, c.data.eval_region)), task
    if method == "regression":
      assert not c.model.stm


def test_another_method_takes_its_papers_choices_in_the_tasks_recipe():
  args = exp.parse_args(["--out", "x"])
  for task in ("pet_denoise", "mri_t1_t2"):
    assert exp.recipe(task, "wdm", "STORE", 0, args).diffusion.parameterization == "x0"
    assert exp.recipe(task, "full3d", "STORE", 0, args).diffusion.parameterization == "eps"


@pytest.mark.slow  # training runs: `pytest -m 'not slow'` skips it
def test_one_tiny_run_end_to_end(tmp_path, monkeypatch):
  (tmp_path / "data").mkdir()
  store = write_pet_store(tmp_path / "data", (24, 24, 32), ["train", "train", "val", "test"])
  monkeypatch.setattr(exp.experiment, "task_store", lambda out, task, source: store)
  recipe = exp.recipe

  def tiny(task, method, store_path, seed, args):
    c = recipe(task, method, store_path, seed, args)
    base.smoke_overrides(c)
    c.eval.max_box = ()
    c.inference.window = ()
    c.mesh.data = 1
    c.train.steps, c.train.validate_every, c.train.checkpoint_every = 4, 2, 2
    return c

  monkeypatch.setattr(exp, "recipe", tiny)
  out = tmp_path / "out"
  records = exp.main(["--out", str(out), "--tasks", "pet_denoise", "--methods", "ppdm",
                      "--seeds", "0,1", "--steps", "4", "--validate-every", "2"])
  assert [(r["method"], r["seed"]) for r in records] == [("ppdm", 0), ("ppdm", 1)]
  for r in records:
    assert r["best_step"] in (2, 4) and [v["step"] for v in r["validation"]] == [2, 4]
    best = max(r["validation"], key=lambda v: v["psnr"])
    assert r["best_step"] == best["step"]
    assert {"model", "input", "train_mean", "gaussian"} <= set(r["metrics"]["psnr"])
    assert r["region"] == {"2": [0.6, 1.0]} and r["split"] == "test"
  # One tuning per task, shared by its runs.
  assert records[0]["references"] == records[1]["references"]
  table = (out / "learned_vs_classical.md").read_text()
  assert "| ppdm | 2 |" in table and "best reference" in table
  saved = json.loads((out / "learned_vs_classical.json").read_text())["records"]
  assert len(saved) == 2
  # A rerun with the same settings finds every run done.
  monkeypatch.setattr(exp, "run_one", lambda *a, **k: pytest.fail("ran again"))
  common = ["--out", str(out), "--tasks", "pet_denoise", "--methods", "ppdm", "--seeds", "0",
            "--steps", "4", "--validate-every", "2"]
  assert len(exp.main(common[:-5] + ["0,1"] + common[-4:])) == 2
  # An inference-only variant re-scores seed 0's selected checkpoint with the flips: no training.
  flipped = exp.main(common + ["--infer-set", "inference.flip_axes=(0,)", "--infer-tag", "f"])
  (rec,) = [r for r in flipped if r["tag"] == "f"]
  assert rec["best_step"] == records[0]["best_step"] and rec["seed"] == 0
  assert [v["step"] for v in rec["validation"]] == [rec["best_step"]]
  assert rec["validation"][0]["psnr"] != next(v["psnr"] for v in records[0]["validation"]
                                              if v["step"] == rec["best_step"])
  summary = json.loads((out / "runs" / "pet_denoise" / "ppdm" / "seed0" / "eval-f" /
                        "summary.json").read_text())
  assert summary["checkpoint_step"] == rec["best_step"]
  assert rec["metrics"]["psnr"]["model"] == summary["metrics"]["psnr"]["model"]
  assert rec["references"] == records[0]["references"]
  assert (exp.command_of([rec]).endswith(
      "--infer-set inference.flip_axes=(0,) --infer-tag f"))
  assert "| ppdm [f] | 1 |" in (out / "learned_vs_classical.md").read_text()
  with pytest.raises(SystemExit, match="no finished run"):
    exp.main(common[:-5] + ["3"] + common[-4:] + ["--infer-set", "eval.samples=2",
                                                  "--infer-tag", "s2"])
  # In-sample scores (--fit) of seed 0 and of its flipped re-scoring: the training split's
  # training region, the selected step, kept in the record and tabled; nothing trains.
  fitted = exp.main(common + ["--fit"])
  fitted = exp.main(common + ["--fit", "--infer-tag", "f"])
  by_tag = {r["tag"]: r for r in fitted if r["seed"] == 0}
  for tag, folder in (("", "eval_fit"), ("f", "eval_fit-f")):
    fit = by_tag[tag]["fit"]
    summary = json.loads((out / "runs" / "pet_denoise" / "ppdm" / "seed0" / folder /
                          "summary.json").read_text())
    assert summary["split"] == "train" and summary["region"] == {"2": [0.0, 0.6]}
    assert summary["checkpoint_step"] == fit["step"] == by_tag[tag]["best_step"]
    assert fit["psnr"] == summary["metrics"]["psnr"] and set(fit["psnr"]) >= {"model", "input",
                                                                              "gaussian"}
  assert by_tag[""]["fit"]["psnr"]["model"] != by_tag["f"]["fit"]["psnr"]["model"]
  assert "fit" not in next(r for r in fitted if r["seed"] == 1 and r["tag"] == "")
  assert "In-sample (`--fit`)" in (out / "learned_vs_classical.md").read_text()
  with pytest.raises(SystemExit, match="no finished record"):
    exp.main(common[:-5] + ["3"] + common[-4:] + ["--fit"])
  # Validation-set scores (--val-references) of seed 0: the selected checkpoint scores on the
  # validation set what the loop recorded for it there, beside the floors and the references.
  scored = exp.main(common + ["--val-references"])
  v = next(r for r in scored if r["seed"] == 0 and r["tag"] == "")["val_scores"]
  summary = json.loads((out / "runs" / "pet_denoise" / "ppdm" / "seed0" / "eval_val" /
                        "summary.json").read_text())
  assert summary["split"] == "val" and v["split"] == "val" and v["step"] == records[0]["best_step"]
  assert v["psnr"]["model"] == pytest.approx(next(
      x["psnr"] for x in records[0]["validation"] if x["step"] == records[0]["best_step"]))
  assert {"input", "gaussian"} <= set(v["psnr"])
  page = (out / "learned_vs_classical.md").read_text()
  assert "Validation curves" in page and "(`--val-references`): input (floor)" in page
  assert (out / "learned_vs_classical_curves_pet_denoise.png").stat().st_size > 0
  with pytest.raises(SystemExit):
    exp.parse_args(common + ["--fit", "--val-references"])


def test_set_overrides_the_recipe_and_tag_keeps_the_variant_apart():
  args = exp.parse_args(["--out", "x", "--tasks", "demo", "--set", "ppdm.max_var=0.1",
                         "--set", "model.channel_mults=[1, 2]", "--set", "train.lr_schedule=cosine",
                         "--tag", "mv"])
  c = exp.recipe("demo", "ppdm", "STORE", 0, args)
  assert c.ppdm.max_var == 0.1 and c.model.channel_mults == (1, 2)
  assert c.train.lr_schedule == "cosine"
  with pytest.raises(SystemExit, match="no field 'max_varr'"):
    exp.recipe("demo", "ppdm", "STORE", 0,
               exp.parse_args(["--out", "x", "--set", "ppdm.max_varr=1", "--tag", "t"]))
  with pytest.raises(SystemExit):  # a variant without a name would mix with the recipe's rows
    exp.parse_args(["--out", "x", "--set", "ppdm.max_var=0.1"])
  metrics = {"psnr": {"model": 28.0, "input": 23.0, "gaussian": 27.0},
             "ssim": {"model": 0.8, "input": 0.6, "gaussian": 0.7},
             "hfen": {"model": 0.3, "input": 0.4, "gaussian": 0.35}}

  def record(tag, seed, psnr, val):
    m = json.loads(json.dumps(metrics))
    m["psnr"]["model"] = psnr
    return {"task": "demo", "method": "ppdm", "tag": tag, "seed": seed, "steps": 4,
            "best_step": 4, "metrics": m, "references": {"gaussian": {"sigma": 1.0}},
            "region": {}, "split": "test", "mask": "body", "data_range": [1.0],
            "validation": [{"step": 2, "psnr": val - 1}, {"step": 4, "psnr": val}],
            "settings": exp.settings_of(args if tag else exp.parse_args(["--out", "x"]))}

  table = exp.markdown([record("", 0, 28.0, 26.0), record("mv", 0, 29.0, 27.5)], args)
  assert "| ppdm | 1 | 28.00 |" in table and "| ppdm [mv] | 1 | 29.00 |" in table
  assert "| 27.50 |" in table  # the best validation PSNR, the column variants are chosen on
  assert "--set ppdm.max_var=0.1" in table and "--tag mv" in table


def test_a_records_config_and_workdir_are_rebuilt_from_its_settings():
  settings = {"steps": 4800, "validate_every": 400, "patience": 3, "lr": 0.0,
              "schedule": "constant", "set": ["ppdm.loss=l2"]}
  trained = {"task": "mri_t1_t2", "method": "ppdm", "tag": "l2", "seed": 2, "best_step": 800,
             "settings": settings}
  args = exp.args_of(trained, "OUT")
  assert exp.settings_of(args, "ppdm") == settings and args.tag == "l2" and not args.infer_tag
  c = exp.recipe("mri_t1_t2", "ppdm", "STORE", 2, args)
  assert c.ppdm.loss == "l2" and c.train.steps == 4800 and c.seed == 2
  assert str(exp.workdir_of(pathlib.Path("OUT"), trained)).endswith("runs/mri_t1_t2/ppdm-l2/seed2")
  # A re-scoring (TAG+NAME) lives in the run TAG; its --infer-set comes back with it.
  rescored = {**trained, "tag": "l2+f", "settings": {**settings, "infer_tag": "f",
                                                      "infer_set": ["inference.flip_axes=(0,1,2)"]}}
  args = exp.args_of(rescored, "OUT")
  assert args.tag == "l2" and args.infer_tag == "f"
  assert exp.overrides_of(args.infer_set) == {"inference.flip_axes": (0, 1, 2)}
  assert exp.workdir_of(pathlib.Path("OUT"), rescored) == exp.workdir_of(pathlib.Path("OUT"), trained)
  recipe_rescored = {**rescored, "tag": "f", "settings": {**rescored["settings"], "set": []}}
  assert str(exp.workdir_of(pathlib.Path("OUT"), recipe_rescored)).endswith("ppdm/seed2")


def test_fit_table_sets_in_sample_beside_held_out():
  def rec(seed, fit_model, held_model):
    return {"task": "ct_denoise", "method": "sparse", "tag": "", "seed": seed,
            "references": {"gaussian": {"sigma": 0.5}},
            "metrics": {"psnr": {"model": held_model, "input": 36.0, "gaussian": 34.0}},
            "fit": {"split": "train", "region": {"2": [0, 0.6]}, "step": 4,
                    "references": {"gaussian": {"sigma": 0.5}},
                    "psnr": {"model": fit_model, "input": 35.0, "gaussian": 34.5},
                    "ssim": {"model": 0.9, "input": 0.8, "gaussian": 0.85}}}
  lines = exp.fit_table([rec(0, 35.5, 34.0), rec(1, 35.7, 34.4),
                         {**rec(2, 0, 0), "fit": None}])
  text = "\n".join(lines)
  assert "split 'train'" in text
  assert "| input (floor) | - | 35.00 | 0.8000 | 36.00 | -1.00 |" in text
  assert "| sparse (seeds 0, 1) | 2 | 35.60 ± 0.10 | 0.9000 ± 0.0000 | 34.20 ± 0.20 | 1.40 ± 0.10 |" in text
  assert exp.fit_table([{**rec(0, 1, 1), "fit": None}]) == []


def test_a_tasks_runs_share_one_reference_tuning(tmp_path):
  task_dir, run = tmp_path / "runs" / "pet_denoise", tmp_path / "runs" / "pet_denoise" / "m" / "s0"
  run.mkdir(parents=True)
  cache = "references_tuned.json"
  (task_dir / cache).write_text(json.dumps({"a": {"gaussian": 1}}))
  (run / cache).write_text(json.dumps({"own": {"gaussian": 2}}))
  with exp.task_references(task_dir, run):
    # the task's tunings join the run's own before it is evaluated
    assert json.loads((run / cache).read_text()) == {"own": {"gaussian": 2}, "a": {"gaussian": 1}}
    (run / cache).write_text(json.dumps({"own": {"gaussian": 2}, "a": {"gaussian": 1},
                                         "new": {"gaussian": 3}}))
  assert json.loads((task_dir / cache).read_text()) == {"a": {"gaussian": 1}, "own": {
      "gaussian": 2}, "new": {"gaussian": 3}}
  # a tuning finished before a failure is shared; a task without a cache starts one
  (task_dir / cache).unlink()
  with pytest.raises(RuntimeError), exp.task_references(task_dir, run):
    raise RuntimeError("evaluation failed after the tuning")
  assert set(json.loads((task_dir / cache).read_text())) == {"own", "a", "new"}


def test_blocks_keep_the_task_order_when_runs_merge():
  records = [{"task": "mri_t1_t2"}, {"task": "zz_new"}, {"task": "demo"}, {"task": "ct_denoise"}]
  assert exp.tasks_of(records) == ["demo", "ct_denoise", "mri_t1_t2", "zz_new"]


def test_merge_joins_runs_made_apart_and_a_later_record_replaces_its_key(tmp_path, monkeypatch):
  def rec(tag, seed, psnr):
    return {"task": "demo", "method": "ppdm", "tag": tag, "seed": seed, "psnr": psnr}

  here, there = tmp_path / "here", tmp_path / "there"
  for d, recs in ((here, [rec("", 0, 1.0), rec("a", 0, 2.0)]),
                  (there, [rec("", 0, 3.0), rec("", 1, 4.0)])):
    d.mkdir()
    (d / "learned_vs_classical.json").write_text(json.dumps({"records": recs}))
  monkeypatch.setattr(exp, "markdown", lambda records, args: "table")  # tested above
  merged = exp.main(["--out", str(here), "--merge", str(there)])
  assert [(r["tag"], r["seed"], r["psnr"]) for r in merged] == [("a", 0, 2.0), ("", 0, 3.0),
                                                                 ("", 1, 4.0)]
  assert json.loads((here / "learned_vs_classical.json").read_text())["records"] == merged
  with pytest.raises(SystemExit, match="no learned_vs_classical.json"):
    exp.main(["--out", str(here), "--merge", str(tmp_path / "absent")])


@pytest.mark.parametrize("task", sorted(exp.LDM_CONFIGS))
def test_latent_diffusion_trains_its_autoencoder_first_and_reports_the_ceiling(task):
  args = exp.parse_args(["--out", "x", "--tasks", task, "--methods", "ldm", "--set",
                         "ldm.latent_scale=0.5", "--tag", "s"])
  ldm = exp.recipe(task, "ldm", "STORE", 0, args)
  ae = exp.recipe(task, exp.CEILING, "STORE", 0, args)
  assert ldm.method == "ldm" and ldm.ldm.latent_scale == 0.5
  assert ae.method == "autoencoder" and ae.data.inputs == (ae.data.target,)
  assert ae.data.target == ldm.data.target and ae.ldm.latent_scale == 1.0  # no --set: shared
  assert ae.eval.references == "" and not ae.eval.input_baseline
  for name in ("latent_channels", "factor", "width", "channel_mults", "groups"):
    assert ae.autoencoder[name] == ldm.autoencoder[name], name  # the same size token
  for c in (ldm, ae):
    evaluate.validation_config(c)  # raises if validation overlaps the training crops
    assert c.train.validate_every == args.validate_every and c.eval.max_box == ()
  assert "set" not in exp.settings_of(args, exp.CEILING) and "set" in exp.settings_of(args, "ldm")
  with pytest.raises(SystemExit, match="latent diffusion has configs"):
    exp.recipe("demo", "ldm", "STORE", 0, args)
  metrics = {"psnr": {"model": 27.0, "input": 23.0, "gaussian": 28.0},
             "ssim": {"model": 0.8, "input": 0.6, "gaussian": 0.7},
             "hfen": {"model": 0.3, "input": 0.4, "gaussian": 0.35}}
  common = {"task": task, "seed": 0, "steps": 4, "best_step": 4, "region": {}, "split": "test",
            "mask": "body", "data_range": [1.0], "validation": [{"step": 4, "psnr": 25.0}],
            "settings": exp.settings_of(args, "ldm")}
  ceiling = dict(common, method=exp.CEILING, tag="", references={},
                 metrics={k: {"model": v} for k, v in (("psnr", 33.0), ("ssim", 0.95),
                                                       ("hfen", 0.1))})
  model = dict(common, method="ldm", tag="s", metrics=metrics,
               references={"gaussian": {"sigma": 1.0}})
  table = exp.markdown([ceiling, model], args)
  assert "| ldm [s] | 1 | 27.00 |" in table and table.count("(best reference)") == 1
  assert "| autoencoder (ceiling of the latent models" in table and "| 33.00 |" in table
  assert "| -1.00 |" in table  # ldm - the Gaussian; the ceiling has no difference


def test_a_run_stopped_by_a_signal_ends_the_script_before_anything_is_scored(monkeypatch):
  """A killed or preempted training run must not be evaluated and recorded as finished."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(loop, "train", lambda c, w, validate=None: {"step": 3, "signal": 15,
                                                                   "stopped": "signal 15"})
  with pytest.raises(SystemExit) as stop:
    exp.experiment.train(None, "W")
  assert stop.value.code == 128 + 15
  monkeypatch.setattr(loop, "train", lambda c, w, validate=None: {"step": 4, "signal": None})
  assert exp.experiment.train(None, "W")["step"] == 4


def test_headline_takes_each_methods_variant_chosen_on_validation_not_on_test():
  def rec(method, tag, seed, test, val):
    return {"task": "demo", "method": method, "tag": tag, "seed": seed, "steps": 8,
            "best_step": 8, "references": {"gaussian": {"sigma": 1.0}},
            "metrics": {"psnr": {"model": test, "input": 20.0, "gaussian": 25.0},
                        "ssim": {"model": 0.8, "input": 0.5, "gaussian": 0.7}},
            "validation": [{"step": 8, "psnr": val}],
            "settings": {"steps": 8, "validate_every": 4, "patience": 2, "lr": 0.0,
                         "schedule": "constant"}}

  records = ([rec("ppdm", "a", s, 30.0, 20.0) for s in range(3)]      # best test, worse val
             + [rec("ppdm", "b", s, 26.0 + s, 21.0) for s in range(3)]  # better val: chosen
             + [rec("ppdm", "c", 0, 35.0, 40.0)]                        # one seed: not chosen
             + [rec("regression", "", s, 24.0, 19.0) for s in range(2)])
  assert exp.chosen_variants(records) == {"ppdm": "ppdm [b]", "regression": "regression"}
  # Two seeds are enough to be chosen; a method run with one seed only shows that one.
  two = [rec("ppdm", "d", s, 20.0, 30.0) for s in range(2)] + [rec("wdm", "", 0, 1.0, 1.0)]
  assert exp.chosen_variants(records + two) == {"ppdm": "ppdm [d]", "regression": "regression",
                                                "wdm": "wdm"}
  table = exp.headline(records)
  assert "| demo | ppdm [b] | 3 | 27.00 ± 0.82 |" in table and "ppdm [a]" not in table
  assert "| 2.00 ± 0.82 |" in table  # paired difference to the best reference (25 dB)
  assert "| demo | Gaussian blur (sigma 1, tuned on training data) | - | 25.00 |" in table
  assert "| demo | regression | 2 | 24.00 ± 0.00 |" in table
  assert ("- demo / ppdm [b]: `python experiments/learned_vs_classical.py --out DIR --tasks demo "
          "--methods ppdm --seeds 0,1,2 --steps 8 --validate-every 4 --patience 2 --tag b`" in table)


def test_validation_curves_follow_the_headline_variants_and_their_trained_runs(tmp_path):
  def rec(method, tag, seed, curve, infer=""):
    settings = {"steps": 8, "validate_every": 4, "patience": 2, "lr": 0.0, "schedule": "constant"}
    if infer:
      settings.update(infer_tag=infer, infer_set=["inference.flip_axes=(0,)"])
    return {"task": "pet_denoise", "method": method, "tag": tag, "seed": seed, "steps": 8,
            "best_step": 8, "references": {"gaussian": {"sigma": 1.0}},
            "metrics": {"psnr": {"model": 30.0, "input": 20.0, "gaussian": 25.0},
                        "ssim": {"model": 0.8, "input": 0.5, "gaussian": 0.7}},
            "validation": [{"step": s, "psnr": p} for s, p in curve], "settings": settings}

  records = [rec("ppdm", "", 0, [(4, 20.0), (8, 22.0)]), rec("ppdm", "", 1, [(4, 21.0), (8, 24.0)]),
             rec("ppdm", "", 2, [(4, 22.0)]),
             # regression's headline is an inference-only re-scoring (one validation): its curve
             # is the history of the run it re-scored
             rec("regression", "", 0, [(4, 25.0), (8, 26.0)]),
             rec("regression", "", 1, [(4, 25.0), (8, 26.0)]),
             rec("regression", "f", 0, [(8, 30.0)], infer="f"),
             rec("regression", "f", 1, [(8, 30.0)], infer="f")]
  assert exp.chosen_variants(records)["regression"] == "regression [f]"
  groups = exp.curve_groups(records)
  assert list(groups) == ["ppdm", "regression"] and len(groups["regression"]) == 2
  text = "\n".join(exp.curves_table(records))
  assert "split 'val', region {'2': [0.6, 1.0]}" in text
  assert "| 4 | 21.00 | 25.00 |" in text
  assert "| 8 | 23.00 (2) | 26.00 |" in text  # seed 2 stopped at step 4
  assert "--val-references" not in text  # none scored the references on validation yet
  records[0] = {**records[0], "val_scores": {
      "split": "val", "region": {"2": [0.6, 1.0]}, "step": 8,
      "references": {"gaussian": {"sigma": 1.0}, "bm4d": {"sigma": 0.5}},
      "psnr": {"model": 22.0, "input": 19.0, "gaussian": 24.0, "bm4d": 26.5},
      "ssim": {"model": 0.8, "input": 0.5, "gaussian": 0.7, "bm4d": 0.9}}}
  text = "\n".join(exp.curves_table(records))
  assert "input (floor) 19.00 dB; BM4D (sigma 0.5, tuned on training data) 26.50 dB" in text
  (path,) = exp.write_curves(records, tmp_path)
  assert path.name == "learned_vs_classical_curves_pet_denoise.png" and path.stat().st_size > 0
