"""experiments/gpu_suite.py in --dry-run mode on CPU: every item, its numbers, guards and table."""

import contextlib
import io
import json

import pytest

from conftest import ROOT
from conftest import load_module

# End to end (training runs, subprocesses or experiments): `pytest -m 'not slow'` skips it.
pytestmark = pytest.mark.slow

SCRIPT = ROOT / "experiments" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
  return load_module(SCRIPT, "gpu_suite_experiment")


@pytest.fixture(scope="module")
def dry_run(suite, tmp_path_factory):
  """One whole dry run: (result, what gpu_suite.json holds, stdout)."""
  out = tmp_path_factory.mktemp("gpu_suite")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    result = suite.main(["--out", str(out), "--dry-run"])
  return result, json.loads((out / "gpu_suite.json").read_text()), stdout.getvalue()


def _items(result, group):
  return [r for r in result["items"] if r["group"] == group]


def test_every_item_ran_and_json_is_the_result(suite, dry_run):
  result, loaded, _ = dry_run
  assert loaded == json.loads(json.dumps(result))
  assert loaded["finished"] and loaded["dry_run"]
  planned = [it.name for it in suite.plan(suite.DRY, suite.GROUPS)]
  assert [r["item"] for r in loaded["items"]] == planned
  assert {r["group"] for r in loaded["items"]} == set(suite.GROUPS)
  for r in loaded["items"]:
    if r["group"] == "attention" and r["backend"] == "cudnn":
      assert r["status"] == "skipped" and "GPU" in r["reason"], r
    else:
      assert r["status"] == "ok", r
  env = loaded["environment"]
  assert env["platform"] == "cpu" and env["device_count"] >= 1
  assert env["jax"] and env["jaxlib"] and env["device_kind"]


def test_train_items_have_numbers_and_no_mfu_on_cpu(suite, dry_run):
  result, _, _ = dry_run
  train = _items(result, "train")
  assert [r["variant"] for r in train] == list(suite.TRAIN_ORDER)
  for r in train:
    assert r["size"] == 16 and r["compute_dtype"] == "float32"
    assert r["step_s"] > 0 and r["timed_steps"] == 2 and len(r["step_times_s"]) == 2
    assert r["steps_per_s"] == pytest.approx(1 / r["step_s"])
    assert r["compiled_bytes"] > 0 and r["flops"] > 0 and r["loss_finite"]
    assert r["achieved_tflops"] == pytest.approx(r["flops"] / r["step_s"] / 1e12)
    # CPU: no allocator statistics, no known peak.
    assert r["measured_peak_bytes"] is None and r["measured_over_compiled"] is None
    assert r["mfu"] is None and "unknown peak" in r["mfu_note"]
  # The puzzle shrinks the network's work (r = 4 runs the U-Net on 4^3 instead of 16^3).
  by = {r["variant"]: r for r in train}
  assert by["ppdm_r4"]["flops"] < by["ppdm_r2"]["flops"] < by["full3d"]["flops"]
  (mfu,) = _items(result, "mfu")
  assert mfu["mfu"] is None and "unknown peak" in mfu["mfu_note"]
  assert mfu["achieved_tflops"] == max(r["achieved_tflops"] for r in train)
  assert len(mfu["rows"]) == len(train)


def test_sampler_attention_loader_numbers(dry_run):
  result, _, _ = dry_run
  samplers = _items(result, "sampler")
  assert len(samplers) == 4
  for r in samplers:
    assert r["volumes_per_s"] > 0 and r["compiled_bytes"] > 0 and r["sample_steps"] == 3
    assert r["volumes_per_s"] == pytest.approx(1 / r["seconds_per_volume"])
  ran = [r for r in _items(result, "attention") if r["status"] == "ok"]
  assert {(r["backend"], r["tokens"]) for r in ran} == {(b, t) for b in ("chunked", "xla")
                                                       for t in (256, 512)}
  for r in ran:
    assert r["seconds"] > 0 and r["compiled_bytes"] > 0 and r["dtype"] == "bfloat16"
  # Plain XLA attention holds the logits; the chunked backend does not.
  xla = {r["tokens"]: r["compiled_bytes"] for r in ran if r["backend"] == "xla"}
  assert xla[512] > xla[256]
  loaders = _items(result, "loader")
  assert [r["workers"] for r in loaders] == [0, 1]
  full3d = next(r for r in _items(result, "train") if r["variant"] == "full3d")
  for r in loaders:
    assert r["batches_per_s"] > 0 and r["batch_shape"] == [1, 16, 16, 16, 1]
    assert r["full3d_steps_per_s"] == full3d["steps_per_s"]
    assert r["keeps_up"] == (r["batches_per_s"] >= full3d["steps_per_s"])


