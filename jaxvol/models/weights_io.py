"""Writing converted weights: Flax variables as .msgpack or as an .npz of '/'-joined paths.

Shared by the converters of the authors' checkpoints (convert_sparse, convert_prdit). An .npz
holds one array per leaf under its path ("params/stem/kernel"), readable without Flax; a
.msgpack holds the variables tree (flax.serialization). Written atomically (jaxvol.fileio).
"""

import os
from collections.abc import Mapping

import numpy as np

from jaxvol import fileio

SUFFIXES = (".npz", ".msgpack")


def flatten(tree, prefix=()):
  """Yields ('a/b/c', leaf) for every leaf of a nested dict."""
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from flatten(v, prefix + (str(k),))
    else:
      yield "/".join(prefix + (str(k),)), v


def save_variables(path: str, variables: dict) -> int:
  """Writes `variables` to `path` (.npz or .msgpack); returns the number of parameters."""
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in SUFFIXES:
    raise ValueError(f"converted weights end in .npz or .msgpack, got {path!r}")
  flat = {k: np.asarray(v) for k, v in flatten(variables)}

  def write(f):
    if suffix == ".npz":
      np.savez(f, **flat)
    else:
      from flax import serialization  # pylint: disable=import-outside-toplevel
      f.write(serialization.msgpack_serialize(unflatten(flat)))

  fileio.write_bytes_atomic(path, write)
  return int(sum(v.size for v in flat.values()))


def unflatten(flat: dict) -> dict:
  """The nested dict of {'a/b/c': leaf}."""
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
