"""Per-device memory of full-resolution training and sampling with one volume split over N devices.

Usage::

  python experiments/spatial_scaling.py --out DIR [--sizes 128,256] [--shards 1,2,4,8]
      [--methods full3d,ppdm,sparse] [--width 32 --mults 1,2,4,4 --res-blocks 2]
      [--state-sharding replicated|zero1|fsdp]

For every method, volume side S and shard count N, the library's own train step
(`jaxvol.train.loop.build_everything` + `compile_step`, the step `loop.train` runs) and its own
spatially sharded sampler (`jaxvol.eval.samplers.jit_sample`: the whole sampling loop, one
`lax.scan`, so its memory is that of one network evaluation plus the loop's carry) are compiled
on a mesh data = 1, spatial = N, model = 1, from abstract shapes only: nothing is allocated and
nothing runs. Bytes per device = temp + arguments + outputs - aliased (DESIGN.md section 6).
The headline is the ratio (bytes at N shards) / (bytes at 1 shard) against the ideal 1/N and the
target 1.2/N: what does not shrink (the replicated parameters, AdamW moments and EMA, and the
convolution halos) is what separates the two. --state-sharding sets config.mesh.state_sharding
(jaxvol.parallel.sharding.state_layouts) for every record: "zero1" splits the moments and the EMA copy
over the N devices, "fsdp" the parameters too; one shard is the same in every mode. The sampler
takes the parameters in the method's own (replicated) layout, as evaluation does, in every mode.

Network (memory.py's benchmark U-Net, no self-attention anywhere): base width 32, channel
multipliers (1, 2, 4, 4), 2 res blocks per level, GroupNorm groups 8, time embedding 128, float32,
batch 1, one condition and one target channel, training crop = the whole volume S^3. Methods:
full3d (full-resolution DDPM, 3 DDIM steps in the sampler: memory does not depend on the count),
ppdm (puzzle factor 2, 3 bridge steps) and sparse (STM on, 2 sparse levels with Heun, the
default 128-wide structure code).

Devices: run as a script it sets XLA_FLAGS to max(--shards) fake CPU devices before JAX is
imported (and LLVM optimisation level 0, for compile speed: the bytes do not change), and asks for
XLA's memory-minimising CPU scheduler (experiments/memory.py), which, like the GPU and TPU
compilers, orders work to save memory. A configuration that fails to compile keeps
its error in the record and the run goes on.

Output: DIR/spatial_scaling.json, a list of records {method, size, shards, state_sharding,
train_bytes, sample_bytes, state_bytes (all devices), state_device_bytes (one device), ...}
rewritten atomically after each one ("sample_kind": "loop" says that the sampler figure is the
whole compiled loop; "command" and "machine" the command line and the devices),
DIR/spatial_scaling.md (the results page, `report`, which renders it from the JSON alone) and the
table on stdout.
"""

import argparse
import math
import os
import re
import shlex
import sys
import time


def _int_list(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def _str_list(text: str) -> list[str]:
  return [v.strip() for v in text.split(",") if v.strip()]


METHODS = ("full3d", "ppdm", "sparse")


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line (`argv` without the program name)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--sizes", type=_int_list, default=[128, 256], help="volume sides")
  p.add_argument("--shards", type=_int_list, default=[1, 2, 4, 8], help="spatial shard counts")
  p.add_argument("--methods", type=_str_list, default=list(METHODS),
                 help=f"comma-separated subset of {','.join(METHODS)}")
  p.add_argument("--scheduler", choices=("memory", "default"), default="memory",
                 help="XLA CPU scheduler when run as a script")
  p.add_argument("--width", type=int, default=32)
  p.add_argument("--mults", type=_int_list, default=[1, 2, 4, 4])
  p.add_argument("--res-blocks", type=int, default=2)
  p.add_argument("--groups", type=int, default=8)
  p.add_argument("--time-embed", type=int, default=128)
  p.add_argument("--stm-dim", type=int, default=128)
  p.add_argument("--state-sharding", choices=("replicated", "zero1", "fsdp"), default="replicated",
                 help="config.mesh.state_sharding: the train state's layout over the N devices")
  args = p.parse_args(argv)
  bad = [m for m in args.methods if m not in METHODS]
  if bad:
    p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
  if 1 not in args.shards:
    args.shards = [1] + args.shards  # the ratios need the one-device figure
  return args


if __name__ == "__main__":
  # Before JAX is imported: one fake CPU device per shard of the largest split. LLVM optimisation
  # level 0 compiles 2-3x faster; it only changes machine code, not XLA's buffer assignment, so
  # the bytes are the same (checked: identical train and sample bytes at 32^3, N = 1 and 2).
  _flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                  os.environ.get("XLA_FLAGS", "")).strip()
  if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = (f"{_flags} --xla_force_host_platform_device_count="
                             f"{max(parse_args(sys.argv[1:]).shards)}").strip()

