"""The authors' PyTorch PRDiT weights -> jaxvol's PRDiT parameters (jaxvol.models.prdit).

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026);
authors' code Fredy-Zhang/PRDiT. Their checkpoints (train.py) are dicts holding "model" (the raw
weights), "ema", "opt" and bookkeeping; `state_dict_from_checkpoint` picks "ema" by default, as
their sample.py does (utils/download.py), or "model" (the raw weights their stage 2 and warm
starts load), accepts a bare state dict as well, and strips DistributedDataParallel's "module."
prefix. A stage-1 checkpoint (depth 0) has no fine head and no transformer.

Names (PyTorch -> Flax, kernels transposed from (out, in) to (in, out)):
  t_embedder.mlp.0                      local/time_hidden
  t_embedder.coarse_head                local/time_coarse
  coarse.mlp_denoise.adaLN_modulation.1 local/modulation
  coarse.mlp_denoise.mlp{1,2}.fc1_g     local/block{0,1}/gate
  coarse.mlp_denoise.mlp{1,2}.fc1_x     local/block{0,1}/value
  coarse.mlp_denoise.mlp{1,2}.norm      local/block{0,1}/hidden_norm (weight -> scale)
  coarse.mlp_denoise.mlp{1,2}.fc2       local/block{0,1}/out
  coarse.mlp_denoise.linear_final       local/out
  t_embedder.fine_head                  residual/time_fine
  fine.patch_embedder.{fc1,fc2,skip}    residual/embed_{in,out,skip}
  fine.patch_embedder.norm              residual/embed_norm
  fine.blocks.N.adaLN_modulation.1      residual/blockN/modulation
  fine.blocks.N.attn.{qkv,proj}         residual/blockN/attn/{qkv,proj}
  fine.blocks.N.mlp.{fc1,fc2}           residual/blockN/mlp_{in,out}
  fine.final_layer.adaLN_modulation.1   residual/final_modulation
  fine.final_layer.linear               residual/out
The fused qkv maps as it is: both split its output as (q, k, v) x heads x head_dim. The position
code is a non-persistent buffer in their model and a constant in ours (no parameter).

Window layout: their tokens hold a window channel-major, (C, p, p, p), ours channels last,
(p, p, p, C) (jaxvol.ops.tokens). With C = 1, as in all their models, the two are the same; for
C > 1 the conversion permutes the window axis of every weight that touches it (the local
modulation's outputs, the SwiGLU inputs and outputs, the local read-out's input, the DiT's patch
embedding inputs; not the coarse head, whose window-wide output only feeds the modulation).
Token order (row-major over the D, H, W token grid) and the (s, s, s, 2C) output blocks already
agree.

Command line:
  python -m jaxvol.models.convert_prdit IN.pt|IN.npz OUT.msgpack|OUT.npz [--weights ema|model]
      [--channels C]
IN is one of their checkpoints (.pt/.pth, needs torch only here) or an .npz of PyTorch-named
arrays; OUT .msgpack holds the Flax variables (flax.serialization), OUT .npz the same as flat
"params/local/out/kernel" keys. `load_variables` reads either back. The inferred model fields
(`infer_fields`) are printed: build the matching jaxvol.models.prdit.PRDiT from them.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from jaxvol.models import prdit as prdit_lib
from jaxvol.models import weights_io

# Attention heads of the authors' standard widths (models/__init__.py); other widths need --heads.
HEADS_OF_WIDTH = {192: 6, 384: 6, 768: 12, 1024: 16, 1152: 16}

# (regex on the PyTorch module path, Flax path template, how the window axis is involved)
# window: "out" = the output features are window features, "in" = the inputs are, "mod" = the
# output is several window-wide chunks.
_RULES = (
    (r"t_embedder\.mlp\.0", "local/time_hidden", None),
    # The coarse head's output is window-wide but not window-ordered: it only feeds the
    # modulation Dense, so it keeps its order.
    (r"t_embedder\.coarse_head", "local/time_coarse", None),
    (r"t_embedder\.fine_head", "residual/time_fine", None),
    (r"coarse\.mlp_denoise\.adaLN_modulation\.1", "local/modulation", "mod"),
    (r"coarse\.mlp_denoise\.mlp([12])\.fc1_g", "local/block{0}/gate", "in"),
    (r"coarse\.mlp_denoise\.mlp([12])\.fc1_x", "local/block{0}/value", "in"),
    (r"coarse\.mlp_denoise\.mlp([12])\.norm", "local/block{0}/hidden_norm", None),
    (r"coarse\.mlp_denoise\.mlp([12])\.fc2", "local/block{0}/out", "out"),
    (r"coarse\.mlp_denoise\.linear_final", "local/out", "in"),
    (r"fine\.patch_embedder\.fc1", "residual/embed_in", "in"),
    (r"fine\.patch_embedder\.fc2", "residual/embed_out", None),
    (r"fine\.patch_embedder\.skip", "residual/embed_skip", "in"),
    (r"fine\.patch_embedder\.norm", "residual/embed_norm", None),
    (r"fine\.blocks\.(\d+)\.adaLN_modulation\.1", "residual/block{0}/modulation", None),
    (r"fine\.blocks\.(\d+)\.attn\.qkv", "residual/block{0}/attn/qkv", None),
    (r"fine\.blocks\.(\d+)\.attn\.proj", "residual/block{0}/attn/proj", None),
    (r"fine\.blocks\.(\d+)\.mlp\.fc1", "residual/block{0}/mlp_in", None),
    (r"fine\.blocks\.(\d+)\.mlp\.fc2", "residual/block{0}/mlp_out", None),
    (r"fine\.final_layer\.adaLN_modulation\.1", "residual/final_modulation", None),
    (r"fine\.final_layer\.linear", "residual/out", None),
)
_IGNORED = re.compile(r"fine\.pos_embed$")  # a buffer, saved only by older PyTorch versions


def state_dict_from_checkpoint(checkpoint, weights: str = "ema") -> dict[str, np.ndarray]:
  """The PyTorch-named numpy arrays of one of their checkpoints (or a bare state dict).

  Args:
    checkpoint: a dict as torch.load returns it: {"model": ..., "ema": ..., ...} from their
      train.py, or a state dict itself; values may be torch tensors or numpy arrays.
    weights: "ema" (what their sample.py loads) or "model" (the raw weights their stage 2 and
      warm starts load). A checkpoint without that entry is an error; a bare state dict ignores it.
  """
  if weights not in ("ema", "model"):
    raise ValueError(f"weights must be ema or model, got {weights!r}")
  if not isinstance(checkpoint, dict):
    raise ValueError(f"a PRDiT checkpoint is a dict, got {type(checkpoint).__name__}")
  if any(isinstance(checkpoint.get(k), dict) for k in ("model", "ema")):
    if not isinstance(checkpoint.get(weights), dict):
      held = sorted(k for k, v in checkpoint.items() if isinstance(v, dict))
      raise ValueError(f"the checkpoint holds {held} but no {weights!r} weights")
    checkpoint = checkpoint[weights]
  out = {}
  for name, value in checkpoint.items():
    if hasattr(value, "detach"):
      value = value.detach().cpu().numpy()
    out[name[len("module."):] if name.startswith("module.") else name] = np.asarray(value)
  return out


def _window_permutation(features: int, channels: int) -> np.ndarray:
  """perm with ours[f] = theirs[perm[f]] for window features (theirs (C,p,p,p), ours (p,p,p,C))."""
  if features % channels:
    raise ValueError(f"window width {features} is not a multiple of {channels} channels")
  p = round((features // channels)**(1 / 3))
  if p**3 * channels != features:
    raise ValueError(f"window width {features} is not C p^3 for C = {channels}")
  return np.arange(features).reshape(channels, p, p, p).transpose(1, 2, 3, 0).reshape(-1)


def infer_fields(state_dict, channels: int = 1) -> dict:
  """The jaxvol PRDiT fields a state dict implies (heads from the standard widths only).

  Returns patch, stride, channels, local_width (None: their local denoiser always works on the
  raw window), width, depth, heads (None when the width is not a standard one), mlp_ratio,
  time_width, stage and outputs (2: PRDiT's (eps, x0) head; 1: PRDiT-FM's velocity head).
  """
  sd = state_dict
  try:
    window = sd["coarse.mlp_denoise.linear_final.weight"].shape[1]
    block_out = sd["coarse.mlp_denoise.linear_final.weight"].shape[0]
    time_width = sd["t_embedder.mlp.0.weight"].shape[0]
  except KeyError as e:
    raise ValueError(f"not a PRDiT state dict: {e.args[0]} is missing") from None
  patch = round((window // channels)**(1 / 3))
  # Each token's block: (eps, x0) with learn_sigma (PRDiT), or one velocity (PRDiT-FM).
  outputs, stride = None, None
  for n in (2, 1):
    s = round((block_out / (n * channels))**(1 / 3))
    if n * channels * s**3 == block_out:
      outputs, stride = n, s
      break
  if patch**3 * channels != window or outputs is None:
    raise ValueError(f"a {window}-wide window and {block_out}-wide blocks are not C p^3 and "
                     f"2 C s^3 (PRDiT) or C s^3 (PRDiT-FM) for C = {channels}: wrong --channels")
  depth = len({m.group(1) for k in sd if (m := re.match(r"fine\.blocks\.(\d+)\.", k))})
  width = sd["fine.final_layer.linear.weight"].shape[1] if depth else time_width
  mlp_ratio = (sd["fine.blocks.0.mlp.fc1.weight"].shape[0] / width) if depth else 4.0
  return {"patch": patch, "stride": stride, "channels": channels, "local_width": None,
          "width": width, "depth": depth, "heads": HEADS_OF_WIDTH.get(width),
          "mlp_ratio": mlp_ratio, "time_width": time_width, "stage": 2 if depth else 1,
          "outputs": outputs}


def convert_state_dict(state_dict, channels: int = 1, complete: bool = True) -> dict:
  """Their PRDiT state dict (PyTorch names -> arrays) -> jaxvol Flax variables {"params": ...}.

  Raises ValueError for names it does not know and, with `complete`, for a model missing parts
  its depth needs (`complete=False` converts a part, e.g. one DiT block's entries).
  """
  sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items() if not _IGNORED.match(k)}
  window = sd["coarse.mlp_denoise.linear_final.weight"].shape[1] if (
      "coarse.mlp_denoise.linear_final.weight" in sd) else None
  perm = None if channels == 1 or window is None else _window_permutation(window, channels)
  params: dict = {}
  unknown = []
  for name, value in sd.items():
    module, _, leaf = name.rpartition(".")
    for pattern, template, involvement in _RULES:
      m = re.fullmatch(pattern, module)
      if m:
        break
    else:
      unknown.append(name)
      continue
    groups = [str(int(g) - 1) if template.startswith("local/block") else g for g in m.groups()]
    path = template.format(*groups).split("/")
    if leaf == "weight" and value.ndim == 2:
      flax_leaf, value = "kernel", value.T
    elif leaf == "weight" and value.ndim == 1:
      flax_leaf = "scale"  # LayerNorm
    elif leaf == "bias":
      flax_leaf = "bias"
    else:
      unknown.append(name)
      continue
    if perm is not None and involvement is not None:
      value = _permute(value, flax_leaf, involvement, perm)
    node = params
    for part in path:
      node = node.setdefault(part, {})
    node[flax_leaf] = np.ascontiguousarray(value)
  if unknown:
    raise ValueError(f"{len(unknown)} names are not PRDiT parameters: {unknown[:8]}")
  if not complete:
    return {"params": params}
  fields = infer_fields(sd, channels)
  expected = {"local": ["time_hidden", "time_coarse", "modulation", "block0", "block1", "out"]}
  if fields["depth"]:
    expected["residual"] = (["time_fine", "embed_in", "embed_out", "embed_skip", "embed_norm",
                             "final_modulation", "out"]
                            + [f"block{i}" for i in range(fields["depth"])])
  missing = [f"{top}/{m}" for top, mods in expected.items() for m in mods
             if m not in params.get(top, {})]
  if missing:
    raise ValueError(f"the state dict lacks parameters of {missing}")
  return {"params": params}


def _permute(value, leaf, involvement, perm):
  n = perm.size
  if involvement == "in":
    return value[perm] if leaf == "kernel" else value
  if involvement == "out":
    return value[..., perm]
  # "mod": several window-wide chunks side by side.
  chunks = value.shape[-1] // n
  idx = (np.arange(chunks)[:, None] * n + perm[None]).reshape(-1)
  return value[..., idx]


def read_checkpoint(path: str, weights: str = "ema") -> dict[str, np.ndarray]:
  """PyTorch-named arrays from one of their .pt/.pth files (needs torch) or an .npz of them."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path) as data:
      return state_dict_from_checkpoint({k: data[k] for k in data.files}, weights)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"reading {path} needs PyTorch, which is not installed: install torch, or "
                      "save the state dict as an .npz of numpy arrays where it is") from None
  checkpoint = torch.load(path, map_location="cpu", weights_only=False)
  return state_dict_from_checkpoint(checkpoint, weights)


