"""--mode=plan: will a config fit on a mesh? Compiled per-device memory and FLOPs; no allocation.

  python -m jaxvol.main --mode=plan --config=configs/full3d_mri_t1_t2.py --workdir=runs/plan \
      --plan_mesh=data:1,spatial:4,model:1 --plan_devices=4 --plan_device_memory_gb=80 \
      [--plan_shape=256,256,256]

The train step (the one `loop.train` runs: `loop.build_everything` + `loop.compile_step`) and the
sampler (`method.sample`, the whole compiled loop, spatially sharded by
jaxvol.eval.samplers, or in windows when config.inference.window is set) are lowered from
`jax.ShapeDtypeStruct`s that carry their shardings and compiled; XLA's memory and cost analyses
give the figures (DESIGN.md section 6). Per-device bytes = temp + arguments + outputs - aliased;
"fits" compares them with --plan_device_memory_gb (GB = 1e9 bytes; JAX preallocates 75% of a
GPU's memory by default, XLA_PYTHON_CLIENT_MEM_FRACTION changes that). FLOPs are per device and
count a sampling loop's body once (about one network evaluation).

Devices: the mesh needs data x spatial x model devices. On CPU a process has only the devices JAX
started with; planning for more needs XLA_FLAGS=--xla_force_host_platform_device_count=N (or
`jax.config.update("jax_num_cpu_devices", N)`) before JAX initialises. `--plan_devices=N` does this
itself (`request_devices`, called by main before any backend starts) and plans on N fake CPU
devices, with XLA's memory-minimising CPU scheduler, closer to what GPU and TPU compilers do. The
compute dtype is the config's ("auto" is float32 on CPU: pass --config.compute_dtype=bfloat16 to
plan a GPU run's dtype).

Convolutions are compiled as XLA's 3D convolutions, as an accelerator runs them, also on the
CPU, where training folds them into 2D ones (jaxvol.models.layers.conv_implementation).

The train state's layout is config.mesh.state_sharding (jaxvol.parallel.sharding.state_layouts:
"replicated", "zero1" or "fsdp"; e.g. --config.mesh.state_sharding=fsdp): the report gives the
mode and the state's bytes in all and per device, parameters, EMA and optimizer state apart. The
sampler takes the parameters in the method's own layout, as evaluation does, whatever the mode.

Warnings name what falls back to replication: a batch or depth the mesh does not divide (that axis
is then replicated), a compiled batch layout that does not split the depth although spatial > 1,
parameter axes the "model" axis does not divide, and all-gathers of whole feature maps in the
compiled train step (a spatial split XLA could not keep). The report is printed and written to
WORKDIR/plan.json (process 0, atomically).
"""

import math
import os
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxvol import fileio
from jaxvol.eval import samplers
from jaxvol.models import layers
from jaxvol.ops import windows as windows_lib
from jaxvol.parallel import cost as cost_lib
from jaxvol.parallel import mesh as mesh_lib
from jaxvol.parallel import sharding as sharding_lib
from jaxvol.train import loop

GB = 1e9
MIB = 2.0**20
SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|collective-permute|all-to-all|"
                         r"reduce-scatter)(?:-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def parse_mesh(text: str) -> dict:
  """"data:1,spatial:4,model:1" -> {"data": 1, "spatial": 4, "model": 1}; missing axes are 1."""
  axes = {"data": 1, "spatial": 1, "model": 1}
  for item in (t.strip() for t in text.split(",") if t.strip()):
    name, _, size = item.partition(":")
    if name not in axes or not re.fullmatch(r"-?\d+", size.strip()):
      raise ValueError(f"bad --plan_mesh entry {item!r}: use data:N,spatial:N,model:N")
    axes[name] = int(size)
  return axes


def parse_shape(text: str) -> tuple[int, int, int] | None:
  """"256,256,256" (or one number) -> (256, 256, 256); "" -> None."""
  if not text.strip():
    return None
  return windows_lib.as_triple([int(v) for v in text.split(",")] if "," in text else int(text),
                               "--plan_shape")