import jax  # noqa: E402  pylint: disable=wrong-import-position

import memory  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import config as config_lib  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import fileio  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.train import loop  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.train import plan as plan_lib  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.eval import samplers  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.models import layers  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol.parallel import cost as cost_lib  # noqa: E402  pylint: disable=wrong-import-position

GIB = 2.0**30
TARGET = 1.2  # bytes at N shards <= TARGET / N of one device's
SAMPLE_STEPS = 3


def make_config(method: str, size: int, shards: int, args: argparse.Namespace):
  """The benchmark config of one record (see the module docstring)."""
  c = config_lib.set_method(config_lib.base_config(), method)
  c.compute_dtype = "float32"
  c.data.inputs = ("cond",)
  c.data.batch_size = 1
  c.data.crop_size = (size, size, size)
  m = c.model
  m.base_width, m.channel_mults = args.width, tuple(args.mults)
  m.num_res_blocks, m.groups, m.time_embed_dim = args.res_blocks, args.groups, args.time_embed
  m.attention_levels = ()
  m.stm_dim = args.stm_dim
  c.ppdm.factor = (2, 2, 2)
  c.ppdm.sample_steps = SAMPLE_STEPS
  c.diffusion.sample_steps = SAMPLE_STEPS
  c.sparse.f_steps = 2
  c.mesh.data, c.mesh.spatial, c.mesh.model = 1, shards, 1
  c.mesh.state_sharding = args.state_sharding
  return c


def _error(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}".strip()
  return text if len(text) <= 1000 else text[:1000] + " ..."


def measure(method: str, size: int, shards: int, args: argparse.Namespace) -> dict:
  """Compiles one configuration's train step and sampler; errors go into the record."""
  config = make_config(method, size, shards, args)
  rec = {"method": method, "size": size, "shards": shards, "state_sharding": args.state_sharding,
         "train_bytes": None, "sample_bytes": None, "train_temp_bytes": None,
         "sample_temp_bytes": None, "train_argument_bytes": None, "state_bytes": None,
         "state_device_bytes": None, "train_gflops": None,
         "sample_gflops": None, "sample_kind": "loop", "sample_steps": SAMPLE_STEPS,
         "whole_volume_all_gathers": None, "train_compile_s": None, "sample_compile_s": None,
         "error": None}
  try:
    parts = loop.build_everything(config, args.out)
  except Exception as exc:  # pylint: disable=broad-except
    rec["error"] = f"build: {_error(exc)}"
    return rec
  leaves = jax.tree.leaves(parts.abstract_state)
  rec["state_bytes"] = int(sum(x.size * x.dtype.itemsize for x in leaves))
  rec["state_device_bytes"] = int(sum(
      math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves))
  errors = []
  t0 = time.time()
  try:
    compiled, cost = loop.compile_step(parts, config)
    rec.update(train_bytes=cost["bytes"], train_temp_bytes=cost["temp_bytes"],
               train_argument_bytes=cost["argument_bytes"], train_gflops=cost["flops"] / 1e9)
    gathers = plan_lib.whole_volume_gathers(compiled.as_text(), (size,) * 3, min_depth=shards)
    rec["whole_volume_all_gathers"] = len(gathers) if shards > 1 else 0
    del compiled
  except Exception as exc:  # pylint: disable=broad-except
    errors.append(f"train: {_error(exc)}")
  rec["train_compile_s"] = round(time.time() - t0, 1)
  t0 = time.time()
  try:
    mesh, method_obj = parts.mesh, parts.method
    psh = parts.compute_params_sharding  # as evaluation samples, whatever the state's layout
    sampler = samplers.jit_sample(method_obj, mesh, psh)
    abstract = samplers.abstract_inputs(method_obj, mesh, parts.abstract_state["params"],
                                              (size,) * 3, 1, psh)
    cost = cost_lib.compiled_cost(sampler.lower(*abstract).compile())
    rec.update(sample_bytes=cost["bytes"], sample_temp_bytes=cost["temp_bytes"],
               sample_gflops=cost["flops"] / 1e9)
  except Exception as exc:  # pylint: disable=broad-except
    errors.append(f"sample: {_error(exc)}")
  rec["sample_compile_s"] = round(time.time() - t0, 1)
  if errors:
    rec["error"] = "; ".join(errors)
  return rec


