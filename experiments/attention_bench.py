"""Compiled memory and FLOPs of PRDiT's global attention, forward and backward, per backend.

Usage::

  python experiments/attention_bench.py --out DIR [--tokens 512,4096,32768]
      [--backends xla,chunked,splash] [--heads 12] [--head-dim 64] [--batch 1]
      [--dtype float32|bfloat16] [--chunk-size 512] [--timeout 120] [--time]

PRDiT ("Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation", ICLR 2026)
attends over every token of a volume: with 8^3-voxel tokens, 512 tokens is a 64^3 volume, 4,096 a
128^3 and 32,768 a 256^3 one (the "size" column: 8 * tokens^(1/3)). For each backend of
`jaxvol.models.attention` and each token count, `jax.value_and_grad` of the attention output's sum
with respect to q, k and v is lowered with abstract inputs only (`jax.ShapeDtypeStruct`: nothing is
allocated) and compiled; `compiled.memory_analysis()` gives bytes (temp + arguments + outputs -
aliased, `jaxvol.parallel.cost.compiled_cost`) and `compiled.cost_analysis()` the FLOPs. The xla
backend at 32,768 tokens is compiled only: its heads x tokens^2 logits show up as bytes.

Reading the numbers:
  gflops            as XLA reports them. XLA's cost analysis counts a loop body once, so for the
                    chunked backend (two nested `lax.scan`s) and for splash in interpret mode it is
                    about one chunk's work, not the layer's.
  attention_gflops  the layer's matmul FLOPs without recomputation, 12 * batch * heads *
                    tokens^2 * head_dim (forward q k^T and p v; backward dp, dq, dk and dv),
                    whatever the backend. The chunked backend's backward pass recomputes chunk
                    logits (and, for the query-chunk rematerialisation, p v): counted from its
                    jaxpr with scan trip counts it runs 1.5x these matmul FLOPs.
  splash            off TPU it runs in Pallas interpret mode (the record says "interpret"): its
                    bytes and FLOPs are those of the CPU emulation, not of the TPU kernel.

XLA's default CPU scheduler orders for concurrency and hoists recomputation, inflating the peaks of
rematerialised code; as in experiments/memory.py, run as a script this asks for the
memory-minimising scheduler (--scheduler memory, the default) before anything compiles.

Each compile runs under a time limit (--timeout, seconds); a backend that fails or runs past it is
recorded with a "skipped" reason and null numbers, and the run goes on. With --time, every
configuration is also run for real (`time_attention`: median seconds of a jitted forward and
backward pass after warm-up) on the default device; meant for GPU and TPU, off by default.

Writes DIR/attention_bench.json (a list of records, rewritten atomically after each one) and prints
a markdown table, also written to DIR/attention_bench.md.
"""

import argparse
import os
import statistics
import threading
import time

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import memory  # noqa: E402  pylint: disable=wrong-import-position
from jaxvol import fileio  # noqa: E402
from jaxvol.models import attention  # noqa: E402
from jaxvol.parallel import cost as cost_lib  # noqa: E402

TOKENS = (512, 4096, 32768)
BACKENDS = ("xla", "chunked", "splash")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PATCH = 8  # voxels per token side: tokens = (size / PATCH)^3
MIB = 2.0**20


def cube_side(tokens: int) -> int:
  """Side of the cubic volume whose 8^3 patches give `tokens` tokens."""
  return PATCH * round(tokens ** (1.0 / 3.0))


def _fwd_bwd(backend: str, chunk_size: int):
  """Jitted (q, k, v) -> (sum of the attention output, (dq, dk, dv))."""

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, backend=backend, chunk_size=chunk_size)
    return out.astype(jnp.float32).sum()

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _with_timeout(fn, seconds: float):
  """fn() or TimeoutError after `seconds`; a timed-out call keeps running in a daemon thread."""
  result = {}

  def target():
    try:
      result["value"] = fn()
    except Exception as exc:  # pylint: disable=broad-except
      result["error"] = exc

  worker = threading.Thread(target=target, daemon=True)
  worker.start()
  worker.join(seconds)
  if worker.is_alive():
    raise TimeoutError(f"compile did not finish within {seconds:g} s")
  if "error" in result:
    raise result["error"]
  return result["value"]


