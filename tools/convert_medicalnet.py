"""Command line: convert MedicalNet weights once, so evaluation can load them without PyTorch.

Example::

  python tools/convert_medicalnet.py pretrain/resnet_50_23dataset.pth medicalnet_r50.npz
  python tools/convert_medicalnet.py pretrain/resnet_50_23dataset.pth medicalnet_r50.msgpack

IN is a MedicalNet release (.pth, needs torch) or an .npz of PyTorch-named arrays. OUT ending in
.npz keeps the PyTorch names (readable by anything, 'module.' prefixes and heads dropped); OUT
ending in .msgpack holds the Flax variables (flax.serialization). Both load with
``jaxvol.models.medicalnet.load_medicalnet``. The file is written atomically (temporary file,
then rename).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np
from flax import serialization

from jaxvol.models import medicalnet


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("source", help="MedicalNet weights: .pth (needs torch) or .npz")
  parser.add_argument("out", help="output file: .npz (PyTorch names) or .msgpack (Flax variables)")
  args = parser.parse_args(argv)

  suffix = os.path.splitext(args.out)[1].lower()
  if suffix not in (".npz", ".msgpack"):
    parser.error(f"OUT must end in .npz or .msgpack, got {args.out!r}")
  try:
    variables = medicalnet.load_medicalnet(args.source)
  except (ImportError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1

  tmp = f"{args.out}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    if suffix == ".npz":
      np.savez(f, **medicalnet.to_torch_state_dict(variables))
    else:
      f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))
  os.replace(tmp, args.out)

  model = medicalnet.model_from_variables(variables)
  count = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.out}: {medicalnet.describe(model)}, shortcut {model.shortcut}, "
        f"{count / 1e6:.1f}M parameters, {medicalnet.feature_dim(model)} features")
  return 0


if __name__ == "__main__":
  sys.exit(main())
