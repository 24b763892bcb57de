"""The results pages in docs/results/ are what their records render (so no table can drift), and
the renderers read both the current and the older record formats. Pure-python renders: nothing
is compiled or run."""

import json

import pytest

from conftest import ROOT

import attention_memory  # noqa: E402  pylint: disable=wrong-import-position
import patch_prior  # noqa: E402  pylint: disable=wrong-import-position
import results_pages  # noqa: E402  pylint: disable=wrong-import-position
import sparse_ablation  # noqa: E402  pylint: disable=wrong-import-position
import sparse_speedup  # noqa: E402  pylint: disable=wrong-import-position
import spatial_scaling  # noqa: E402  pylint: disable=wrong-import-position

RESULTS = ROOT / "docs" / "results"


@pytest.mark.parametrize("stem", sorted(results_pages.PAGES))
def test_committed_page_is_what_its_record_renders(stem):
  page = RESULTS / f"{stem}.md"
  assert page.is_file(), f"{page} missing: run python experiments/results_pages.py"
  assert page.read_text() == results_pages.render(stem), (
      f"{page} differs from what {stem}.json renders: run python experiments/results_pages.py")


def test_new_pages_start_with_a_title_and_the_command():
  for stem, page in results_pages.PAGES.items():
    if page.script in ("learned_vs_classical", "curves", "memory_budget"):
      continue  # written in their scripts' own format
    lines = results_pages.render(stem).splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", stem
    assert lines[2].startswith("Command") and "`python" in lines[2] and "machine: " in lines[2], stem


def test_results_md_links_every_page():
  text = (ROOT / "docs" / "results.md").read_text()
  missing = [stem for stem in results_pages.PAGES if f"](results/{stem}.md)" not in text]
  assert not missing, f"docs/results.md does not link these pages: {missing}"


def test_check_reports_a_stale_page(tmp_path, capsys):
  for stem in ("sparse_ablation_authors_cpu", "sparse_speedup_cpu"):
    (tmp_path / f"{stem}.json").write_text((RESULTS / f"{stem}.json").read_text())
  assert results_pages.main(["--folder", str(tmp_path), "--check",
                             "sparse_ablation_authors_cpu"]) == 1
  assert "sparse_ablation_authors_cpu.md" in capsys.readouterr().out
  assert results_pages.main(["--folder", str(tmp_path), "sparse_ablation_authors_cpu"]) == 0
  assert results_pages.main(["--folder", str(tmp_path), "--check",
                             "sparse_ablation_authors_cpu"]) == 0
  assert (tmp_path / "sparse_ablation_authors_cpu.md").read_text() == (
      RESULTS / "sparse_ablation_authors_cpu.md").read_text()


def _speedup_record(old_names: bool) -> dict:
  curve = lambda p0: [{"step": s, "train_seconds": s / 10, "loss": 0.1, "psnr": p0 + s / 100,
                       "ssim": 0.5} for s in (100, 200)]
  heun, heun_x0 = (("sparse_heun_nofinal", "sparse_heun") if old_names
                   else ("sparse_heun", "sparse_heun_final_x0"))
  matrix = {f"{m}/{k}": {"psnr": v, "ssim": 0.5} for m in ("sparse", "dense")
            for k, v in ((heun, 30.0), (heun_x0, 25.0), ("ddim50", 26.0))}
  matrix["input"] = {"psnr": 28.0, "ssim": 0.6}
  rec = {"steps_speedup": 2.0, "time_speedup": 1.5, "sample_speedup_vs_ddim50": 5.0,
         "sample_speedup_vs_ddpm1000": 100.0, "nfe": {"sparse_heun": 9, "ddim50": 50,
                                                      "ddpm1000": 1000},
         "sample_seconds": {"sparse_heun": 0.01, "ddim50": 0.05, "ddpm1000": 1.0},
         "dense_final_psnr": 22.0, "sparse_final_psnr": 23.0,
         "sparse_reached_at": {"step": 100}, "sampler_matrix": matrix,
         "curves": {"sparse": curve(22.0), "dense": curve(20.0)},
         "setup": {"task": "ct_denoise", "steps": 200, "eval_every": 100, "crop": 16, "width": 8,
                   "batch": 2, "lr": 5e-4, "val_crops": 2, "timing_batch": 1, "device": "cpu"}}
  if not old_names:
    rec["command"] = "python experiments/sparse_speedup.py --out X"
  return rec