def request_devices(n: int) -> bool:
  """Asks JAX for n fake CPU devices and the memory-minimising CPU scheduler.

  Only effective before the process's first JAX backend starts; returns whether it was.
  """
  if n <= 0:
    return False
  try:
    jax.config.update("jax_num_cpu_devices", int(n))
  except RuntimeError:
    return False  # a backend is up already; `plan` checks the device count
  jax.config.update("jax_platforms", "cpu")
  flags = os.environ.get("XLA_FLAGS", "")
  if SCHEDULER_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {SCHEDULER_FLAG}=false".strip()
  return True


def collectives(hlo_text: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
  """(op, [(dtype, shape), ...]) of every collective in compiled HLO text (async starts too)."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      arrays = [(d, tuple(int(v) for v in s.split(",") if v))
                for d, s in _ARRAY.findall(m.group(1))]
      out.append((m.group(2), arrays))
  return out


def whole_volume_gathers(hlo_text: str, spatial, min_depth: int = 1) -> list[dict]:
  """All-gathers whose result holds a whole feature map of the volume: three consecutive dims
  equal to `spatial` / 2^k for some k with depth spatial[0] / 2^k >= min_depth (pass the spatial
  axis size: below it a level cannot stay split anyway). Returns [{"shape", "bytes"}]."""
  spatial = tuple(int(s) for s in spatial)
  levels = set()
  k = 0
  while all(s % 2**k == 0 for s in spatial) and spatial[0] // 2**k >= max(min_depth, 1):
    levels.add(tuple(s // 2**k for s in spatial))
    k += 1
  found = []
  for op, arrays in collectives(hlo_text):
    if op != "all-gather":
      continue
    for dtype, shape in arrays:
      if any(tuple(shape[i:i + 3]) in levels for i in range(len(shape) - 2)):
        found.append({"shape": f"{dtype}{list(shape)}",
                      "bytes": math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)})
  return found


def _layout(mesh, shape, what: str, warnings: list) -> NamedSharding:
  """The batch layout for a (B, D, H, W, C) array, without the axes the mesh does not divide."""
  spec, fallbacks = sharding_lib.fit_spec(mesh, P(*mesh_lib.batch_sharding(mesh).spec), shape)
  for dim, axes in fallbacks:
    name = "batch" if dim == 0 else "depth"
    warnings.append(f"{what}: {name} {shape[dim]} is not divisible by the {axes} axis "
                    f"({mesh.shape[axes]}): replicated over it instead")
  return NamedSharding(mesh, spec)


def _splits_depth(sharding, shape) -> bool:
  return sharding.shard_shape(tuple(shape))[1] < shape[1]


def _figures(compiled, memory_bytes: float | None) -> dict:
  cost = cost_lib.compiled_cost(compiled)
  out = {k: cost.get(k) for k in ("bytes", "temp_bytes", "argument_bytes", "output_bytes",
                                  "alias_bytes", "flops")}
  out["fits"] = None if memory_bytes is None or cost.get("bytes") is None else bool(
      cost["bytes"] <= memory_bytes)
  return out


def _param_summary(abstract_params) -> dict:
  total = sharded = 0
  replicated = 0
  for leaf in jax.tree.leaves(abstract_params):
    n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    total += n
    if sharding_lib.is_replicated(leaf.sharding):
      replicated += n
    else:
      sharded += n
  count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract_params))
  return {"count": int(count), "bytes": int(total), "replicated_bytes": int(replicated),
          "sharded_bytes": int(sharded)}


def _state_summary(config, parts) -> dict:
  """The train state's layout mode and its bytes, in all and on one device, by part."""

  def nbytes(tree, per_device):
    total = 0
    for leaf in jax.tree.leaves(tree):
      shape = tuple(leaf.shape)
      if per_device:
        shape = tuple(leaf.sharding.shard_shape(shape))
      total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)

  state = parts.abstract_state
  by_part = {k: {"bytes": nbytes(v, False), "per_device_bytes": nbytes(v, True)}
             for k, v in state.items() if k in ("params", "ema_params", "opt_state")}
  return {"mode": loop.state_sharding_mode(config), "in_effect": parts.state_sharding_mode,
          "min_size": int(config.mesh.get("state_sharding_min_size",
                                          sharding_lib.DEFAULT_MIN_SIZE)),
          "bytes": nbytes(state, False), "per_device_bytes": nbytes(state, True),
          "parts": by_part}


