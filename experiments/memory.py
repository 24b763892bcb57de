"""Compiled memory and FLOPs of PPDM against full-resolution 3D diffusion, without running anything.

Usage::

  python experiments/memory.py --out DIR [--sizes 64,128,256] [--methods ...] [--batch 1]

For every volume size S, attention setting and method, the train step and the sampler are lowered
with abstract inputs only (`jax.ShapeDtypeStruct` and `jax.eval_shape`: nothing is allocated) and
compiled; XLA's `memory_analysis()` and `cost_analysis()` give the numbers (DESIGN.md section 6).
Bytes are per device: temp + arguments + outputs - aliased (`jaxvol.parallel.cost.compiled_cost`).

Methods, all with the same U-Net:
  full3d         full-resolution conditional DDPM (`jaxvol.methods.baselines.Full3D`), factor 1.
  full3d_remat   the same with `config.model.remat = "full"` (every ResBlock's activations are
                 recomputed in the backward pass): the fair baseline, since the obvious question is
                 why not just rematerialise. Factor 1.
  ppdm_r2        PPDM with puzzle factor 2: the U-Net runs on (S/2)^3 with 8x the end channels.
  ppdm_r4        PPDM with puzzle factor 4: (S/4)^3, 64x the end channels.
  wdm            wavelet diffusion on the 8 Haar sub-bands at (S/2)^3, factor 2.
With `--methods ldm,autoencoder,autoencoder_windows` (not in the default set):
  ldm            latent diffusion (jaxvol.methods.ldm): the U-Net on the (S/4)^3 latent of
                 MAISI's first-stage KL autoencoder (4 channels; width 64, multipliers (1, 2, 2));
                 its train step includes encoding the crop with the frozen encoder, its sampler
                 encoding the condition and decoding the whole volume.
  autoencoder    that autoencoder's own training step (L1 + KL) and reconstruction;
  autoencoder_windows  the same, decoding in blended 16^3-latent windows (the decode's peak
                 memory bounded by one window's).

Benchmark U-Net (overridable with --width/--mults/--res-blocks/--groups/--time-embed, for tests):
base width 32, channel multipliers (1, 2, 4, 4), 2 res blocks per level, GroupNorm groups 8,
time embedding 128, 4 attention heads, compute dtype float32 (CPU), batch 1, one condition and one
target channel, training crop = the whole volume S^3, AdamW state and EMA parameters included.

Two attention settings are reported (the "attention" field), as DESIGN.md section 6 asks:
  none     no self-attention anywhere. This is the honest ratio for the puzzle itself: every
           feature map shrinks by r^3 while only the first and last convolutions widen, so PPDM's
           train bytes approach 1/r^3 of full3d, floored by what does not shrink (parameters,
           AdamW moments, EMA, gradients: the same for every method).
  lowest   self-attention only at the lowest level (index len(mults) - 1: the down blocks there,
           the middle block and the up blocks there), as in the usual 3D diffusion U-Net middle
           block. Attention materialises heads x tokens^2 logits, and the token count differs:
           full3d attends over (S/8)^3 tokens, PPDM r=2 over (S/16)^3, r=4 over (S/32)^3, so the
           attention term shrinks by r^6 and, as it comes to dominate with growing S, so do the
           reductions.

Sampling: `jax.jit(method.sample)` with abstract parameters, a (1, S, S, S, 1) condition and a raw
PRNG key; 50 DDIM steps for full3d, full3d_remat and wdm (`config.diffusion.sample_steps`), 10 bridge
steps for PPDM (`config.ppdm.sample_steps`). Each sampler is one `lax.scan`, so its memory hardly
depends on the step count. Its FLOPs do, but XLA's cost analysis counts a loop body once: the
compiled `sample_gflops` is about one network evaluation plus the work outside the loop, whatever
the step count. Both numbers are reported as compiled; `sample_gflops_x_steps` (compiled FLOPs times
the step count) is the estimate of a whole sampling run.

XLA's CPU scheduler: by default it orders instructions for concurrency, not memory, and hoists the
recomputation that `jax.checkpoint` asks for into the forward pass, so rematerialisation saves
nothing and every peak is inflated. GPU and TPU compilers schedule to save memory, so when run as a
script with --scheduler memory (the default) this adds
`--xla_cpu_enable_concurrency_optimized_scheduler=false` to XLA_FLAGS before anything compiles.
XLA reads its flags once per process, so `main()` called in-process (the test) leaves XLA_FLAGS alone
and measures with whatever scheduler the process has. A tiny remat probe, compiled first, tells
which scheduler is in force; each record says so ("remat_effective").

Train step: `jaxvol.train.loop.build_everything` and `compile_step` on a one-device mesh (data =
spatial = model = 1; in a process with several devices, such as the test suite's fake ones, the mesh
takes the first).

Output: DIR/memory.json (a list of records, rewritten atomically after each record, so a partial
run leaves valid JSON), DIR/memory.md (the table), and the same table and headline ratios at 128^3
on stdout. A configuration that fails to compile keeps its error string in the record ("error")
with null numbers, and the run goes on.
"""

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from jaxvol import config as config_lib
from jaxvol import fileio
from jaxvol.models import layers
from jaxvol.parallel import cost as cost_lib
from jaxvol.train import loop