def load_variables(path: str) -> dict:
  """Flax variables written by `main` (.msgpack or .npz of "params/..." keys)."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".msgpack":
    from flax import serialization  # pylint: disable=import-outside-toplevel
    with open(path, "rb") as f:
      return serialization.msgpack_restore(f.read())
  if suffix == ".npz":
    with np.load(path) as data:
      if not all(k.startswith("params/") for k in data.files):
        raise ValueError(f"{path} does not hold converted PRDiT variables (params/... keys); "
                         "convert it first: python -m jaxvol.models.convert_prdit IN OUT")
      return weights_io.unflatten({k: data[k] for k in data.files})
  raise ValueError(f"converted PRDiT weights end in .msgpack or .npz, got {path}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("source", help="their checkpoint: .pt/.pth (needs torch) or .npz")
  parser.add_argument("out", help="output: .msgpack (Flax variables) or .npz (params/... keys)")
  parser.add_argument("--weights", default="ema", choices=("ema", "model"),
                      help="checkpoint entry: ema (their sample.py) or model (raw weights)")
  parser.add_argument("--channels", type=int, default=1, help="volume channels C (theirs: 1)")
  args = parser.parse_args(argv)
  suffix = os.path.splitext(args.out)[1].lower()
  if suffix not in (".npz", ".msgpack"):
    parser.error(f"OUT must end in .npz or .msgpack, got {args.out!r}")
  try:
    state_dict = read_checkpoint(args.source, args.weights)
    variables = convert_state_dict(state_dict, args.channels)
    fields = infer_fields(state_dict, args.channels)
  except (ImportError, ValueError, KeyError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = weights_io.save_variables(args.out, variables)
  print(f"wrote {args.out}: {count / 1e6:.2f}M parameters, PRDiT layout "
        f"{prdit_lib.LAYOUT_VERSION}; model fields {fields}"
        + ("" if fields["heads"] else " (heads: not a standard width, set them yourself)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