def _compile_sample(parts, spatial, memory_bytes, warnings) -> dict:
  """Compiles the sampler for a condition of `spatial` as the config would run it."""
  method, mesh = parts.method, parts.mesh
  params = parts.abstract_state["params"]
  window = method.sliding_window()
  if window is None:
    batch = mesh.shape["data"]  # one volume per data-parallel group
    shape = (batch,) + tuple(spatial) + (method.cond_channels,)
    csh = _layout(mesh, shape, "sample", warnings)
    psh = parts.compute_params_sharding  # as evaluation samples, whatever the state's layout
    sampler = samplers.jit_sample(method, mesh, psh, csh)
    compiled = sampler.lower(*samplers.abstract_inputs(
        method, mesh, params, spatial, batch, psh, csh)).compile()
    out_sharding = compiled.output_shardings
    if mesh.shape["spatial"] > 1 and not _splits_depth(out_sharding, shape):
      warnings.append("sample: the compiled prediction is not split along depth although "
                      f"spatial = {mesh.shape['spatial']}")
    how = (f"whole volume, batch {batch}, depth split over {csh.shard_shape(shape)[1]}-voxel "
           f"slabs" if _splits_depth(csh, shape) else f"whole volume, batch {batch}, not split")
  else:
    # As jaxvol.eval.evaluate runs it: windows spread over this process's devices.
    wmesh = window.mesh or windows_lib.local_mesh()
    repl = NamedSharding(wmesh, P())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), params)
    cond = jax.ShapeDtypeStruct((1,) + tuple(spatial) + (method.cond_channels,), np.float32,
                                sharding=repl)
    key = jax.ShapeDtypeStruct((2,), np.uint32, sharding=repl)
    compiled = jax.jit(method.sample).lower(abstract, cond, key).compile()
    how = (f"windows of {window.window} (batch {window.batch} per device) spread over "
           f"{window.n_devices} device(s); the mesh does not apply")
  return dict(_figures(compiled, memory_bytes), shape=list(spatial), layout=how)


def plan(config, workdir: str, mesh_axes: dict | None = None,
         device_memory_gb: float | None = None, sample_shape=None, write: bool = True) -> dict:
  """Compiles the train step and the sampler of `config` on a mesh from abstract shapes.

  Args:
    config: the experiment config (not modified).
    workdir: where plan.json goes.
    mesh_axes: {"data", "spatial", "model"} sizes overriding config.mesh (data -1: the rest).
    device_memory_gb: per-device memory to check against (GB = 1e9 bytes); None: no verdict.
    sample_shape: the sampled volume's (D, H, W); None: config.data.crop_size.
    write: write WORKDIR/plan.json (process 0).

  Returns:
    The report: mesh, devices, params, state (layout mode and bytes), train and sample figures,
    warnings.

  Raises:
    ValueError: the mesh needs more devices than this process has (with the XLA_FLAGS hint).
  """
  with layers.using_conv("xla"):  # an accelerator's convolutions, not the CPU's folded ones
    return _plan(config, workdir, mesh_axes, device_memory_gb, sample_shape, write)