GIB = 2.0**30
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"

# name -> (config.method, puzzle/wavelet factor, remat policy)
VARIANTS = {
    "full3d": ("full3d", 1, "none"),
    "full3d_remat": ("full3d", 1, "full"),
    "ppdm_r2": ("ppdm", 2, "none"),
    "ppdm_r4": ("ppdm", 4, "none"),
    "wdm": ("wdm", 2, "none"),
    # Latent diffusion (jaxvol.methods.ldm): the same U-Net on the 4x-per-axis latent of MAISI's
    # first-stage autoencoder (config.autoencoder_size "paper"); its sampler encodes the
    # condition, runs DDIM-50 on the latent and decodes the whole volume.
    "ldm": ("ldm", 4, "none"),
    # That autoencoder alone: its training step, and its reconstruction (encode + decode) as the
    # "sample"; `_windows` decodes in blended 16^3-latent windows (autoencoder.decode_window).
    "autoencoder": ("autoencoder", 4, "none"),
    "autoencoder_windows": ("autoencoder", 4, "none"),
}
# Not in the default run (use --methods): the latent-diffusion rows.
DEFAULT_VARIANTS = ("full3d", "full3d_remat", "ppdm_r2", "ppdm_r4", "wdm")
DECODE_WINDOW = (16, 16, 16)
ATTENTION = ("none", "lowest")
FULL3D_SAMPLE_STEPS = 50
PPDM_SAMPLE_STEPS = 10
HEADLINE_SIZE = 128
TARGETS = {2: 7, 4: 30}  # PPDM factor -> required train-memory reduction against full3d


def int_list(text: str) -> list[int]:
  """'64,128' -> [64, 128] (an argparse type; shared by the experiments)."""
  return [int(v) for v in text.split(",") if v.strip()]