def _reason(exc: BaseException) -> str:
  lines = str(exc).strip().splitlines()
  return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def attention_records(tokens_list=TOKENS, heads: int = 12, head_dim: int = 64, batch: int = 1,
                      backends=BACKENDS, dtype=jnp.float32, chunk_size: int = 512,
                      timeout_s: float = 120.0, on_record=None) -> list[dict]:
  """Compiled bytes and FLOPs of attention forward + backward for every backend and token count.

  Args:
    tokens_list: sequence lengths (self-attention, full, no mask).
    heads: attention heads.
    head_dim: per-head width.
    batch: examples per call.
    backends: `jaxvol.models.attention` backends; "auto" is resolved and recorded as what it ran.
    dtype: q, k, v dtype.
    chunk_size: the chunked backend's chunk length.
    timeout_s: per-compile limit; beyond it (or on an error) the record is skipped with a reason.
    on_record: called with the list so far after each record (e.g. to save it).

  Returns:
    One dict per (backend, tokens): kind "attention", backend, tokens, size (cube side in voxels),
    bytes, gflops, attention_gflops, the byte breakdown, compile_s, and skipped (None or why).
  """
  records = []
  flags = os.environ.get("XLA_FLAGS", "")
  scheduler = "memory" if f"{memory.SCHEDULER_FLAG}=false" in flags else "default"
  for backend in backends:
    for tokens in tokens_list:
      name = attention.resolve_backend(backend, head_dim, tokens)
      rec = dict(kind="attention", backend=name, tokens=int(tokens), size=cube_side(tokens),
                 heads=heads, head_dim=head_dim, batch=batch, dtype=jnp.dtype(dtype).name,
                 chunk_size=chunk_size if name == "chunked" else None,
                 interpret=name == "splash" and jax.default_backend() != "tpu",
                 platform=jax.default_backend(), scheduler=scheduler,
                 attention_gflops=12.0 * batch * heads * tokens**2 * head_dim / 1e9,
                 bytes=None, gflops=None, compile_s=None, skipped=None)
      spec = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), dtype)
      start = time.time()
      try:
        compiled = _with_timeout(
            lambda n=name: _fwd_bwd(n, chunk_size).lower(spec, spec, spec).compile(), timeout_s)
        cost = cost_lib.compiled_cost(compiled)
        rec.update(bytes=cost.get("bytes"), gflops=cost["flops"] / 1e9,
                   **{k: cost.get(k) for k in ("temp_bytes", "argument_bytes", "output_bytes",
                                                "alias_bytes")})
      except Exception as exc:  # pylint: disable=broad-except
        rec["skipped"] = _reason(exc)
      rec["compile_s"] = round(time.time() - start, 2)
      records.append(rec)
      print(f"  {name:8s} {tokens:6d} tokens: "
            + (f"{rec['bytes'] / MIB:,.1f} MiB" if rec["skipped"] is None
               else f"skipped ({rec['skipped']})") + f", {rec['compile_s']} s", flush=True)
      if on_record is not None:
        on_record(records)
  return records


def time_attention(backend: str, tokens: int, heads: int = 12, head_dim: int = 64,
                   batch: int = 1, dtype=jnp.bfloat16, chunk_size: int = 512, warmup: int = 2,
                   repeats: int = 5, seed: int = 0) -> float:
  """Median wall seconds of one jitted attention forward + backward pass on the default device."""
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, (batch, tokens, heads, head_dim), dtype) for key in keys)
  step = _fwd_bwd(backend, chunk_size)
  for _ in range(warmup):
    jax.block_until_ready(step(q, k, v))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(q, k, v))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fmt_bytes(n) -> str:
  if n is None:
    return "-"
  return f"{n / 2.0**30:,.2f} GiB" if n >= 2.0**30 else f"{n / MIB:,.1f} MiB"


def table(records) -> str:
  """Markdown table of the records."""
  rows = ["| backend | tokens | volume | bytes (fwd+bwd) | compiled GFLOP | attention GFLOP | "
          "compile s | run s | note |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in records:
    note = r["skipped"] or ("interpret mode" if r["interpret"] else "")
    gflops = "-" if r["gflops"] is None else f"{r['gflops']:,.2f}"
    seconds = r.get("seconds")
    rows.append(f"| {r['backend']} | {r['tokens']:,} | {r['size']}^3 | {_fmt_bytes(r['bytes'])} | "
                f"{gflops} | {r['attention_gflops']:,.1f} | {r['compile_s']} | "
                f"{'-' if seconds is None else f'{seconds:.4f}'} | {note} |")
  return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
  """Parses the command line (`argv` without the program name)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--out", required=True, help="output directory for attention_bench.json/.md")
  p.add_argument("--tokens", type=memory.int_list, default=list(TOKENS), help="e.g. 512,4096,32768")
  p.add_argument("--backends", type=memory.str_list, default=list(BACKENDS),
                 help=f"comma-separated subset of {','.join(attention.BACKENDS)}")
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  p.add_argument("--chunk-size", type=int, default=512)
  p.add_argument("--timeout", type=float, default=120.0, help="per-compile limit in seconds")
  p.add_argument("--scheduler", choices=("memory", "default"), default="memory",
                 help="XLA CPU scheduler: memory-minimising (like GPU/TPU) or XLA's CPU default")
  p.add_argument("--time", action="store_true",
                 help="also run each configuration and record median seconds (GPU/TPU)")
  args = p.parse_args(argv)
  bad = [b for b in args.backends if b not in attention.BACKENDS]
  if bad:
    p.error(f"unknown backends {bad}; choose from {list(attention.BACKENDS)}")
  return args


def main(argv=None) -> list[dict]:
  """Runs the benchmark; returns the records also written to OUT/attention_bench.json."""
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, "attention_bench.json")
  dtype = DTYPES[args.dtype]
  print(f"attention fwd+bwd, {args.heads} heads x {args.head_dim}, batch {args.batch}, "
        f"{args.dtype}, on {jax.default_backend()}", flush=True)
  records = attention_records(args.tokens, args.heads, args.head_dim, args.batch, args.backends,
                              dtype, args.chunk_size, args.timeout,
                              on_record=lambda recs: fileio.write_json_atomic(json_path, recs))
  if args.time:
    for r in records:
      if r["skipped"] is None:
        r["seconds"] = time_attention(r["backend"], r["tokens"], args.heads, args.head_dim,
                                      args.batch, dtype, args.chunk_size)
        fileio.write_json_atomic(json_path, records)
  text = table(records)
  fileio.write_text_atomic(os.path.join(args.out, "attention_bench.md"), text + "\n")
  print("\n" + text, flush=True)
  return records


if __name__ == "__main__":
  memory.request_scheduler(parse_args().scheduler)
  main()