def test_table_printed(dry_run):
  result, _, stdout = dry_run
  assert "| item | status | s | result |" in stdout
  for r in result["items"]:
    assert f"| {r['item']} | {r['status']} |" in stdout


def test_failing_items_are_recorded_and_the_rest_runs(suite, tmp_path, monkeypatch):
  def broken_sampler(ctx, variant):
    raise RuntimeError(f"forced failure of {variant}")

  timed = suite._median_seconds
  calls = []

  def out_of_memory_once(*args, **kwargs):  # the first attention item fails after its compile
    calls.append(1)
    if len(calls) == 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: forced out of memory")
    return timed(*args, **kwargs)

  monkeypatch.setattr(suite, "run_sampler", broken_sampler)
  monkeypatch.setattr(suite, "_median_seconds", out_of_memory_once)
  with contextlib.redirect_stdout(io.StringIO()):
    result = suite.main(["--out", str(tmp_path), "--dry-run", "--only", "c,d"])
  assert {r["group"] for r in result["items"]} == {"sampler", "attention"}
  for r in _items(result, "sampler"):
    assert r["status"] == "error" and f"forced failure of {r['variant']}" in r["error"]
  ran = [r for r in _items(result, "attention") if r["backend"] != "cudnn"]
  failed, rest = ran[0], ran[1:]
  # It compiled before it failed: the item keeps its compiled bytes.
  assert failed["status"] == "error" and "RESOURCE_EXHAUSTED" in failed["error"]
  assert failed["compiled_bytes"] > 0 and "seconds" not in failed
  assert len(rest) == 3 and all(r["status"] == "ok" and r["seconds"] > 0 for r in rest)
  saved = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert [r["status"] for r in saved["items"]] == [r["status"] for r in result["items"]]


def test_time_budget_skips_the_rest(suite, tmp_path):
  with contextlib.redirect_stdout(io.StringIO()):
    result = suite.main(["--out", str(tmp_path), "--dry-run", "--only", "attention,mfu",
                         "--time-budget", "0"])
  assert result["items"] and all(r["status"] == "skipped" and "time budget" in r["reason"]
                                 for r in result["items"])


def test_peak_table_and_memory_deltas(suite):
  assert suite.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
  assert suite.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
  assert suite.peak_flops("NVIDIA H200")[0] == 989e12
  assert suite.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
  assert suite.peak_flops("NVIDIA L4")[0] == 121e12
  assert suite.peak_flops("NVIDIA L40S")[0] == 362e12
  peak, why = suite.peak_flops("cpu")
  assert peak is None and "unknown peak" in why
  mfu = suite._mfu_fields(2e12, 0.5, "NVIDIA A100-SXM4-40GB")
  assert mfu["achieved_tflops"] == pytest.approx(4.0) and mfu["mfu"] == pytest.approx(4 / 312)

  gib = 2**30
  # A new peak: the step's own high-water mark above what was in use before it.
  rec = suite._peak_fields({"bytes_in_use": 0, "peak_bytes_in_use": 1 * gib},
                           {"bytes_in_use": 1 * gib, "peak_bytes_in_use": 2 * gib},
                           {"bytes_in_use": 1 * gib, "peak_bytes_in_use": 7 * gib}, 4 * gib)
  assert rec["measured_peak_bytes"] == 6 * gib and rec["measured_over_compiled"] == 1.5
  assert rec["compile_peak_bytes"] == 2 * gib
  # No new peak: only a bound.
  rec = suite._peak_fields(None, {"bytes_in_use": 1 * gib, "peak_bytes_in_use": 9 * gib},
                           {"bytes_in_use": 1 * gib, "peak_bytes_in_use": 9 * gib}, 4 * gib)
  assert rec["measured_peak_bytes"] is None and rec["measured_peak_upper_bound_bytes"] == 8 * gib
  assert "upper bound" in rec["peak_note"]
  assert suite._peak_fields(None, None, None, 4 * gib)["measured_peak_bytes"] is None


def test_only_accepts_letters(suite):
  assert suite.parse_args(["--out", "x", "--only", "a,E,mfu"]).only == ["train", "loader", "mfu"]
  with pytest.raises(SystemExit):
    suite.parse_args(["--out", "x", "--only", "z"])

