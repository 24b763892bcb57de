"""Compiled memory of PRDiT's global attention and of its whole stage-2 train step, per backend.

Usage::

  python experiments/attention_memory.py --out DIR [--tokens 512,4096,32768] [--sizes 128,256]
      [--backends chunked,xla] [--remat full] [--dtype bfloat16] [--batch 1] [--timeout 180]
      [--model B/12/4] [--width W --heads H --depth D --local-width L]   (tiny models, for tests)

PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation", ICLR 2026)
attends over every token of the volume: 4,096 tokens at 128^3, 32,768 at 256^3. Two kinds of
records, both from abstract shapes only (`jax.ShapeDtypeStruct`, `jax.eval_shape`: nothing is
allocated, nothing runs), bytes per device = temp + arguments + outputs - aliased of
`compiled.memory_analysis()` (`jaxvol.parallel.cost.compiled_cost`):

  attention   one attention layer's forward and backward pass, 12 heads x 64 (PRDiT-B), from
              experiments/attention_bench.py's `attention_records` (see its docstring for how
              to read its FLOPs).
  train_step  the library's own stage-2 train step (`jaxvol.train.loop.build_everything` and
              `compile_step`, the step `loop.train` runs): PRDiT-B/12/4 (or --model), batch 1 on
              one device, the frozen local denoiser, the residual DiT with the given attention
              backend and rematerialisation policy, AdamW state for the DiT only, EMA, the
              compute dtype (bfloat16 activations with float32 parameters, as "auto" picks on a
              GPU). FLOPs as XLA counts them: a `lax.scan` body (the chunked backend's loops)
              counts once, so the chunked backend's GFLOPs are far below the work it does.

Each compile runs under --timeout seconds; one that fails or runs past it is recorded with
"skipped" and a reason, and the run goes on (the xla backend at 256^3 materialises 12 x 32,768^2
logits per layer: its compile is tried, and its bytes are the point). Run as a script, it asks
XLA for the memory-minimising CPU scheduler first (as experiments/memory.py does), so
rematerialisation shows in the numbers as it would on a GPU.

Writes DIR/attention_memory.json (a list of records {kind, backend, tokens, size, bytes, gflops,
command, ...}, rewritten atomically after each one) and DIR/attention_memory.md (the results
page, `report`, which renders it from the JSON alone), and prints the table and the headline: the
chunked 256^3 train step against the 40 GB-per-device target, and full (xla) attention's bytes as
a multiple of it.
"""

import argparse
import math
import os
import shlex
import sys
import time

import jax  # noqa: E402

import attention_bench  # noqa: E402  pylint: disable=wrong-import-position
import memory  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import config as config_lib  # noqa: E402
from jaxvol import fileio  # noqa: E402
from jaxvol.models import attention  # noqa: E402
from jaxvol.ops import tokens as tokens_lib  # noqa: E402
from jaxvol.train import loop  # noqa: E402

TOKENS = (512, 4096, 32768)
SIZES = (128, 256)
BACKENDS = ("chunked", "xla")
TARGET_BYTES = 40e9  # per device, chunked 256^3 train step at batch 1
TARGET_RATIO = 10.0  # full attention must need more than this multiple
GB = 1e9


def train_step_config(size: int, backend: str, args):
  """The stage-2 PRDiT config whose train step is compiled for one record."""
  c = config_lib.base_config()
  c.method = "prdit"
  c.compute_dtype = args.dtype
  c.data.inputs = ()
  c.data.target = "ct"
  c.data.crop_size = (size, size, size)
  c.data.batch_size = args.batch
  c.mesh.data = c.mesh.spatial = c.mesh.model = 1
  p = c.prdit
  size_name, patch, depth = _parse_model(args.model)
  p.size, p.patch, p.depth = size_name, patch, depth
  p.stage = 2
  p.attention = backend
  p.chunk_size = args.chunk_size
  p.remat = args.remat
  p.width, p.heads, p.local_width = args.width, args.heads, args.local_width
  if args.depth >= 0:
    p.depth = args.depth
  c.train.weight_decay, c.train.grad_clip, c.train.ema_decay = 0.0, 1.0, 0.9999
  return c


def _parse_model(name: str) -> tuple[str, int, int]:
  parts = name.replace("PRDiT-", "").split("/")
  if len(parts) != 3:
    raise ValueError(f"--model must be SIZE/PATCH/DEPTH such as B/12/4, got {name!r}")
  return parts[0], int(parts[1]), int(parts[2])