def _plan(config, workdir, mesh_axes, device_memory_gb, sample_shape, write) -> dict:
  """`plan`, under the convolution implementation it chose."""
  c = config.copy_and_resolve_references()
  for k, v in (mesh_axes or {}).items():
    c.mesh[k] = int(v)
  n = jax.device_count()
  fixed = int(c.mesh.spatial) * int(c.mesh.model)
  needed = fixed * (int(c.mesh.data) if int(c.mesh.data) > 0 else 1)
  if needed > n:
    raise ValueError(
        f"the mesh data={c.mesh.data} x spatial={c.mesh.spatial} x model={c.mesh.model} needs "
        f"{needed} devices and this process has {n} ({jax.devices()[0].platform}); plan with "
        f"--plan_devices={needed}, or start the process with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={needed} (fake CPU devices; it must be "
        f"set before JAX initialises)")
  warnings = []
  loop.resolve_whole_crop(c)
  parts = loop.build_everything(c, workdir, check=False)
  mesh = parts.mesh
  warnings += [f"parameter {note}: replicated over it instead" for note in parts.param_notes]
  memory = None if device_memory_gb is None else float(device_memory_gb) * GB
  crop = tuple(int(s) for s in c.data.crop_size)
  example = parts.example["target"]
  bsh = _layout(mesh, example.shape, "train batch", warnings)
  compiled, _ = loop.compile_step(parts, c, batch_sharding=bsh)
  batch_in = compiled.input_shardings[0][1]["target"]
  if mesh.shape["spatial"] > 1 and not _splits_depth(batch_in, example.shape):
    warnings.append(f"train: the compiled batch is not split along depth although spatial = "
                    f"{mesh.shape['spatial']} (replicated over the spatial axis)")
  train = dict(_figures(compiled, memory), batch=int(c.data.batch_size), crop=list(crop))
  gathers = whole_volume_gathers(compiled.as_text(), crop, min_depth=mesh.shape["spatial"])
  if mesh.shape["spatial"] > 1 and gathers:
    biggest = max(gathers, key=lambda g: g["bytes"])
    warnings.append(f"train: {len(gathers)} all-gather(s) of whole feature maps, the largest "
                    f"{biggest['shape']} ({biggest['bytes'] / MIB:.1f} MiB): XLA did not keep the "
                    "depth split there")
  train["whole_volume_all_gathers"] = gathers
  spatial = tuple(sample_shape) if sample_shape else crop
  sample = _compile_sample(parts, spatial, memory, warnings)

  report = {
      "config_method": c.method,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "devices": {"count": int(mesh.devices.size), "platform": jax.devices()[0].platform,
                  "available": n},
      "compute_dtype": str(np.dtype(parts.method.dtype)),
      "device_memory_gb": device_memory_gb,
      "params": _param_summary(parts.abstract_state["params"]),
      "state": _state_summary(c, parts),
      "train": train,
      "sample": sample,
      "warnings": warnings,
  }
  if write and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    fileio.write_json_atomic(os.path.join(workdir, "plan.json"), report)
  return report


def _mib(x) -> str:
  return "-" if x is None else f"{x / MIB:,.1f} MiB"


def _verdict(fits) -> str:
  return "" if fits is None else ("  fits" if fits else "  DOES NOT FIT")


def format_report(report: dict) -> str:
  """The human-readable lines `--mode=plan` prints."""
  m, p, t, s = report["mesh"], report["params"], report["train"], report["sample"]
  mem = report["device_memory_gb"]
  lines = [
      f"plan: method {report['config_method']}, mesh data={m['data']} spatial={m['spatial']} "
      f"model={m['model']} on {report['devices']['count']} {report['devices']['platform']} "
      f"device(s), compute dtype {report['compute_dtype']}"
      + (f", {mem:g} GB per device" if mem else ""),
      f"parameters: {p['count']:,} ({_mib(p['bytes'])}; replicated {_mib(p['replicated_bytes'])}, "
      f"sharded {_mib(p['sharded_bytes'])})",
  ]
  for name, f, what in (("train step", t, f"batch {t['batch']}, crop {tuple(t['crop'])}"),
                        ("sampler", s, f"{tuple(s['shape'])}, {s['layout']}")):
    lines.append(
        f"{name} ({what}): {_mib(f['bytes'])} per device (temp {_mib(f['temp_bytes'])}, "
        f"arguments {_mib(f['argument_bytes'])}, outputs {_mib(f['output_bytes'])}, aliased "
        f"{_mib(f['alias_bytes'])}), {f['flops'] / 1e9:,.2f} GFLOPs per device"
        + (" (loop body counted once)" if name == "sampler" else "") + _verdict(f["fits"]))
  st = report.get("state")
  if st:
    mode = st["mode"] + ("" if st["in_effect"] == st["mode"] else
                         f" (in effect {st['in_effect']}: data x spatial is one device)")
    split = ", ".join(f"{name} {_mib(st['parts'][k]['per_device_bytes'])}" for k, name in
                      (("params", "params"), ("ema_params", "EMA"), ("opt_state", "optimizer"))
                      if k in st["parts"])
    lines.insert(2, f"train state layout {mode}: {_mib(st['bytes'])} in all, "
                 f"{_mib(st['per_device_bytes'])} per device ({split})")
  lines += [f"WARNING: {w}" for w in report["warnings"]]
  return "\n".join(lines)