def test_speedup_report_of_a_tiny_record():
  page = sparse_speedup.report(_speedup_record(old_names=False))
  assert page.startswith("# Sparse voxel-space diffusion: training and sampling speed-up "
                         "(ct_denoise)\n\nCommand: `python experiments/sparse_speedup.py --out X`"
                         "; machine: cpu.")
  assert "| dense final PSNR (200 steps) | 22.00 dB |" in page
  assert "| NFE sparse / authors / DDIM-50 / DDPM-1000 | 9 / - / 50 / 1000 |" in page
  assert "| sparse-trained | 30.00 (0.500) | 25.00 (0.500) | 26.00 (0.500) |" in page
  assert "| 200 | 24.00 | 0.5000 | 20.0 | 22.00 | 0.5000 | 20.0 |" in page
  assert "earlier" not in page and "before the authors' sampler" not in page
  # The older record names the same samplers differently: the same table, and a note saying so.
  old = sparse_speedup.report(_speedup_record(old_names=True), command="CMD")
  assert "| sparse-trained | 30.00 (0.500) | 25.00 (0.500) | 26.00 (0.500) |" in old
  assert "Command: `CMD`" in old and "`sparse_heun_nofinal` is the sparse Heun column" in old


def test_speedup_summary_table_is_what_main_prints():
  table = sparse_speedup.summary_table(_speedup_record(old_names=False))
  assert table.splitlines()[:4] == [
      "| quantity | value |", "|---|---|", "| dense final PSNR (200 steps) | 22.00 dB |",
      "| sparse final PSNR (200 steps) | 23.00 dB |"]
  assert table.endswith("| sampling speed-up vs DDIM-50 | 5.0x |")


def test_ablation_report_of_a_tiny_record():
  rec = {"variant": "full", "stm": True, "parameterization": "x0", "f_steps": 5, "nfe": 9,
         "psnr": 30.0, "ssim": 0.8, "train_seconds": 10.0, "steps": 50, "task": "ct_denoise",
         "crop": 16, "width": 8, "device": "cpu", "input_psnr": 28.0, "input_ssim": 0.6,
         "command": "python experiments/sparse_ablation.py --out X"}
  page = sparse_ablation.report([rec, dict(rec, variant="no_stm", stm=False)])
  assert page.splitlines()[0] == "# Sparse diffusion ablation (ct_denoise)"
  assert "Command: `python experiments/sparse_ablation.py --out X`; machine: cpu." in page
  assert "| (degraded input) | | | | | | | 28.00 | 0.6000 | |" in page
  assert "| no_stm | jaxvol | jaxvol | off |" in page
  # An older record (no input, no command): both given, and the input's source named.
  old = {k: v for k, v in rec.items() if k not in ("input_psnr", "input_ssim", "command")}
  page = sparse_ablation.report([old], command="CMD", inputs={"psnr": 27.0, "ssim": 0.5},
                                inputs_source="other.json")
  assert "Command: `CMD`" in page and "| 27.00 | 0.5000 |" in page and "other.json" in page
  assert "(degraded input)" not in sparse_ablation.report([old], command="CMD")


