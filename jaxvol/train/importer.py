"""`jaxvol import`: an authors' released checkpoint as a jaxvol run.

  jaxvol import --from sparse|prdit|prdit-fm CHECKPOINT --config=NAME[:VARIANT] --workdir=RUN \
      --config.data.store=STORE [--weights ema|model] [--config.KEY=VALUE ...]

reads the authors' checkpoint (.pt/.pth with PyTorch installed, or an .npz of their state dict),
converts it by its PyTorch names (jaxvol.models.convert_sparse for mirthAI/sparse-3d-diffusion,
jaxvol.models.convert_prdit for Fredy-Zhang/PRDiT and PRDiT-FM), checks that the config builds the
same network (every field the weights imply, named with the override that fixes it; then every
parameter's shape against the method's own initialisation), and writes an Orbax checkpoint at
step 0 into RUN/checkpoints with the run metadata a trained run has (config, the store's presets,
inference rules) plus an "imported" record (source, file, SHA-256, weights entry). Afterwards
`jaxvol sample / evaluate / predict` and warm starts (`prdit.warm_start_workdir=RUN`) use RUN like a
trained run; both the raw and the EMA parameters of the state are the imported weights, and the
optimizer state is fresh. A workdir that already holds checkpoints is refused, nothing is written
on any error, and the checkpoint is written synchronously and verified before the command returns.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from jaxvol import fileio
from jaxvol.errors import ConfigError
from jaxvol.models import convert_prdit
from jaxvol.models import convert_sparse
from jaxvol.models import prdit as prdit_lib
from jaxvol.train import checkpoint as ckpt_lib
from jaxvol.train import loop
from jaxvol.train import state as state_lib

log = logging.getLogger("jaxvol")
SOURCES = ("sparse", "prdit", "prdit-fm")


def _differences(config, wanted: dict) -> list[str]:
  """`--config.K=V` for every dotted field whose value differs from what the weights imply."""
  out = []
  for key, value in wanted.items():
    node = config
    for part in key.split("."):
      node = node[part]
    now = tuple(node) if isinstance(node, (list, tuple)) else node
    want = tuple(value) if isinstance(value, (list, tuple)) else value
    if now != want:
      out.append(f"--config.{key}={value!r} (the config has {node!r})")
  return out


def _sparse_fields(config, state_dict) -> tuple[dict, dict]:
  fields = convert_sparse.infer_model_fields(state_dict, config.model.num_heads,
                                             config.model.groups)
  wanted = {"method": "sparse", "model.layout": "authors", "model.base_width": fields["base_width"],
            "model.channel_mults": fields["channel_mults"],
            "model.num_res_blocks": fields["num_res_blocks"],
            "model.attention_levels": fields["attention_levels"],
            "model.time_embed_dim": fields["time_embed_dim"], "model.stm": fields["stm"]}
  if fields["stm"]:
    wanted["model.stm_dim"] = fields["stm_dim"]
  net = convert_sparse.net_from_fields(fields)
  return wanted, convert_sparse.convert_torch_state_dict(state_dict, net)


def _prdit_fields(config, state_dict, flow: bool) -> tuple[dict, dict]:
  fields = convert_prdit.infer_fields(state_dict)
  if (fields["outputs"] == 1) != flow:
    raise ConfigError(
        f"the checkpoint has {'one velocity' if fields['outputs'] == 1 else 'the (eps, x0)'} "
        f"output head, so it comes from {'PRDiT-FM' if fields['outputs'] == 1 else 'PRDiT'}: "
        f"use --from {'prdit-fm' if fields['outputs'] == 1 else 'prdit'}")
  wanted = {"method": "prdit", "diffusion.objective": "flow" if flow else "diffusion",
            "prdit.patch": fields["patch"], "prdit.stride": fields["stride"],
            "prdit.local_width": 0, "prdit.stage": fields["stage"]}
  p = config.prdit
  size_width, _, size_heads = prdit_lib.PRDIT_SIZES.get(p.size, (None, None, None))
  width = p.width or size_width  # what the config builds: an override, else its size's
  if (p.time_width or width) != fields["time_width"]:
    wanted["prdit.time_width"] = fields["time_width"]
  if fields["depth"]:
    wanted.update({"prdit.depth": fields["depth"], "prdit.mlp_ratio": fields["mlp_ratio"]})
    if width != fields["width"]:
      wanted["prdit.width"] = fields["width"]
    if fields["heads"] and (p.heads or size_heads) != fields["heads"]:
      wanted["prdit.heads"] = fields["heads"]
  return wanted, convert_prdit.convert_state_dict(state_dict)


def _read(source: str, path: str, weights: str) -> dict:
  if source == "sparse":
    return convert_sparse.read_state_dict(path)
  return convert_prdit.read_checkpoint(path, weights)


def _shape_problems(want, got) -> list[str]:
  want_flat = {jax.tree_util.keystr(k): v.shape for k, v in
               jax.tree_util.tree_flatten_with_path(want)[0]}
  got_flat = {jax.tree_util.keystr(k): np.shape(v) for k, v in
              jax.tree_util.tree_flatten_with_path(got)[0]}
  problems = [f"{k}: missing from the checkpoint" for k in want_flat if k not in got_flat]
  problems += [f"{k}: not a parameter of the configured network" for k in got_flat
               if k not in want_flat]
  problems += [f"{k}: checkpoint {got_flat[k]} vs network {want_flat[k]}" for k in want_flat
               if k in got_flat and tuple(got_flat[k]) != tuple(want_flat[k])]
  return problems


def import_checkpoint(config, workdir: str, source: str, path: str, weights: str = "ema") -> dict:
  """Writes WORKDIR/checkpoints/0 from an authors' checkpoint (module docstring).

  Returns the "imported" record written into the checkpoint's metadata.

  Raises:
    ConfigError: an unknown source, a config that builds another network, or a workdir with
      checkpoints already.
    FileNotFoundError: no such checkpoint file.
  """
  if source not in SOURCES:
    raise ConfigError(f"--from {source!r}: expected one of {SOURCES}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no checkpoint file {path}")
  existing = ckpt_lib.Checkpointer(workdir, with_data=False, async_save=False, create=False)
  try:
    if existing.latest_step() is not None:
      raise ConfigError(f"{existing.directory} already holds checkpoints (step "
                        f"{existing.latest_step()}): import into a new workdir")
  finally:
    existing.close()
  state_dict = _read(source, path, weights)
  if source == "sparse":
    wanted, variables = _sparse_fields(config, state_dict)
  else:
    wanted, variables = _prdit_fields(config, state_dict, flow=source == "prdit-fm")
  fixes = _differences(config, wanted)
  if fixes:
    raise ConfigError(f"{path} holds a network the config does not build; set "
                      + ", ".join(fixes))
  parts = loop.build_everything(config, workdir, check=False)
  problems = _shape_problems(parts.abstract_state["params"], variables)
  if problems:
    raise ConfigError(f"{path} does not fit the configured {config.method} network: "
                      + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
  state = state_lib.create_state(parts.method, parts.optimizer, jax.random.PRNGKey(config.seed),
                                 parts.example, parts.state_sharding)
  placed = jax.tree.map(lambda v, s: jax.device_put(np.asarray(v, s.dtype), s.sharding),
                        variables, parts.abstract_state["params"])
  state = dict(state, params=placed, ema_params=jax.tree.map(lambda x: x.copy(), placed))
  record = {"from": source, "file": os.path.abspath(path), "sha256": fileio.file_sha256(path),
            "weights": weights if source != "sparse" else "state dict",
            "parameters": int(sum(np.size(v) for v in jax.tree.leaves(variables)))}
  meta = dict(loop.run_meta(config, config.data.store), imported=record)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=1, with_data=False, async_save=False)
  try:
    ckpt.save(0, state, meta, force=True)
  finally:
    ckpt.close()  # waits for the save and verifies it
  log.info("imported %s (%s, %s parameters) into %s at step 0", path, source,
           f"{record['parameters']:,}", ckpt.directory)
  return record