def model_label(args) -> str:
  """"PRDiT-B/12/4", plus any test-size overrides."""
  extra = [f"{k} {v}" for k, v in (("width", args.width), ("heads", args.heads),
                                    ("depth", args.depth), ("local width", args.local_width))
           if (v >= 0 if k == "depth" else v > 0)]
  return f"PRDiT-{args.model}" + (f" ({', '.join(extra)})" if extra else "")


def train_step_record(size: int, backend: str, args) -> dict:
  """Compiles the stage-2 train step at size^3 with `backend`; returns the record."""
  config = train_step_config(size, backend, args)
  p = config.prdit
  tokens = tokens_lib.num_tokens((size,) * 3, p.stride)
  rec = dict(kind="train_step", backend=backend, tokens=tokens, size=size, bytes=None,
             gflops=None, model=model_label(args), remat=p.remat, dtype=args.dtype,
             batch=args.batch, params=None, trainable_params=None, temp_bytes=None,
             argument_bytes=None, chunk_size=p.chunk_size if backend == "chunked" else None,
             platform=jax.default_backend(), compile_s=None, skipped=None)
  start = time.time()
  try:
    parts = loop.build_everything(config, args.out)
    params = parts.abstract_state["params"]
    rec["params"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))
    rec["trainable_params"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(
        params["params"]["residual"])))
    _, cost = attention_bench._with_timeout(  # pylint: disable=protected-access
        lambda: loop.compile_step(parts, config), args.timeout)
    rec.update(bytes=cost.get("bytes"), gflops=cost["flops"] / 1e9,
               temp_bytes=cost.get("temp_bytes"), argument_bytes=cost.get("argument_bytes"))
  except Exception as exc:  # pylint: disable=broad-except
    rec["skipped"] = attention_bench._reason(exc)  # pylint: disable=protected-access
  rec["compile_s"] = round(time.time() - start, 1)
  print(f"  train_step {backend:8s} {size}^3: "
        + (f"{rec['bytes'] / GB:,.2f} GB" if rec["skipped"] is None
           else f"skipped ({rec['skipped']})") + f", {rec['compile_s']} s", flush=True)
  return rec


def _fmt_bytes(n) -> str:
  return "-" if n is None else f"{n / GB:,.3f} GB"


def table(records) -> str:
  rows = ["| kind | backend | tokens | volume | bytes per device | GFLOPs (compiled) | compile s "
          "| note |", "|---|---|---:|---:|---:|---:|---:|---|"]
  for r in records:
    note = r.get("skipped") or ""
    if r["kind"] == "train_step" and not note:
      note = f"{r['model']}, remat {r['remat']}, {r['dtype']}, batch {r['batch']}"
    gflops = "-" if r.get("gflops") is None else f"{r['gflops']:,.{1 if r['gflops'] >= 10 else 3}f}"
    rows.append(f"| {r['kind']} | {r['backend']} | {r['tokens']:,} | {r['size']}^3 | "
                f"{_fmt_bytes(r.get('bytes'))} | {gflops} | {r.get('compile_s')} | "
                f"{note.replace('|', '/')[:160]} |")
  return "\n".join(rows)


def headline(records, size: int = 256) -> str:
  """The chunked train step at `size`^3 against the target, and full attention's multiple of it."""
  find = lambda b: next((r for r in records if r["kind"] == "train_step" and r["backend"] == b
                         and r["size"] == size and r.get("bytes")), None)
  chunked, full = find("chunked"), find("xla")
  if chunked is None:
    return f"no chunked train-step record at {size}^3"
  verdict = "meets" if chunked["bytes"] <= TARGET_BYTES else "misses"
  text = (f"{size}^3 train step, batch {chunked['batch']}: chunked {chunked['bytes'] / GB:.2f} GB "
          f"per device ({verdict} the <= {TARGET_BYTES / GB:.0f} GB target)")
  if full is not None:
    ratio = full["bytes"] / chunked["bytes"]
    text += (f"; full (xla) attention {full['bytes'] / GB:.1f} GB = {ratio:.1f}x "
             f"({'meets' if ratio > TARGET_RATIO else 'misses'} the > {TARGET_RATIO:g}x target)")
  else:
    text += "; no full-attention train-step number (skipped or not run)"
  return text


def command_line(argv=None) -> str:
  """The command that runs this script with `argv` (the process's own arguments when None)."""
  return " ".join(["python experiments/attention_memory.py",
                   shlex.join(sys.argv[1:] if argv is None else list(argv))]).strip()