def _one_shard(records, rec):
  for r in records:
    if (r["method"], r["size"], r["shards"]) == (rec["method"], rec["size"], 1):
      return r
  return None


def ratio(records, rec, key: str):
  """rec[key] / the same configuration's value on one device; None when either is missing."""
  base = _one_shard(records, rec)
  if base is None or not base.get(key) or rec.get(key) is None:
    return None
  return rec[key] / base[key]


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def _verdict(r, n: int) -> str:
  if r is None or n == 1:
    return "-"
  return "meets" if r <= TARGET / n else "misses"


def describe(args: argparse.Namespace) -> str:
  return (f"U-Net: base width {args.width}, mults {tuple(args.mults)}, {args.res_blocks} res "
          f"blocks per level, groups {args.groups}, time embed {args.time_embed}, no attention, "
          f"float32, batch 1, crop = whole volume; mesh data=1 x spatial=N x model=1 "
          f"(depth split in N slabs); train state layout {args.state_sharding} "
          f"(config.mesh.state_sharding); sampler = the whole compiled loop ({SAMPLE_STEPS} steps; "
          f"sparse: 2 levels with Heun).")


def table(records, args: argparse.Namespace) -> str:
  """Markdown table: GiB per device, ratio to one shard, 1/N and whether <= 1.2/N."""
  lines = [describe(args), "",
           "| method | size | N | train GiB | train ratio | sample GiB | sample ratio | 1/N "
           "| 1.2/N | train | sample | state GiB | state GiB per device "
           "| whole-volume all-gathers | error |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---|"]
  for r in records:
    n = r["shards"]
    tr, sr = ratio(records, r, "train_bytes"), ratio(records, r, "sample_bytes")
    lines.append(
        f"| {r['method']} | {r['size']}^3 | {n} "
        f"| {_fmt(r['train_bytes'] and r['train_bytes'] / GIB, '.3f')} | {_fmt(tr, '.3f')} "
        f"| {_fmt(r['sample_bytes'] and r['sample_bytes'] / GIB, '.3f')} | {_fmt(sr, '.3f')} "
        f"| {1 / n:.3f} | {TARGET / n:.3f} | {_verdict(tr, n)} | {_verdict(sr, n)} "
        f"| {_fmt(r['state_bytes'] and r['state_bytes'] / GIB, '.3f')} "
        f"| {_fmt(r.get('state_device_bytes') and r['state_device_bytes'] / GIB, '.3f')} "
        f"| {_fmt(r['whole_volume_all_gathers'], 'd')} "
        f"| {(r['error'] or '')[:100].replace('|', '/')} |")
  return "\n".join(lines)


