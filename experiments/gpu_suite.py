"""Everything in jaxvol that needs an accelerator, measured in one call.

Usage::

  python experiments/gpu_suite.py --out DIR [--dry-run] [--only ITEMS] [--time-budget 450]

Meant for one H100/H200-class GPU, within about 8 minutes: the items below run in a fixed order,
and once --time-budget seconds (default 450) have passed, the items not yet started are recorded
as skipped (an item already running finishes, so leave a minute of margin). --only takes a
comma-separated subset of the groups (names or letters): a/train, b/mfu, c/sampler, d/attention,
e/loader. --dry-run runs every item at tiny sizes (16^3 volumes, width 8, 2 timed steps, 256 and
512 tokens, at most 1 loader worker, a 24^3 synthetic store): a CPU smoke test of the whole suite
in seconds, not a measurement.

  a. train       the train step (`jaxvol.train.loop.build_everything` + `compile_step`, the step
                 `loop.train` runs: AdamW and EMA included) of full3d, PPDM r=2, PPDM r=4 and WDM
                 with the benchmark U-Net of experiments/memory.py (its `make_config`: base width
                 32, multipliers (1, 2, 4, 4), 2 res blocks, no self-attention by default), batch 1,
                 at 128^3 and then at 256^3. Per item: the median wall time of ~10 steps after 2
                 warm-up steps (each step waited for with `block_until_ready`), XLA's compiled bytes
                 (temp + arguments + outputs - aliased), the measured peak device memory and their
                 ratio. The compute dtype is the config's "auto" (bfloat16 activations with float32
                 parameters on a GPU, float32 on CPU) unless --dtype says otherwise.
  b. mfu         achieved TFLOP/s of each train step (XLA's `cost_analysis()` FLOPs / median step
                 time) and MFU against the device's dense bfloat16 peak (`PEAK_BF16_FLOPS`, by
                 device kind; null with "unknown peak ..." for a device not listed, such as a CPU).
                 Also written into each train record.
  c. sampler     volumes per second of each method's `sample` (`jax.jit`, compiled and run once
                 before timing) on a 128^3 condition with the configs' step counts: 50 DDIM steps
                 for full3d and WDM, 10 bridge steps for PPDM.
  d. attention   forward + backward of one global attention layer (experiments/attention_bench.py's
                 `_fwd_bwd`), bfloat16, 4 heads x 64, batch 1, at 4,096 and 32,768 tokens (128^3
                 and 256^3 volumes with 8^3-voxel tokens): cuDNN flash attention
                 (`jax.nn.dot_product_attention(implementation="cudnn")`, the library's "cudnn"
                 backend; skipped with the reason off an NVIDIA GPU), the library's chunked
                 online-softmax attention and plain XLA attention. Median time and compiled bytes.
  e. loader      batches per second of `jaxvol.data.pipeline.make_train_iterator` (128^3 random
                 crops with flips, batch 1, the full3d inputs) with 0, 4 and 8 Grain workers, from a
                 store of synthetic 160^3 volumes written with the library's store writer
                 (`jaxvol.data.store.convert`) under DIR/store, against the full3d 128^3 step rate
                 of item a: a loader slower than the step starves the accelerator. The rate is
                 that of the second half of up to 100 batches after the first (Grain reads ahead,
                 so the first ones may come from its stock); the whole run's is kept too.

Order and peak memory: `memory_stats()["peak_bytes_in_use"]` only grows over a process's life and
cannot be reset, so the suite runs the train items from the lightest to the heaviest (PPDM r=4,
PPDM r=2, WDM, full3d), all at 128^3 first, then the samplers, the loader and the attention items
(whose peaks stay below the 256^3 train steps'), then the 256^3 train items, and last the plain XLA
attention at the most tokens (it holds 4 x 32,768^2 logits), then the MFU summary. The cheap items
thus come before the slow 256^3 compiles that the time budget may cut. Each train item records
the allocator's bytes in use and peak before its compile, before its first step and after its
last; when its steps set a new peak, `measured_peak_bytes` = peak after - bytes in use before the
first step (the item's own arrays: state, batch, temporaries; nothing of earlier items is kept)
and `measured_over_compiled` its ratio to XLA's compiled bytes. When they did not (an earlier
item, or the convolution autotuning of its own compile, peaked higher) both are null and
`measured_peak_upper_bound_bytes` says what is known. Off GPU `memory_stats()` is None: nulls.
Run as a script, the suite asks JAX for 95% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION,
unless already set; JAX's default is 75%) so that the 256^3 steps get their chance to fit.

Each item is guarded: an error (out of memory, an unsupported backend) is recorded in the item
("status": "error", "error": the message) and the suite goes on. DIR/gpu_suite.json (environment,
settings, one record per planned item, pending ones included) is rewritten atomically after every
item, so a run killed by a timeout keeps what finished; the table is printed at the end and
written to DIR/gpu_suite.md. Run as a script, compiled programs are cached under DIR/xla_cache
(JAX's persistent compilation cache), so a second run (say, with --only) skips most compiles.
"""