def report(records, command: str | None = None) -> str:
  """The results page of one run (OUT/attention_memory.json's records) as markdown.

  `command` names the command that made the records when they do not (older records).
  """
  command = next((r["command"] for r in records if r.get("command")), command) or "not recorded"
  platforms = ", ".join(dict.fromkeys(str(r.get("platform")) for r in records))
  attn = next((r for r in records if r["kind"] == "attention"), None)
  parts = [
      "# PRDiT: compiled memory of global attention and of the stage-2 train step",
      f"Command: `{command}`; machine: the {platforms} backend, compile only (nothing is "
      "allocated, nothing runs).",
      "Bytes per device = temp + arguments + outputs - aliased of XLA's compiled memory "
      "analysis. FLOPs as XLA counts them: a `lax.scan` body (the chunked backend's loops) "
      "counts once."]
  if attn is not None:
    parts[-1] += (f" Attention rows: one layer's forward and backward pass, {attn.get('heads')} "
                  f"heads x {attn.get('head_dim')}, batch {attn.get('batch')}, "
                  f"{attn.get('dtype')}.")
  if any(r["kind"] == "train_step" for r in records):
    parts[-1] += (" Train-step rows: the library's own stage-2 step (frozen local denoiser, "
                  "AdamW for the DiT, EMA); model, rematerialisation, compute dtype and batch "
                  "in the note.")
  parts.append(table(records))
  if any(r["kind"] == "train_step" for r in records):
    parts.append(headline(records))
  return "\n\n".join(parts) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--tokens", type=memory.int_list, default=list(TOKENS),
                 help="attention-layer sequence lengths ('' for none)")
  p.add_argument("--sizes", type=memory.int_list, default=list(SIZES),
                 help="train-step volume sides, multiples of 8 ('' for none)")
  p.add_argument("--backends", type=memory.str_list, default=list(BACKENDS),
                 help="attention backends for both kinds of record")
  p.add_argument("--remat", default="full", choices=sorted(attention.REMAT_POLICIES),
                 help="rematerialisation of each DiT block in the train step")
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="compute dtype of the train step (parameters stay float32)")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--chunk-size", type=int, default=512)
  p.add_argument("--timeout", type=float, default=180.0, help="per-compile limit in seconds")
  p.add_argument("--scheduler", choices=("memory", "default"), default="memory",
                 help="XLA CPU scheduler: memory-minimising (like GPU/TPU) or XLA's CPU default")
  p.add_argument("--model", default="B/12/4", help="SIZE/PATCH/DEPTH of the train-step model")
  p.add_argument("--width", type=int, default=0, help="> 0 overrides the DiT width (tests)")
  p.add_argument("--heads", type=int, default=0, help="> 0 overrides the DiT heads (tests)")
  p.add_argument("--depth", type=int, default=-1, help=">= 0 overrides the DiT depth (tests)")
  p.add_argument("--local-width", type=int, default=0,
                 help="> 0: local denoiser width instead of the raw window (tests)")
  args = p.parse_args(argv)
  bad = [b for b in args.backends if b not in attention.BACKENDS]
  if bad:
    p.error(f"unknown backends {bad}; choose from {list(attention.BACKENDS)}")
  return args


def main(argv=None) -> list[dict]:
  """Runs both kinds of record; returns them (also written to OUT/attention_memory.json)."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "attention_memory.json")
  command = command_line(argv)
  records = []
  save = lambda: fileio.write_json_atomic(json_path, records)
  print(f"on {jax.default_backend()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  if args.tokens:
    print("attention layer, forward + backward, 12 heads x 64, batch 1, float32:", flush=True)
    # Full attention last: its 32,768-token compile is the slow one.
    backends = sorted(args.backends, key=lambda b: b == "xla")
    for rec in attention_bench.attention_records(args.tokens, 12, 64, 1, backends,
                                                 chunk_size=args.chunk_size,
                                                 timeout_s=args.timeout):
      records.append(dict(rec, command=command))
    save()
  if args.sizes:
    print(f"train step, {model_label(args)} stage 2, batch {args.batch}, remat {args.remat}, "
          f"{args.dtype}:", flush=True)
    for size in args.sizes:
      for backend in sorted(args.backends, key=lambda b: b == "xla"):
        records.append(dict(train_step_record(size, backend, args), command=command))
        save()
  text = table(records)
  head = headline(records) if args.sizes else ""
  fileio.write_text_atomic(os.path.join(args.out, "attention_memory.md"), report(records))
  print("\n" + text + "\n\n" + head, flush=True)
  return records


if __name__ == "__main__":
  memory.request_scheduler(parse_args(sys.argv[1:]).scheduler)  # before the first compile
  main(sys.argv[1:])