def test_patch_prior_report_of_a_tiny_record():
  run = {"task": "sr_x2", "size": [8, 8, 8], "steps": 2, "checkpoint_step": 5, "solver": "tv",
         "prior": "tv", "bytes": 2**20, "seconds": 1.0, "psnr": 20.0, "ssim": 0.5}
  pat = dict(run, solver="diffpir", prior="patch", bytes=2**20, psnr=21.0)
  who = dict(pat, prior="whole", bytes=2**22, psnr=21.5)
  mem = dict(pat, size=[16, 16, 16], seconds=None, psnr=None, ssim=None, compile_only=True)
  page = patch_prior.report({"device": "cpu", "variant": "cpu", "steps": 2, "noise_std": 0.01,
                             "size": [8, 8, 8], "overlap": 0.25, "records": [run, pat, who, mem],
                             "command": "python experiments/patch_prior.py --out X"})
  assert "position channels: none; checkpoint sr_x2: step 5" in page
  assert "## Reconstructions" in page and "## Compile-only memory" in page
  assert "| sr_x2 | 16x16x16 | diffpir | patch | 1.0 | - | - | - |" in page
  assert "- sr_x2 diffpir: patch uses 75% less memory" in page


def test_attention_memory_report_of_a_tiny_record():
  attn = {"kind": "attention", "backend": "chunked", "tokens": 8, "size": 16, "heads": 2,
          "head_dim": 4, "batch": 1, "dtype": "float32", "bytes": 2e9, "gflops": 1.0,
          "compile_s": 0.1, "skipped": None, "platform": "cpu", "command": "CMD"}
  step = dict(attn, kind="train_step", model="PRDiT-T", remat="full", size=256,
              bytes=12e9)
  page = attention_memory.report([attn, step])
  assert "Command: `CMD`; machine: the cpu backend" in page
  assert "2 heads x 4, batch 1, float32" in page
  assert "| attention | chunked | 8 | 16^3 | 2.000 GB |" in page
  assert "chunked 12.00 GB per device (meets the <= 40 GB target)" in page
  assert "per device (meets" not in attention_memory.report([attn])


def test_spatial_scaling_report_splits_the_layouts():
  base = {"method": "ppdm", "size": 32, "train_bytes": 2**30, "sample_bytes": 2**29,
          "state_bytes": 2**20, "state_device_bytes": 2**20, "whole_volume_all_gathers": 0,
          "error": None}
  records = [dict(base, shards=1, state_sharding="replicated"),
             dict(base, shards=2, state_sharding="replicated", train_bytes=2**29),
             dict(base, shards=1, state_sharding="zero1", train_bytes=2**31),
             dict(base, shards=2, state_sharding="zero1", train_bytes=2**29)]
  page = spatial_scaling.report(records, commands=["A", "B"], machine="2 fake CPU devices")
  assert "Commands: `A`; `B`; machine: 2 fake CPU devices." in page
  zero1 = page.split("## Train state layout: zero1")[1]
  assert "| ppdm | 32^3 | 2 | 0.500 | 0.250 |" in zero1  # its own one-shard base, not replicated's
  assert "train state layout zero1" in zero1
  # A record that names its command: the network settings are read from it.
  rec = dict(records[0], command="python experiments/spatial_scaling.py --out X --width 4",
             machine="1 cpu device(s)")
  page = spatial_scaling.report([rec])
  assert "U-Net: base width 4," in page and "## Train state layout" not in page
  assert "machine: 1 cpu device(s)." in page


def test_evaluation_summary_page():
  summary = {"method": "sparse", "checkpoint_step": 7, "split": "test", "n_volumes": 1,
             "mask": "body", "region": None, "data_range": [2.0], "seconds_per_volume": 3.0,
             "metrics": {"psnr": {"model": 30.0, "input": 25.0}, "mae": {"model": 1.26,
                                                                      "input": 2.0}}}
  page = results_pages.evaluation_summary(summary, "T", ["a", "b"], "cpu", {"input": "in"})
  assert page.splitlines()[:3] == ["# T", "", "Commands: `a`; `b`; machine: cpu."]
  assert "| in | 25.00 | 2.0 |\n| model | 30.00 | 1.3 |" in page


def test_committed_records_keep_their_numbers():
  """The renderers read the committed records as they are (older key names included)."""
  h100 = json.loads((RESULTS / "sparse_speedup_h100.json").read_text())
  assert "sparse/sparse_heun_nofinal" in h100["sampler_matrix"]
  assert "| sparse-trained | 33.87 (0.835) |" in results_pages.render("sparse_speedup_h100")
