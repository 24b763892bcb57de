"""What a compiled XLA program costs per device: its memory (XLA's compiled memory analysis) and
FLOPs. Memory figures in benchmarks and plans come from here, never from timing runs."""


def compiled_cost(compiled) -> dict:
  """Per-device bytes (temp + arguments + outputs - aliased) and FLOPs of a compiled function."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  out = {"flops": float((cost or {}).get("flops", 0.0))}
  if mem is not None:
    out.update(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
               output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes))
    out["bytes"] = (out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
                    - out["alias_bytes"])
  return out