def command_line(argv=None) -> str:
  """The command that runs this script with `argv` (the process's own arguments when None)."""
  return " ".join(["python experiments/spatial_scaling.py",
                   shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


def report(records, args: argparse.Namespace | None = None, commands=None,
           machine: str | None = None) -> str:
  """The results page of spatial_scaling.json's records as markdown: one table per train-state
  layout (records of several runs, each with its own --state-sharding, may share one file).

  `args` gives the network settings the records were measured with (default: those of the
  first recorded command, else the script's defaults); `commands` (a string or a list) and
  `machine` name the command(s) and the machine when the records do not (older records).
  """
  recorded = list(dict.fromkeys(r["command"] for r in records if r.get("command")))
  commands = recorded or ([commands] if isinstance(commands, str) else list(commands or ()))
  if args is None:
    args = parse_args(shlex.split(recorded[0])[2:] if recorded else ["--out", "-"])
  machine = ", ".join(dict.fromkeys(r["machine"] for r in records if r.get("machine"))) or machine
  quoted = "; ".join(f"`{c}`" for c in commands) or "not recorded"
  parts = ["# Per-device memory with the volume split over N devices",
           f"Command{'s' if len(commands) > 1 else ''}: {quoted}; machine: "
           f"{machine or 'not recorded'}.",
           "Compile only (nothing allocated, nothing runs): the library's train step and its "
           "spatially sharded sampler on a mesh data = 1 x spatial = N x model = 1. Bytes per "
           "device = temp + arguments + outputs - aliased; ratio = bytes at N shards over the "
           f"same configuration's bytes on one device, against the ideal 1/N and the target "
           f"{TARGET:g}/N."]
  layouts = list(dict.fromkeys(r.get("state_sharding", args.state_sharding) for r in records))
  for layout in layouts:
    rows = [r for r in records if r.get("state_sharding", args.state_sharding) == layout]
    if len(layouts) > 1:
      parts.append(f"## Train state layout: {layout}")
    parts.append(table(rows, argparse.Namespace(**dict(vars(args), state_sharding=layout))))
  return "\n\n".join(parts) + "\n"


def main(argv=None) -> list[dict]:
  """Measures with convolutions compiled as XLA's 3D convolutions, as an accelerator runs them
  (not the CPU's folded form: jaxvol.models.layers.conv_implementation); `_main`."""
  with layers.using_conv("xla"):
    return _main(argv)


def _main(argv=None) -> list[dict]:
  """Runs the benchmark; returns the records also written to OUT/spatial_scaling.json."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if max(args.shards) > jax.device_count():
    raise SystemExit(f"--shards up to {max(args.shards)} needs as many devices; this process has "
                     f"{jax.device_count()} (run as a script, or set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count=N before JAX starts)")
  json_path = os.path.join(args.out, "spatial_scaling.json")
  command = command_line(argv)
  machine = f"{jax.device_count()} {jax.devices()[0].platform} device(s)"
  jobs = [(m, s, n) for m in args.methods for s in args.sizes for n in sorted(args.shards)]
  print(f"{len(jobs)} configurations on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n{describe(args)}", flush=True)
  records = []
  start = time.time()
  for i, (method, size, shards) in enumerate(jobs, 1):
    rec = measure(method, size, shards, args)
    rec.update(command=command, machine=machine)
    records.append(rec)
    fileio.write_json_atomic(json_path, records)
    tr = ratio(records, rec, "train_bytes")
    sr = ratio(records, rec, "sample_bytes")
    gib = lambda key: _fmt(rec[key] and rec[key] / GIB, ".3f")
    print(f"[{i}/{len(jobs)}] {method} {size}^3 N={shards}: train {gib('train_bytes')} GiB "
          f"(x{_fmt(tr, '.3f')}), sample {gib('sample_bytes')} GiB (x{_fmt(sr, '.3f')}); "
          f"compile {rec['train_compile_s']} + {rec['sample_compile_s']} s"
          + (f" [error: {rec['error'][:200]}]" if rec["error"] else "")
          + f" (elapsed {time.time() - start:.0f} s)", flush=True)
  md = table(records, args)
  fileio.write_text_atomic(os.path.join(args.out, "spatial_scaling.md"), report(records, args))
  print()
  print(md)
  return records


if __name__ == "__main__":
  memory.request_scheduler(parse_args(sys.argv[1:]).scheduler)  # before the first compile
  main(sys.argv[1:])
