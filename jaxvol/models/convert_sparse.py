"""PyTorch weights of the sparse-diffusion authors' U-Net -> jaxvol's UNet3D in the authors' layout.

"Structure-adaptive sparse diffusion for 3D medical image enhancement" (MICCAI 2026); their code,
mirthAI/sparse-3d-diffusion, saves `SuperResModel_noatt` (a `UNetModel` with the STM encoder
`HybridCondEncoder`) as a plain state dict (`modelNNNNNN.pt`, `ema_0.99_NNNNNN.pt`). This module
maps those names and arrays onto the Flax parameters of `unet3d.UNet3D(layout="authors",
stm=True)`:

  input_blocks.0.0                  -> stem
  input_blocks.k.0 / .1             -> down{level}_{i} (ResBlock) / down{level}_attn{i}
  input_blocks.k.0.op               -> downsample{level}
  middle_block.0 / .1               -> mid0 / mid1
  output_blocks.k.0 / .1 / .N.conv  -> up{level}_{i} / up{level}_attn{i} / upsample{level}
  out.0 / out.2                     -> out_norm / out
  time_embed.0 / .2                 -> temb0 / temb1
  cond_encoder.global_branch.{0,1,3,4,6,7}  -> stm_encoder/vol{0,1,2} and vol{0,1,2}_norm
  cond_encoder.coronal_branch / sagittal_branch.{0,1,3,4} -> stm_encoder/coronal*/sagittal*
  cond_encoder.projection.0         -> stm_encoder/code
ResBlock: in_layers.0 -> norm1, in_layers.2 -> conv1, emb_layers.1 -> emb_proj, out_layers.0 ->
norm2, out_layers.3 -> conv2, skip_connection -> skip, cond_modulation.0 / .2 -> stm/hidden /
stm/film. Attention: norm, qkv (their "legacy" head-major q|k|v rows are reordered to jaxvol's
q|k|v-major columns), proj_out -> out.

Layouts: convolution kernels (O, I, kd, kh, kw) -> (kd, kh, kw, I, O) (2D: (kh, kw, I, O)),
linear weights (O, I) -> (I, O), GroupNorm weight -> scale. Their volumes are (B, C, D, H, W) and
ours (B, D, H, W, C) with D, H, W in the same order (only the channel axis moves), so the
converted network applied to x.transpose(0, 2, 3, 4, 1) returns their output transposed the same
way (tests/test_authors_parity.py). The 2D branches of STM average over axes 2 and 3 of
ours, their H and W (jaxvol.models.stm).

Command line (reading a .pt needs torch; an .npz of the state dict's arrays does not)::

  python -m jaxvol.models.convert_sparse model200000.pt sparse_ct.msgpack
  python -m jaxvol.models.convert_sparse model200000.npz sparse_ct.npz --num_heads 4

The architecture (widths, levels, blocks, attention levels, time-embedding and STM widths) is read
from the state dict; the attention head count is not stored in it (their configs: 4) and neither
is the GroupNorm group count (their code: 32). The tool prints the config.model fields the
converted weights need (`layout="authors"`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Mapping

import numpy as np

from jaxvol.models import unet3d
from jaxvol.models import weights_io


def _conv(w: np.ndarray) -> np.ndarray:
  """PyTorch (O, I, *k) -> Flax (*k, I, O)."""
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def _resblock(torch: str, flax: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
  return [(f"{torch}.in_layers.0", flax + ("norm1",), "norm"),
          (f"{torch}.in_layers.2", flax + ("conv1",), "conv"),
          (f"{torch}.emb_layers.1", flax + ("emb_proj",), "dense"),
          (f"{torch}.out_layers.0", flax + ("norm2",), "norm"),
          (f"{torch}.out_layers.3", flax + ("conv2",), "conv"),
          (f"{torch}.skip_connection", flax + ("skip",), "conv?"),
          (f"{torch}.cond_modulation.0", flax + ("stm", "hidden"), "dense"),
          (f"{torch}.cond_modulation.2", flax + ("stm", "film"), "dense")]


def _attention(torch: str, flax: tuple[str, ...]) -> list[tuple[str, tuple[str, ...], str]]:
  return [(f"{torch}.norm", flax + ("norm",), "norm"),
          (f"{torch}.qkv", flax + ("qkv",), "qkv"),
          (f"{torch}.proj_out", flax + ("out",), "conv1d")]


def module_map(net: unet3d.UNet3D) -> list[tuple[str, tuple[str, ...], str]]:
  """(PyTorch module name, Flax module path, kind) for every parameterised module of `net`."""
  if net.layout != "authors":
    raise ValueError(f"the authors' weights need UNet3D(layout='authors'), got {net.layout!r}")
  levels = len(net.channel_mults)
  out = [("time_embed.0", ("temb0",), "dense"), ("time_embed.2", ("temb1",), "dense"),
         ("input_blocks.0.0", ("stem",), "conv")]
  k = 1
  for lvl in range(levels):
    for i in range(net.num_res_blocks):
      out += _resblock(f"input_blocks.{k}.0", (f"down{lvl}_{i}",))
      if lvl in net.attention_levels:
        out += _attention(f"input_blocks.{k}.1", (f"down{lvl}_attn{i}",))
      k += 1
    if lvl < levels - 1:
      out.append((f"input_blocks.{k}.0.op", (f"downsample{lvl}",), "conv"))
      k += 1
  out += _resblock("middle_block.0", ("mid0",)) + _resblock("middle_block.1", ("mid1",))
  k = 0
  for lvl in reversed(range(levels)):
    for i in range(net.num_res_blocks + 1):
      out += _resblock(f"output_blocks.{k}.0", (f"up{lvl}_{i}",))
      j = 1
      if lvl in net.attention_levels:
        out += _attention(f"output_blocks.{k}.1", (f"up{lvl}_attn{i}",))
        j = 2
      if lvl > 0 and i == net.num_res_blocks:
        out.append((f"output_blocks.{k}.{j}.conv", (f"upsample{lvl}",), "conv"))
      k += 1
  out += [("out.0", ("out_norm",), "norm"), ("out.2", ("out",), "conv")]
  if net.stm:
    enc = ("stm_encoder",)
    for idx, name in ((0, "vol0"), (3, "vol1"), (6, "vol2")):
      out += [(f"cond_encoder.global_branch.{idx}", enc + (name,), "conv"),
              (f"cond_encoder.global_branch.{idx + 1}", enc + (f"{name}_norm",), "norm")]
    for branch in ("coronal", "sagittal"):
      for idx, name in ((0, f"{branch}0"), (3, f"{branch}1")):
        out += [(f"cond_encoder.{branch}_branch.{idx}", enc + (name,), "conv"),
                (f"cond_encoder.{branch}_branch.{idx + 1}", enc + (f"{name}_norm",), "norm")]
    out.append(("cond_encoder.projection.0", enc + ("code",), "dense"))
  return out


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  out = {}
  for name, value in state_dict.items():
    name = name[len("module."):] if name.startswith("module.") else name
    out[name] = np.asarray(value, np.float32)
  return out


def convert_torch_state_dict(state_dict: Mapping[str, Any], net: unet3d.UNet3D) -> dict:
  """Their state dict (names -> arrays) -> {"params": ...} for `net` (layout "authors").

  Raises ValueError naming the keys when the state dict has parameters the network lacks or
  lacks parameters it needs (a different architecture: check the config.model fields).
  """
  sd = _strip(state_dict)
  heads = net.num_heads
  params: dict = {}
  used = set()

  def put(path, leaf, value):
    node = params
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value

  for torch_name, path, kind in module_map(net):
    w_key, b_key = f"{torch_name}.weight", f"{torch_name}.bias"
    if kind == "conv?":  # a 1x1 skip exists only where the block changes width
      if w_key not in sd:
        continue
      kind = "conv"
    if w_key not in sd:
      raise ValueError(f"state dict lacks {w_key} (for {'/'.join(path)}): not the network of "
                       "these config.model fields")
    w, b = sd[w_key], sd.get(b_key)
    used.update({w_key, b_key})
    if kind == "conv":
      put(path, "kernel", _conv(w))
    elif kind == "conv1d":
      put(path, "kernel", w[:, :, 0].T)
    elif kind == "dense":
      put(path, "kernel", w.T)
    elif kind == "norm":
      put(path, "scale", w)
    elif kind == "qkv":
      c = w.shape[1]
      if w.shape[0] != 3 * c or c % heads:
        raise ValueError(f"{w_key}: shape {w.shape} is not a {heads}-head attention of width {c}")
      order = np.arange(3 * c).reshape(heads, 3, c // heads).transpose(1, 0, 2).reshape(-1)
      w, b = w[order, :, 0], b[order]
      put(path, "kernel", w.T)
    if b is None:
      raise ValueError(f"state dict lacks {b_key}")
    put(path, "bias", b)
  extra = sorted(k for k in sd if k not in used)
  if extra:
    raise ValueError(f"state dict has parameters this network lacks: {extra[:8]}"
                     + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
  return {"params": params}


def _shape_check(variables: dict, net: unet3d.UNet3D, in_channels: int, cond_channels: int):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  side = -(-48 // net.divisor) * net.divisor  # the authors' STM encoder needs >= 48 voxels
  x = jnp.zeros((1, side, side, side, in_channels))
  y = jnp.zeros((1, side, side, side, cond_channels)) if net.stm else None
  ref = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32),
                                        structure=y))
  want = {jax.tree_util.keystr(p): l.shape for p, l in jax.tree_util.tree_leaves_with_path(ref)}
  got = {jax.tree_util.keystr(p): np.shape(l)
         for p, l in jax.tree_util.tree_leaves_with_path(variables)}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
  if missing or extra or bad:
    raise ValueError(f"converted weights do not fit the network: missing {missing[:5]}, "
                     f"unexpected {extra[:5]}, shape mismatches {bad[:5]}")


def infer_model_fields(state_dict: Mapping[str, Any], num_heads: int = 4,
                       groups: int = 32) -> dict:
  """The config.model fields (and input/output channels) of the network a state dict holds."""
  sd = _strip(state_dict)
  if "time_embed.0.weight" not in sd or "input_blocks.0.0.weight" not in sd:
    raise ValueError("not a state dict of the sparse-diffusion authors' UNetModel "
                     "(no time_embed.0.weight / input_blocks.0.0.weight)")
  temb, base = sd["time_embed.0.weight"].shape
  ks = sorted({int(m.group(1)) for m in map(re.compile(r"input_blocks\.(\d+)\.").match, sd) if m})
  widths, attention, level, blocks = [], set(), [], []
  for k in ks[1:]:
    if f"input_blocks.{k}.0.op.weight" in sd:
      widths.append(level)
      level = []
      continue
    level.append(sd[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0])
    if f"input_blocks.{k}.1.qkv.weight" in sd:
      attention.add(len(widths))
  widths.append(level)
  blocks = {len(w) for w in widths}
  if len(blocks) != 1 or not all(len(set(w)) == 1 for w in widths):
    raise ValueError(f"unexpected encoder layout (res-block widths per level {widths})")
  mults = tuple(int(w[0] // base) for w in widths)
  fields = dict(layout="authors", base_width=int(base), channel_mults=mults,
                num_res_blocks=blocks.pop(), attention_levels=tuple(sorted(attention)),
                num_heads=int(num_heads), groups=int(groups), time_embed_dim=int(temb),
                stm="cond_encoder.projection.0.weight" in sd)
  if fields["stm"]:
    fields["stm_dim"] = int(sd["cond_encoder.projection.0.weight"].shape[0])
  fields["in_channels"] = int(sd["input_blocks.0.0.weight"].shape[1])
  fields["out_channels"] = int(sd["out.2.weight"].shape[0])
  if fields["stm"]:
    fields["cond_channels"] = int(sd["cond_encoder.global_branch.0.weight"].shape[1])
  return fields


def net_from_fields(fields: Mapping[str, Any]) -> unet3d.UNet3D:
  keys = ("base_width", "channel_mults", "num_res_blocks", "attention_levels", "num_heads",
          "groups", "time_embed_dim", "stm", "stm_dim", "layout")
  return unet3d.UNet3D(out_channels=fields["out_channels"],
                       **{k: fields[k] for k in keys if k in fields})


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A .pt/.pth (needs torch) or .npz of their state dict -> {name: float32 array}."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch, which is not installed; convert it once "
                      "where torch is available, to an .npz or .msgpack") from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  state = state.get("state_dict", state) if isinstance(state, dict) else state
  return {k: v.detach().float().numpy() for k, v in state.items()}


def load_authors_weights(path: str, num_heads: int = 4, groups: int = 32):
  """(UNet3D in the authors' layout, {"params": ...}) from one of their checkpoint files."""
  sd = read_state_dict(path)
  fields = infer_model_fields(sd, num_heads, groups)
  net = net_from_fields(fields)
  variables = convert_torch_state_dict(sd, net)
  _shape_check(variables, net, fields["in_channels"], fields.get("cond_channels", 1))
  return net, variables, fields


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("source", help="their checkpoint: .pt/.pth (needs torch) or .npz")
  parser.add_argument("out", help="output: .msgpack (Flax variables) or .npz ('/'-joined paths)")
  parser.add_argument("--num_heads", type=int, default=4, help="attention heads (their configs: 4)")
  parser.add_argument("--groups", type=int, default=32, help="GroupNorm groups (their code: 32)")
  args = parser.parse_args(argv)
  suffix = os.path.splitext(args.out)[1].lower()
  if suffix not in (".npz", ".msgpack"):
    parser.error(f"OUT must end in .npz or .msgpack, got {args.out!r}")
  try:
    _, variables, fields = load_authors_weights(args.source, args.num_heads, args.groups)
  except (ImportError, ValueError, OSError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = weights_io.save_variables(args.out, variables)
  model = {k: v for k, v in fields.items() if k not in ("in_channels", "out_channels",
                                                       "cond_channels")}
  print(f"wrote {args.out}: {count:,} parameters; config.model fields: "
        + ", ".join(f"{k}={v!r}" for k, v in model.items()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
