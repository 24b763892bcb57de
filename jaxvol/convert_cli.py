"""Command line: convert a datalist of NIfTI volumes into a jaxvol store.

Example (`python tools/convert.py ...` in a checkout runs the same)::

  jaxvol convert --datalist list.csv --out STORE \\
      --preset t1=mri --preset t2=mri \\
      --preset pet_low=pet:ref=pet_full --preset pet_full=pet \\
      --preset ct=ct:lo=-1000:hi=1000

Each --preset is MODALITY=KIND[:KEY=VALUE...]; KEY=VALUE pairs go to `fit_preset` (numbers are
parsed as floats), except `ref`, which takes another modality's scale (same subject), and `fit`:
a percentile preset (PET without a cap, MRI without lo/hi) is fitted on the training split by
default (`fit=train`: the median over training subjects, so no test volume sets a scale);
`fit=volume` fits it on each volume itself, which only an input modality may use (evaluation
refuses a target whose scale comes from its own volume). Bad inputs
print the reason (naming the file) and exit with status 1; nothing is written then.
"""

from __future__ import annotations

import argparse
import collections
import sys

from jaxvol.data import store as store_lib


def parse_preset(text: str) -> tuple[str, dict]:
  """Parses one --preset value.

  'pet_low=pet:ref=pet_full:cap=8' -> ('pet_low', {'kind': 'pet', 'ref': 'pet_full', 'cap': 8.0}).
  """
  modality, sep, rest = text.partition("=")
  if not sep or not modality or not rest:
    raise argparse.ArgumentTypeError(f"--preset {text!r}: expected MODALITY=KIND[:KEY=VALUE...]")
  kind, *options = rest.split(":")
  spec: dict = {"kind": kind}
  for option in options:
    key, sep, value = option.partition("=")
    if not sep or not key:
      raise argparse.ArgumentTypeError(f"--preset {text!r}: option {option!r} is not KEY=VALUE")
    if key in ("ref", "fit"):
      spec[key] = value
    else:
      try:
        spec[key] = float(value)
      except ValueError:
        raise argparse.ArgumentTypeError(
            f"--preset {text!r}: {key}={value!r} is not a number") from None
  return modality, spec


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--datalist", required=True, help="CSV or JSON datalist")
  parser.add_argument("--out", required=True, help="store folder to create")
  parser.add_argument("--preset", action="append", default=[], type=parse_preset,
                      metavar="MOD=KIND[:K=V...]", help="intensity preset of one modality")
  parser.add_argument("--dataroot", default=None,
                      help="folder of the datalist's relative paths (overrides a JSON \"dataroot\")")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing store")
  args = parser.parse_args(argv)

  presets = {}
  for modality, spec in args.preset:
    if modality in presets:
      parser.error(f"--preset given twice for {modality!r}")
    presets[modality] = spec
  try:
    manifest = store_lib.convert(args.datalist, args.out, presets, overwrite=args.overwrite,
                                 dataroot=args.dataroot)
  except (ValueError, FileExistsError) as e:  # VolumeError is a ValueError.
    print(f"error: {e}", file=sys.stderr)
    return 1

  splits = collections.Counter(s["split"] for s in manifest["subjects"])
  print(f"wrote {args.out}: {len(manifest['subjects'])} subjects "
        f"({', '.join(f'{k} {v}' for k, v in sorted(splits.items()))}), "
        f"modalities {', '.join(manifest['modalities'])}")
  shown = 10  # Enough to eyeball the presets without flooding the terminal.
  for subject in manifest["subjects"][:shown]:
    parts = []
    for modality, vol in subject["volumes"].items():
      p = vol["preset"]
      parts.append(f"{modality}: {p['name']} [{p['lo']:.4g}, {p['hi']:.4g}]")
    print(f"  {subject['id']} ({subject['split']}, shape {tuple(subject['shape'])}): "
          + "; ".join(parts))
  if len(manifest["subjects"]) > shown:
    print(f"  ... and {len(manifest['subjects']) - shown} more (see {args.out}/manifest.json)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