import argparse
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attention_bench  # noqa: E402  pylint: disable=wrong-import-position
import memory  # noqa: E402  pylint: disable=wrong-import-position
import sparse_common  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import fileio  # noqa: E402
from jaxvol import methods  # noqa: E402
from jaxvol.data import pipeline  # noqa: E402
from jaxvol.data import store as store_lib  # noqa: E402
from jaxvol.train import loop  # noqa: E402
from jaxvol.parallel import mesh as mesh_lib  # noqa: E402
from jaxvol.train import state as state_lib  # noqa: E402

GIB = 2.0**30
GROUPS = ("train", "mfu", "sampler", "attention", "loader")
LETTERS = {"a": "train", "b": "mfu", "c": "sampler", "d": "attention", "e": "loader"}
# Lightest first, so that each train item's peak memory is a new high (module docstring).
TRAIN_ORDER = ("ppdm_r4", "ppdm_r2", "wdm", "full3d")
ATTENTION_BACKENDS = ("cudnn", "chunked", "xla")

# Dense (no structured sparsity) bfloat16 tensor-core peak FLOP/s per device, from the vendors'
# data sheets. Matched against the words of `device.device_kind` ("NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-80GB", "TPU v5 lite"), in order: the first entry whose every word is one of the
# kind's wins, so the specific variants come before the generic name.
PEAK_BF16_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),        # SXM ("NVIDIA H100 80GB HBM3")
    (("GH200",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("H800",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("A800",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
    (("TPU", "v4"), 275e12),
    (("TPU", "v5", "lite"), 197e12),
    (("TPU", "v5e"), 197e12),
    (("TPU", "v5p"), 459e12),
    (("TPU", "v5"), 459e12),
    (("TPU", "v6"), 918e12),
)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sizes of one suite run (`FULL`, or `DRY` for --dry-run)."""

  train_sizes: tuple[int, ...]
  width: int
  mults: tuple[int, ...]
  res_blocks: int
  groups: int
  time_embed: int
  warmup_steps: int
  timed_steps: int
  max_timed_s: float  # stop timing an item earlier (at least 3 steps) once this is spent
  sample_size: int
  sample_steps: int | None  # None: the configs' (50 DDIM, 10 bridge)
  sample_repeats: int
  tokens: tuple[int, ...]
  heads: int
  head_dim: int
  chunk_size: int
  attention_repeats: int
  crop: int
  store_side: int
  store_volumes: int
  workers: tuple[int, ...]
  loader_batches: int
  max_loader_s: float


FULL = Settings(train_sizes=(128, 256), width=32, mults=(1, 2, 4, 4), res_blocks=2, groups=8,
                time_embed=128, warmup_steps=2, timed_steps=10, max_timed_s=30.0, sample_size=128,
                sample_steps=None, sample_repeats=3, tokens=(4096, 32768), heads=4, head_dim=64,
                chunk_size=512, attention_repeats=5, crop=128, store_side=160, store_volumes=4,
                workers=(0, 4, 8), loader_batches=100, max_loader_s=10.0)
DRY = Settings(train_sizes=(16,), width=8, mults=(1,), res_blocks=1, groups=4, time_embed=16,
               warmup_steps=1, timed_steps=2, max_timed_s=10.0, sample_size=16, sample_steps=3,
               sample_repeats=1, tokens=(256, 512), heads=2, head_dim=64, chunk_size=128,
               attention_repeats=2, crop=16, store_side=24, store_volumes=2, workers=(0, 1),
               loader_batches=8, max_loader_s=10.0)


# ------------------------------------------------------------------------------------------------
# Environment and small helpers.


def _cuda_versions() -> dict | None:
  """CUDA runtime / driver / cuDNN versions from jaxlib's CUDA plugin; None without it."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if cuda_versions is None:
    return None
  out = {}
  for name in ("cuda_runtime_get_version", "cuda_runtime_build_version", "cuda_driver_get_version",
               "cudnn_get_version", "cudnn_build_version", "cublas_get_version",
               "cusolver_get_version", "cufft_get_version"):
    fn = getattr(cuda_versions, name, None)
    if fn is not None:
      try:
        out[name.replace("_get_version", "").replace("_version", "")] = fn()
      except Exception as exc:  # pylint: disable=broad-except
        out[name] = f"error: {exc}"
  return out


def environment() -> dict:
  """Device (kind, count), JAX / jaxlib / CUDA versions and XLA_FLAGS of this process."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  d = devices[0]
  env = {"device": sparse_common.device_name(), "platform": d.platform,
         "device_kind": getattr(d, "device_kind", d.platform), "device_count": len(devices),
         "process_count": jax.process_count(), "jax": jax.__version__,
         "jaxlib": getattr(jaxlib, "__version__", None), "python": sys.version.split()[0],
         "platform_version": None, "cuda": _cuda_versions(), "memory_limit_bytes": None,
         "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
         "environment_info": None}
  try:
    env["platform_version"] = d.client.platform_version
  except Exception:  # pylint: disable=broad-except
    pass
  stats = memory_stats()
  if stats:
    env["memory_limit_bytes"] = stats.get("bytes_limit")
  try:
    env["environment_info"] = jax.print_environment_info(return_string=True)
  except Exception as exc:  # pylint: disable=broad-except
    env["environment_info"] = f"unavailable: {exc}"
  return env


def memory_stats() -> dict | None:
  """The first device's allocator statistics, or None where the backend keeps none (CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return dict(stats) if stats else None


def peak_flops(device_kind: str) -> tuple[float | None, str]:
  """(dense bfloat16 peak FLOP/s, what matched) for a device kind; (None, reason) if unknown."""
  words = set(device_kind.upper().replace("-", " ").split())
  for keys, flops in PEAK_BF16_FLOPS:
    if all(k.upper() in words for k in keys):
      return flops, " ".join(keys)
  return None, f"unknown peak for device kind {device_kind!r}"


def _error(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}".strip()
  return text if len(text) <= 2000 else text[:2000] + " ..."


def _median_seconds(run: Callable[[], Any], repeats: int, max_s: float, min_repeats: int = 3,
                    ) -> tuple[float, list[float]]:
  """Median wall seconds of `run()` (which must block until its result is ready)."""
  times = []
  start = time.perf_counter()
  for i in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
    if time.perf_counter() - start > max_s and i + 1 >= min(min_repeats, repeats):
      break
  return statistics.median(times), times


def unet_args(settings: Settings, out: str) -> argparse.Namespace:
  """experiments/memory.py's arguments for the suite's U-Net (its `make_config` reads them)."""
  return memory.parse_args([
      "--out", out, "--width", str(settings.width),
      "--mults", ",".join(str(m) for m in settings.mults),
      "--res-blocks", str(settings.res_blocks), "--groups", str(settings.groups),
      "--time-embed", str(settings.time_embed)])


@dataclasses.dataclass
class Context:
  """What the items share: settings, output folder and the records so far."""

  settings: Settings
  out: str
  dtype: str
  attention: str
  records: list = dataclasses.field(default_factory=list)
  store: str | None = None
  # The numbers of the item now running, written as they are measured, so that an item that fails
  # halfway keeps them (the compiled bytes of a step that then runs out of memory).
  live: dict = dataclasses.field(default_factory=dict)

  def make_config(self, variant: str, size: int):
    config = memory.make_config(variant, size, self.attention, unet_args(self.settings, self.out))
    config.compute_dtype = self.dtype
    if self.settings.sample_steps is not None:
      config.ppdm.sample_steps = config.diffusion.sample_steps = self.settings.sample_steps
    return config

  def find(self, group: str, **keys) -> dict | None:
    for r in self.records:
      if (r["group"] == group and r["status"] == "ok"
          and all(r.get(k) == v for k, v in keys.items())):
        return r
    return None


# ------------------------------------------------------------------------------------------------
# a + b: train steps.


def run_train(ctx: Context, variant: str, size: int) -> dict:
  """Compiles and times one train step; measured and compiled memory; TFLOP/s and MFU."""
  s = ctx.settings
  config = ctx.make_config(variant, size)
  rec = ctx.live
  rec.update(method=memory.VARIANTS[variant][0], factor=memory.VARIANTS[variant][1])
  before_compile = memory_stats()
  setup = loop.build_everything(config, ctx.out)
  rec["compute_dtype"] = str(np.dtype(setup.method.dtype))
  params = jax.tree.leaves(setup.abstract_state["params"])
  rec["params"] = int(sum(np.prod(p.shape) for p in params))
  t0 = time.perf_counter()
  compiled, cost = loop.compile_step(setup, config)
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  rec.update(compiled_bytes=cost.get("bytes"), compiled_temp_bytes=cost.get("temp_bytes"),
             flops=cost["flops"])
  before = memory_stats()

  state = state_lib.create_state(setup.method, setup.optimizer, jax.random.PRNGKey(0),
                                 setup.example, setup.state_sharding)
  bsh = mesh_lib.batch_sharding(setup.mesh)
  rng = np.random.default_rng(0)
  batch = {k: jax.device_put(rng.uniform(-1, 1, v.shape).astype(v.dtype), bsh)
           for k, v in setup.example.items()}
  key = jax.device_put(jax.random.PRNGKey(1), mesh_lib.replicated(setup.mesh))
  holder = {"state": state}
  del state

  def one_step():
    holder["state"], metrics = compiled(holder["state"], batch, key)
    jax.block_until_ready((holder["state"], metrics))
    holder["loss"] = metrics["loss"]

  for _ in range(s.warmup_steps):
    one_step()
  median, times = _median_seconds(one_step, s.timed_steps, s.max_timed_s)
  rec["loss_finite"] = bool(np.isfinite(float(holder["loss"])))
  after = memory_stats()
  del holder, batch
  gc.collect()

  rec.update(step_s=median, steps_per_s=1.0 / median, timed_steps=len(times),
             step_times_s=[round(t, 6) for t in times], warmup_steps=s.warmup_steps)
  rec.update(_peak_fields(before_compile, before, after, rec["compiled_bytes"]))
  rec.update(_mfu_fields(rec["flops"], median))
  return rec


def _peak_fields(before_compile, before, after, compiled_bytes) -> dict:
  """Measured peak bytes of one train item from allocator snapshots (module docstring)."""
  out = {"bytes_in_use_before": None, "peak_bytes_in_use_before": None,
         "peak_bytes_in_use_after": None, "compile_peak_bytes": None, "measured_peak_bytes": None,
         "measured_peak_upper_bound_bytes": None, "measured_over_compiled": None,
         "peak_note": None}
  if not (before and after and "peak_bytes_in_use" in after):
    out["peak_note"] = "memory_stats() unavailable on this backend"
    return out
  in_use, peak0, peak1 = (before.get("bytes_in_use", 0), before["peak_bytes_in_use"],
                          after["peak_bytes_in_use"])
  out.update(bytes_in_use_before=in_use, peak_bytes_in_use_before=peak0,
             peak_bytes_in_use_after=peak1)
  if before_compile and before_compile.get("peak_bytes_in_use", 0) < peak0:
    out["compile_peak_bytes"] = peak0 - before_compile.get("bytes_in_use", 0)
  if peak1 > peak0:
    out["measured_peak_bytes"] = peak1 - in_use
    if compiled_bytes:
      out["measured_over_compiled"] = out["measured_peak_bytes"] / compiled_bytes
  else:
    out["measured_peak_upper_bound_bytes"] = peak0 - in_use
    out["peak_note"] = ("no new peak: an earlier item (or this item's compile) peaked higher, so "
                        "only an upper bound is known")
  return out


def _mfu_fields(flops: float, step_s: float, device_kind: str | None = None) -> dict:
  kind = device_kind or getattr(jax.devices()[0], "device_kind", jax.default_backend())
  peak, source = peak_flops(kind)
  achieved = flops / step_s if flops and step_s else None
  return {"achieved_tflops": None if achieved is None else achieved / 1e12,
          "peak_tflops": None if peak is None else peak / 1e12,
          "mfu": None if peak is None or achieved is None else achieved / peak,
          "mfu_note": (f"dense bf16 peak of {source}" if peak is not None else source)}


def run_mfu(ctx: Context) -> dict:
  """Summary of item b over the train records so far (costs no device time)."""
  kind = getattr(jax.devices()[0], "device_kind", jax.default_backend())
  peak, source = peak_flops(kind)
  rows = [{"item": r["item"], "achieved_tflops": r.get("achieved_tflops"), "mfu": r.get("mfu"),
           "compute_dtype": r.get("compute_dtype")}
          for r in ctx.records if r["group"] == "train" and r["status"] == "ok"]
  if not rows:
    raise RuntimeError("no finished train item to compute MFU from")
  best = max(rows, key=lambda r: r["achieved_tflops"] or 0.0)
  return {"device_kind": kind, "peak_tflops": None if peak is None else peak / 1e12,
          "mfu": best["mfu"], "mfu_note": (f"dense bf16 peak of {source}" if peak is not None
                                           else source),
          "best_item": best["item"], "achieved_tflops": best["achieved_tflops"], "rows": rows}


# ------------------------------------------------------------------------------------------------
# c: samplers.


def run_sampler(ctx: Context, variant: str) -> dict:
  """Volumes per second of `jax.jit(method.sample)` on one condition of sample_size^3."""
  s = ctx.settings
  size = s.sample_size
  config = ctx.make_config(variant, size)
  method = methods.build(config, jax.devices()[0].platform)
  rec = ctx.live
  rec.update(method=memory.VARIANTS[variant][0], size=size, batch=1,
             sample_steps=memory.sample_steps(config), compute_dtype=str(np.dtype(method.dtype)))
  example = method.abstract_batch(1, (size,) * 3)
  # Random parameters drawn on the host: the sampler's speed does not depend on their values, and
  # this saves compiling the network's initialiser.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: jnp.asarray((0.02 * rng.standard_normal(a.shape)).astype(a.dtype)),
      method.param_shapes(example))
  cond = jax.random.uniform(jax.random.PRNGKey(1), example["cond"].shape, jnp.float32, -1, 1)
  key = jax.random.PRNGKey(2)
  t0 = time.perf_counter()
  compiled = jax.jit(method.sample).lower(params, cond, key).compile()
  cost = _cost(compiled)
  # XLA counts a loop body once: about one network evaluation (experiments/memory.py).
  rec.update(compile_s=round(time.perf_counter() - t0, 2), compiled_bytes=cost.get("bytes"),
             compiled_gflops_loop_body_once=cost["flops"] / 1e9)
  jax.block_until_ready(compiled(params, cond, key))  # warm
  median, times = _median_seconds(lambda: jax.block_until_ready(compiled(params, cond, key)),
                                  s.sample_repeats, s.max_timed_s, min_repeats=1)
  rec.update(seconds_per_volume=median, volumes_per_s=1.0 / median,
             seconds_per_network_eval=median / rec["sample_steps"], timed_runs=len(times))
  return rec


def _cost(compiled) -> dict:
  from jaxvol.parallel import cost as cost_lib  # pylint: disable=g-import-not-at-top
  return cost_lib.compiled_cost(compiled)


# ------------------------------------------------------------------------------------------------
# d: attention.


def run_attention(ctx: Context, backend: str, tokens: int) -> dict:
  """Median seconds and compiled bytes of attention forward + backward, bfloat16."""
  s = ctx.settings
  rec = ctx.live
  rec.update(backend=backend, tokens=tokens, heads=s.heads, head_dim=s.head_dim, batch=1,
             dtype="bfloat16", chunk_size=s.chunk_size if backend == "chunked" else None,
             attention_gflops=12.0 * s.heads * tokens**2 * s.head_dim / 1e9)
  if backend == "cudnn" and jax.default_backend() != "gpu":
    raise SkipItem(f"cuDNN attention needs an NVIDIA GPU; the JAX backend is "
                   f"{jax.default_backend()!r}")
  shape = (1, tokens, s.heads, s.head_dim)
  spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  t0 = time.perf_counter()
  fwd_bwd = attention_bench._fwd_bwd(backend, s.chunk_size)  # pylint: disable=protected-access
  compiled = fwd_bwd.lower(spec, spec, spec).compile()
  rec["compile_s"] = round(time.perf_counter() - t0, 2)
  cost = _cost(compiled)
  rec.update(compiled_bytes=cost.get("bytes"), compiled_temp_bytes=cost.get("temp_bytes"))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k, v = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
  run = lambda: jax.block_until_ready(compiled(q, k, v))
  run()
  run()
  median, times = _median_seconds(run, s.attention_repeats, s.max_timed_s)
  rec.update(seconds=median, timed_runs=len(times),
             attention_tflops=rec["attention_gflops"] / 1e3 / median)
  del q, k, v
  return rec


class SkipItem(Exception):
  """Raised by an item that cannot run here (recorded as skipped with the message)."""


# ------------------------------------------------------------------------------------------------
# e: Grain loader.


def synthetic_store(folder: str, side: int, count: int) -> str:
  """A store of `count` paired synthetic side^3 volumes (cond, target) under FOLDER/store.

  Smooth blobs plus noise, so the zarr chunks compress about as well as real scans do. Written as
  NIfTI and converted with `jaxvol.data.store.convert` (identity presets); reused when present.
  """
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  store = os.path.join(folder, "store")
  if os.path.exists(os.path.join(store, store_lib.MANIFEST)):
    return store
  src = os.path.join(folder, "store_nifti")
  os.makedirs(src, exist_ok=True)
  rng = np.random.default_rng(0)
  grid = np.linspace(-1, 1, side, dtype=np.float32)
  z, y, x = np.meshgrid(grid, grid, grid, indexing="ij")
  rows = []
  for i in range(count):
    c = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    blob = np.exp(-((z - c[0])**2 + (y - c[1])**2 + (x - c[2])**2) * 4).astype(np.float32)
    cond = blob + 0.05 * rng.standard_normal(blob.shape, np.float32)
    target = 0.5 * blob + 0.02 * rng.standard_normal(blob.shape, np.float32)
    names = {}
    for mod, arr in (("cond", cond), ("target", target)):
      names[mod] = f"{mod}{i}.nii"
      nib.save(nib.Nifti1Image(arr, np.eye(4)), os.path.join(src, names[mod]))
    rows.append({"subject": f"s{i}", "split": "train", **names})
  with open(os.path.join(src, "list.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f)
  store_lib.convert(os.path.join(src, "list.json"), store,
                    {"cond": "identity", "target": "identity"}, overwrite=True)
  shutil.rmtree(src, ignore_errors=True)  # the store is read on its own
  return store


def run_loader(ctx: Context, workers: int) -> dict:
  """Batches per second of the training iterator with `workers` Grain processes."""
  s = ctx.settings
  if ctx.store is None:
    t0 = time.perf_counter()
    ctx.store = synthetic_store(ctx.out, s.store_side, s.store_volumes)
    store_s = round(time.perf_counter() - t0, 2)
  else:
    store_s = 0.0
  config = ctx.make_config("full3d", s.crop)
  it = pipeline.make_train_iterator(ctx.store, "train", loop.modality_keys(config), (s.crop,) * 3,
                                    int(config.data.batch_size), seed=0, num_workers=workers,
                                    flips=True, process_index=0, process_count=1)
  try:
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    shape = list(first["target"].shape)
    stamps = [time.perf_counter()]
    while len(stamps) <= s.loader_batches:
      loop.assemble_batch(next(it), len(config.data.inputs))
      stamps.append(time.perf_counter())
      if stamps[-1] - stamps[0] > s.max_loader_s and len(stamps) > 4:
        break
  finally:
    del it  # stops the worker processes
    gc.collect()
  # Grain reads ahead (threads, worker buffers): the first batches after the first one may come
  # from that stock. The rate is that of the second half, when the stock is spent and every
  # batch waits for its production.
  n = len(stamps) - 1
  half = n // 2
  rate = (n - half) / (stamps[-1] - stamps[half])
  rec = {"workers": workers, "crop": s.crop, "batch": int(config.data.batch_size),
         "batch_shape": shape, "store": ctx.store, "store_volumes": s.store_volumes,
         "store_side": s.store_side, "store_build_s": store_s, "first_batch_s": round(first_s, 3),
         "batches": n, "batches_per_s": rate,
         "batches_per_s_all": n / (stamps[-1] - stamps[0]), "full3d_steps_per_s": None,
         "loader_over_step": None, "keeps_up": None, "note": None}
  train = ctx.find("train", variant="full3d", size=s.crop)
  if train is None:
    rec["note"] = f"no full3d {s.crop}^3 train item finished in this run to compare with"
  else:
    rec["full3d_steps_per_s"] = train["steps_per_s"]
    rec["loader_over_step"] = rate / train["steps_per_s"]
    rec["keeps_up"] = rate >= train["steps_per_s"]
  return rec


# ------------------------------------------------------------------------------------------------
# The plan, the runner and the table.


@dataclasses.dataclass
class Item:
  group: str
  name: str
  run: Callable[[Context], dict]
  keys: dict


def plan(settings: Settings, groups) -> list[Item]:
  """The suite's items in execution order (module docstring: why this order)."""
  items = []
  sizes = settings.train_sizes

  def train(size):
    for v in TRAIN_ORDER:
      items.append(Item("train", f"train {v} {size}^3",
                        lambda c, v=v, size=size: run_train(c, v, size),
                        {"variant": v, "size": size}))

  if "train" in groups:
    train(sizes[0])
  if "sampler" in groups:
    for v in TRAIN_ORDER:
      items.append(Item("sampler", f"sample {v} {settings.sample_size}^3",
                        lambda c, v=v: run_sampler(c, v), {"variant": v}))
  if "loader" in groups:
    for w in settings.workers:
      items.append(Item("loader", f"loader {w} workers {settings.crop}^3",
                        lambda c, w=w: run_loader(c, w), {}))
  attention = [(b, t) for t in settings.tokens for b in ATTENTION_BACKENDS]
  heaviest = attention.pop() if attention else None  # plain XLA at the most tokens: last of all

  def attend(b, tokens):
    items.append(Item("attention", f"attention {b} {tokens} tokens",
                      lambda c, b=b, tokens=tokens: run_attention(c, b, tokens),
                      {"backend": b, "tokens": tokens}))

  if "attention" in groups:
    for b, tokens in attention:
      attend(b, tokens)
  if "train" in groups:
    for size in sizes[1:]:
      train(size)
  if "attention" in groups and heaviest:
    attend(*heaviest)
  if "mfu" in groups:
    items.append(Item("mfu", "mfu of the train steps", run_mfu, {}))
  return items


def parse_groups(text: str) -> list[str]:
  out = []
  for g in memory.str_list(text):
    g = LETTERS.get(g.lower(), g.lower())
    if g not in GROUPS:
      raise argparse.ArgumentTypeError(f"unknown item {g!r}; choose from {','.join(GROUPS)} or a-e")
    out.append(g)
  return out


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output folder (gpu_suite.json, gpu_suite.md, store)")
  p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: a smoke test")
  p.add_argument("--only", type=parse_groups, default=list(GROUPS),
                 help="comma-separated groups: train,mfu,sampler,attention,loader (or a,b,c,d,e)")
  p.add_argument("--time-budget", type=float, default=450.0,
                 help="seconds; items not started by then are recorded as skipped")
  p.add_argument("--train-sizes", type=memory.int_list, default=None,
                 help="volume sides of the train items (default 128,256; 16 with --dry-run)")
  p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                 help="compute dtype of the U-Net methods (auto: bfloat16 on GPU/TPU)")
  p.add_argument("--attention", choices=memory.ATTENTION, default="none",
                 help="U-Net self-attention: none, or at the lowest level (experiments/memory.py)")
  return p.parse_args(argv)


def _fmt_bytes(n) -> str:
  if n is None:
    return "-"
  return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2.0**20:,.1f} MiB"


def _num(x, spec: str, scale: float = 1.0) -> str:
  return "-" if x is None else format(x * scale, spec)


def summary(r: dict) -> str:
  """One line of numbers for the table."""
  if r["status"] == "skipped":
    return f"skipped: {r.get('reason') or ''}"
  if r["status"] == "error":
    return f"error: {r['error'][:150]}"
  if r["status"] != "ok":
    return r["status"]
  g = r["group"]
  if g == "train":
    if r["measured_peak_bytes"] is not None:
      peak = (f"{_fmt_bytes(r['measured_peak_bytes'])} "
              f"(x{_num(r['measured_over_compiled'], '.2f')} of compiled)")
    elif r["measured_peak_upper_bound_bytes"] is not None:
      peak = f"<= {_fmt_bytes(r['measured_peak_upper_bound_bytes'])}"
    else:
      peak = "-"
    return (f"step {_num(r['step_s'], ',.1f', 1e3)} ms ({r['timed_steps']} timed), compiled "
            f"{_fmt_bytes(r['compiled_bytes'])}, measured peak {peak}, "
            f"{_num(r['achieved_tflops'], '.3g')} TFLOP/s, MFU {_num(r['mfu'], '.1%')}, "
            f"{r['compute_dtype']}")
  if g == "mfu":
    mfu = r["mfu_note"] if r["mfu"] is None else f"MFU {r['mfu']:.1%} ({r['mfu_note']})"
    return f"best {_num(r['achieved_tflops'], '.3g')} TFLOP/s ({r['best_item']}); {mfu}"
  if g == "sampler":
    return (f"{r['volumes_per_s']:,.3f} volumes/s ({r['seconds_per_volume']:,.2f} s/volume, "
            f"{r['sample_steps']} steps), compiled {_fmt_bytes(r['compiled_bytes'])}")
  if g == "attention":
    return (f"fwd+bwd {1e3 * r['seconds']:,.2f} ms ({r['attention_tflops']:.3g} TFLOP/s of "
            f"attention matmuls), compiled {_fmt_bytes(r['compiled_bytes'])}")
  if g == "loader":
    versus = ("" if r["full3d_steps_per_s"] is None else
              f" vs full3d {r['full3d_steps_per_s']:,.2f} steps/s: "
              f"{'keeps up' if r['keeps_up'] else 'too slow'}")
    return f"{r['batches_per_s']:,.2f} batches/s (first batch {r['first_batch_s']} s){versus}"
  return ""


def table(result: dict) -> str:
  env = result["environment"]
  cuda = env["cuda"] or {}
  versions = ", ".join(f"{k} {v}" for k, v in cuda.items() if k in ("cuda_runtime", "cudnn"))
  lines = [f"Device: {env['device']} ({env['device_kind']}), jax {env['jax']}, jaxlib "
           f"{env['jaxlib']}{', ' + versions if versions else ''}"
           f"{'; DRY RUN (tiny sizes)' if result['dry_run'] else ''}", "",
           "| item | status | s | result |", "|---|---|---:|---|"]
  for r in result["items"]:
    secs = "-" if r.get("seconds_total") is None else f"{r['seconds_total']:.1f}"
    lines.append(f"| {r['item']} | {r['status']} | {secs} | {summary(r).replace('|', '/')} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  """Runs the suite; returns what it writes to OUT/gpu_suite.json."""
  args = parse_args(argv)
  settings = DRY if args.dry_run else FULL
  if args.train_sizes:
    settings = dataclasses.replace(settings, train_sizes=tuple(args.train_sizes))
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "gpu_suite.json")
  start = time.time()
  ctx = Context(settings=settings, out=args.out, dtype=args.dtype, attention=args.attention)
  items = plan(settings, args.only)
  ctx.records = [{"group": it.group, "item": it.name, "status": "pending", **it.keys}
                 for it in items]
  result = {"suite": "gpu_suite", "dry_run": args.dry_run, "environment": environment(),
            "settings": {**dataclasses.asdict(settings), "dtype": args.dtype,
                         "unet_attention": args.attention, "time_budget_s": args.time_budget,
                         "only": args.only},
            "peak_memory_method": (
                "peak_bytes_in_use cannot be reset: train items run lightest first (PPDM r=4, "
                "PPDM r=2, WDM, full3d; 128^3 before 256^3); measured_peak_bytes = peak after the "
                "item - bytes in use before it, when the item set a new peak, else null with an "
                "upper bound"),
            "items": ctx.records, "elapsed_s": 0.0, "finished": False}
  print(f"gpu suite: {len(items)} items on {result['environment']['device']}, budget "
        f"{args.time_budget:g} s{' (dry run)' if args.dry_run else ''}", flush=True)
  fileio.write_json_atomic(json_path, result)
  for i, (it, rec) in enumerate(zip(items, ctx.records), 1):
    elapsed = time.time() - start
    if elapsed > args.time_budget:
      rec.update(status="skipped", reason=f"time budget of {args.time_budget:g} s spent "
                 f"({elapsed:.0f} s elapsed)")
    else:
      rec["status"] = "running"  # what a run killed mid-item shows
      fileio.write_json_atomic(json_path, result)
      ctx.live = {}
      t0 = time.time()
      try:
        rec.update(it.run(ctx))
        rec["status"] = "ok"
      except SkipItem as exc:
        rec.update(ctx.live, status="skipped", reason=str(exc))
      except Exception as exc:  # pylint: disable=broad-except
        rec.update(ctx.live, status="error", error=_error(exc),
                   traceback=traceback.format_exc(limit=8)[-4000:])
      rec["seconds_total"] = round(time.time() - t0, 2)
      gc.collect()
    result["elapsed_s"] = round(time.time() - start, 1)
    fileio.write_json_atomic(json_path, result)
    print(f"[{i}/{len(items)}] {it.name}: {summary(rec)} ({result['elapsed_s']:.0f} s)", flush=True)
  result["finished"] = True
  fileio.write_json_atomic(json_path, result)
  text = table(result)
  fileio.write_text_atomic(os.path.join(args.out, "gpu_suite.md"), text + "\n")
  print("\n" + text, flush=True)
  return result


if __name__ == "__main__":
  _args = parse_args(sys.argv[1:])
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # before the backend starts
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(_args.out, "xla_cache"))
  main(sys.argv[1:])