def str_list(text: str) -> list[str]:
  """'a, b' -> ['a', 'b'] (an argparse type; shared by the experiments)."""
  return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line (`argv` without the program name); exits with usage on bad values."""
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory for memory.json and memory.md")
  p.add_argument("--sizes", type=int_list, default=[64, 128, 256], help="volume sides, e.g. 64,128")
  p.add_argument("--methods", type=str_list, default=list(DEFAULT_VARIANTS),
                 help=f"comma-separated subset of {','.join(VARIANTS)}")
  p.add_argument("--attention", type=str_list, default=list(ATTENTION),
                 help="comma-separated subset of none,lowest")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--scheduler", choices=("memory", "default"), default="memory",
                 help="XLA CPU scheduler when run as a script: memory-minimising (like GPU/TPU) "
                 "or XLA's CPU default")
  p.add_argument("--width", type=int, default=32, help="U-Net base width")
  p.add_argument("--mults", type=int_list, default=[1, 2, 4, 4], help="U-Net channel multipliers")
  p.add_argument("--res-blocks", type=int, default=2)
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--time-embed", type=int, default=128)
  args = p.parse_args(argv)
  bad = [m for m in args.methods if m not in VARIANTS]
  if bad:
    p.error(f"unknown methods {bad}; choose from {list(VARIANTS)}")
  bad = [a for a in args.attention if a not in ATTENTION]
  if bad:
    p.error(f"unknown attention settings {bad}; choose from {list(ATTENTION)}")
  return args


def make_config(variant: str, size: int, attention: str, args: argparse.Namespace):
  """The experiment config for one record; only the method-specific fields differ between methods."""
  method, factor, remat = VARIANTS[variant]
  c = config_lib.base_config()
  c.method = method
  c.compute_dtype = "float32"
  c.data.inputs = ("cond",)
  c.data.batch_size = args.batch
  c.data.crop_size = (size, size, size)
  m = c.model
  m.base_width = args.width
  m.channel_mults = tuple(args.mults)
  m.num_res_blocks = args.res_blocks
  m.groups = args.groups
  m.time_embed_dim = args.time_embed
  m.attention_levels = (len(args.mults) - 1,) if attention == "lowest" else ()
  m.remat = remat
  if method == "ppdm":
    c.ppdm.factor = (factor,) * 3
  if method in ("ldm", "autoencoder"):
    config_lib.autoencoder_size(c, "paper")
  if method == "autoencoder":
    c.data.inputs = (c.data.target,)  # it reconstructs its input
  if variant == "autoencoder_windows":
    c.autoencoder.decode_window = DECODE_WINDOW
  c.ppdm.sample_steps = PPDM_SAMPLE_STEPS
  c.diffusion.sample_steps = FULL3D_SAMPLE_STEPS
  c.mesh.data = 1
  c.mesh.spatial = 1
  c.mesh.model = 1
  return c


def request_scheduler(kind: str) -> None:
  """Asks XLA (through XLA_FLAGS) for the memory-minimising CPU scheduler unless told otherwise.

  Only effective before the process's first compile; an explicit setting in XLA_FLAGS wins.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if kind == "memory" and SCHEDULER_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()


def remat_probe() -> bool:
  """True if `jax.checkpoint` lowers the compiled temp bytes of a tiny conv chain in this process."""

  def block(x, w):
    h = jax.lax.conv_general_dilated(jnp.tanh(x), w, (1, 1, 1), "SAME",
                                     dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return x + 2.0 * jnp.tanh(h)

  temp = {}
  for remat in (False, True):
    f = jax.checkpoint(block) if remat else block

    def loss(ws, x, f=f):
      for w in ws:
        x = f(x, w)
      return jnp.sum(x * x)

    ws = [jax.ShapeDtypeStruct((3, 3, 3, 4, 4), jnp.float32)] * 4
    x = jax.ShapeDtypeStruct((1, 8, 8, 8, 4), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  return temp[True] < temp[False]


def sample_steps(config) -> int:
  """Sampler steps the method's config asks for (1: the autoencoder's one reconstruction)."""
  if config.method == "autoencoder":
    return 1
  return int(config.ppdm.sample_steps if config.method == "ppdm" else config.diffusion.sample_steps)


def _plain(tree):
  """Abstract arrays without shardings, for a single-device compile."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)


def compile_sample(method, abstract_params, size: int, batch: int) -> dict:
  """Compiles `method.sample` for a (batch, S, S, S, C) condition; returns `compiled_cost`."""
  cond = jax.ShapeDtypeStruct((batch, size, size, size, method.cond_channels), jnp.float32)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  compiled = jax.jit(method.sample).lower(_plain(abstract_params), cond, key).compile()
  return cost_lib.compiled_cost(compiled)


def _error(exc: BaseException) -> str:
  """One line naming the exception, capped so a giant XLA message stays readable in the JSON."""
  text = f"{type(exc).__name__}: {exc}".strip()
  return text if len(text) <= 2000 else text[:2000] + " ..."


def measure(variant: str, size: int, attention: str, args: argparse.Namespace,
            remat_effective: bool | None = None) -> dict:
  """Compiles one configuration's train step and sampler; errors go into the record."""
  method_name, factor, _ = VARIANTS[variant]
  config = make_config(variant, size, attention, args)
  rec = {"method": variant if variant == "full3d_remat" else method_name, "variant": variant,
         "size": size, "factor": factor, "attention": attention,
         "train_bytes": None, "sample_bytes": None, "train_gflops": None, "sample_gflops": None,
         "params": None, "train_temp_bytes": None, "sample_temp_bytes": None,
         "sample_steps": sample_steps(config), "sample_gflops_x_steps": None,
         "train_compile_s": None, "sample_compile_s": None, "remat_effective": remat_effective,
         "error": None}
  errors = []
  try:
    parts = loop.build_everything(config, args.out)
  except Exception as exc:  # pylint: disable=broad-except
    rec["error"] = f"build: {_error(exc)}"
    return rec
  params = parts.abstract_state["params"]
  rec["params"] = int(sum(math.prod(p.shape) for p in jax.tree.leaves(params)))

  t0 = time.time()
  try:
    _, cost = loop.compile_step(parts, config)
    rec.update(train_bytes=cost["bytes"], train_temp_bytes=cost["temp_bytes"],
               train_gflops=cost["flops"] / 1e9)
  except Exception as exc:  # pylint: disable=broad-except
    errors.append(f"train: {_error(exc)}")
  rec["train_compile_s"] = round(time.time() - t0, 1)

  t0 = time.time()
  try:
    cost = compile_sample(parts.method, params, size, args.batch)
    rec.update(sample_bytes=cost["bytes"], sample_temp_bytes=cost["temp_bytes"],
               sample_gflops=cost["flops"] / 1e9,
               sample_gflops_x_steps=cost["flops"] / 1e9 * rec["sample_steps"])
  except Exception as exc:  # pylint: disable=broad-except
    errors.append(f"sample: {_error(exc)}")
  rec["sample_compile_s"] = round(time.time() - t0, 1)
  if errors:
    rec["error"] = "; ".join(errors)
  return rec


def write_json_atomic(path: str, obj) -> None:
  fileio.write_json_atomic(path, obj)


def _find(records, variant: str, size: int, attention: str):
  for r in records:
    if r["variant"] == variant and r["size"] == size and r["attention"] == attention:
      return r
  return None


def ratio(records, rec, key: str, baseline: str = "full3d"):
  """rec[key] / the baseline's rec[key] at the same size and attention; None if either is missing."""
  base = _find(records, baseline, rec["size"], rec["attention"])
  if base is None or not base.get(key) or rec.get(key) is None:
    return None
  return rec[key] / base[key]


def _fmt_ratio(x) -> str:
  """0.125 -> '0.125 (1/8.0)'; ratios above 0.9 without the reciprocal."""
  if x is None:
    return "-"
  if x < 0.9:
    return f"{x:.3f} (1/{1 / x:.1f})"
  return f"{x:.2f}"


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def unet_description(args: argparse.Namespace) -> str:
  """One paragraph naming the U-Net and sampling settings, for the table header."""
  return (f"U-Net: base width {args.width}, mults {tuple(args.mults)}, {args.res_blocks} res blocks "
          f"per level, groups {args.groups}, time embed {args.time_embed}, float32, batch "
          f"{args.batch}, 1 cond + 1 target channel, crop = whole volume. Attention 'lowest' = "
          f"self-attention at level {len(args.mults) - 1} only. Sampling: {FULL3D_SAMPLE_STEPS} DDIM "
          f"steps (full3d, wdm), {PPDM_SAMPLE_STEPS} bridge steps (ppdm); sample GFLOPs as compiled "
          f"count the scan body once (~ one network evaluation).")


def table(records, args: argparse.Namespace) -> str:
  """Markdown table; GiB per device and ratios to full3d at the same size and attention."""
  effective = {r.get("remat_effective") for r in records}
  scheduler = ("memory-minimising (remat lowers memory)" if effective == {True} else
               "XLA's CPU default (remat does not lower memory here)" if effective == {False} else
               "unknown")
  lines = [
      f"{unet_description(args)}",
      f"Bytes per device = temp + arguments + outputs - aliased; XLA CPU scheduler: {scheduler}.",
      "",
      "| size | attention | method | r | params (M) | train GiB | train / full3d | train / full3d_remat "
      "| sample GiB | sample / full3d | train GFLOPs | sample GFLOPs (compiled) | error |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    lines.append(
        f"| {r['size']}^3 | {r['attention']} | {r['variant']} | {r['factor']} "
        f"| {_fmt(r['params'] and r['params'] / 1e6, '.2f')} "
        f"| {_fmt(r['train_bytes'] and r['train_bytes'] / GIB, '.3f')} "
        f"| {_fmt_ratio(ratio(records, r, 'train_bytes'))} "
        f"| {_fmt_ratio(ratio(records, r, 'train_bytes', 'full3d_remat'))} "
        f"| {_fmt(r['sample_bytes'] and r['sample_bytes'] / GIB, '.3f')} "
        f"| {_fmt_ratio(ratio(records, r, 'sample_bytes'))} "
        f"| {_fmt(r['train_gflops'], '.1f')} | {_fmt(r['sample_gflops'], '.1f')} "
        f"| {(r['error'] or '')[:120].replace('|', '/')} |")
  return "\n".join(lines)


def headline(records, size: int = HEADLINE_SIZE) -> str:
  """PPDM train bytes against full3d and full3d_remat at one size, with the issue's targets."""
  lines = [f"Headline at {size}^3 (train bytes per device):"]
  for attention in ATTENTION:
    for variant, factor in (("ppdm_r2", 2), ("ppdm_r4", 4)):
      rec = _find(records, variant, size, attention)
      if rec is None:
        continue
      full = ratio(records, rec, "train_bytes")
      remat = ratio(records, rec, "train_bytes", "full3d_remat")
      target = TARGETS[factor]
      verdict = "-" if full is None else ("meets" if full <= 1 / target else "misses")
      lines.append(f"  attention={attention:6s} ppdm r={factor}: {_fmt_ratio(full)} of full3d "
                   f"({verdict} target <= 1/{target}), {_fmt_ratio(remat)} of full3d_remat")
  if len(lines) == 1:
    lines.append("  (no PPDM records at this size)")
  return "\n".join(lines)


def report(records, args: argparse.Namespace, command: str, machine: str) -> str:
  """The page OUT/memory.md holds (and docs/results/memory_cpu.md, experiments/results_pages.py):
  the command, the machine, the table and the headline ratios."""
  return (f"# Compiled memory and FLOPs per device\n\nCommand: `{command}`; machine: {machine}."
          f"\n\n{table(records, args)}\n\n{headline(records)}\n")


def main(argv=None) -> list[dict]:
  """Measures with convolutions compiled as XLA's 3D convolutions, as an accelerator runs them
  (not the CPU's folded form: jaxvol.models.layers.conv_implementation); `_main`."""
  with layers.using_conv("xla"):
    return _main(argv)


def _main(argv=None) -> list[dict]:
  """Runs the benchmark; returns the records also written to OUT/memory.json."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "memory.json")
  md_path = os.path.join(args.out, "memory.md")
  jobs = [(s, a, v) for s in args.sizes for a in args.attention for v in args.methods]
  print(f"{len(jobs)} configurations on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{unet_description(args)}", flush=True)
  remat_effective = remat_probe()
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; remat lowers memory in this process: "
        f"{remat_effective}", flush=True)
  if not remat_effective:
    print("WARNING: XLA's CPU scheduler hoists recomputation into the forward pass here, so "
          "full3d_remat will match full3d (see the module docstring)", flush=True)
  records = []
  start = time.time()
  for i, (size, attention, variant) in enumerate(jobs, 1):
    t0 = time.time()
    rec = measure(variant, size, attention, args, remat_effective)
    records.append(rec)
    write_json_atomic(json_path, records)
    if rec["train_bytes"] is not None or rec["sample_bytes"] is not None:
      summary = (f"train {_fmt(rec['train_bytes'] and rec['train_bytes'] / GIB, '.3f')} GiB, "
                 f"sample {_fmt(rec['sample_bytes'] and rec['sample_bytes'] / GIB, '.3f')} GiB")
    else:
      summary = "no numbers"
    if rec["error"]:
      summary += f" [error: {rec['error'][:200]}]"
    print(f"[{i}/{len(jobs)}] {variant} {size}^3 attention={attention}: {summary} "
          f"({time.time() - t0:.1f} s, elapsed {time.time() - start:.1f} s)", flush=True)
  md = table(records, args)
  command = " ".join(["python experiments/memory.py", *(argv if argv is not None else
                                                         sys.argv[1:])])
  machine = f"{jax.device_count()} {jax.devices()[0].platform} device(s), XLA's compiler"
  fileio.write_text_atomic(str(md_path), report(records, args, command, machine))
  print()
  print(md)
  print()
  print(headline(records))
  print(f"\ntotal {time.time() - start:.1f} s; wrote {json_path} and {md_path}", flush=True)
  return records


if __name__ == "__main__":
  request_scheduler(parse_args(sys.argv[1:]).scheduler)  # before the first compile
  main(sys.argv[1:])
