"""The experiment configs, shipped with the package, and how a --config value finds one.

Each module here has `get_config(variant)` returning a ConfigDict; its docstring gives the data,
the launch commands and the variants. The repository's configs/*.py re-export these modules, so
`--config=configs/ppdm_pet_denoise.py:smoke` (a path, as ml_collections' config_flags takes it)
and `--config=ppdm_pet_denoise:smoke` (a NAME, found here, also in an installed jaxvol) load the
same config.

Kept free of heavy imports: `jaxvol --help` and name resolution must not start JAX.
"""

from __future__ import annotations

import ast
import difflib
import os
import pathlib
from typing import Sequence

DIR = pathlib.Path(__file__).resolve().parent


class UnknownConfigError(ValueError):
  """A --config value that is neither an existing file nor a packaged config's name."""


def names() -> list[str]:
  """The packaged configs' names (module names, without .py), sorted."""
  return sorted(p.stem for p in DIR.glob("*.py") if not p.stem.startswith("_"))


def summary(name: str) -> str:
  """The first paragraph of a packaged config's docstring on one line, read without importing."""
  doc = ast.get_docstring(ast.parse((DIR / f"{name}.py").read_text(encoding="utf-8"))) or ""
  return " ".join(doc.split("\n\n", 1)[0].split())


def resolve(spec: str) -> str:
  """Maps a --config value 'NAME_OR_PATH[:variant]' to 'FILE[:variant]' for config_flags.

  An existing file is kept as given (paths win over names). Otherwise a packaged config's name,
  with or without `.py`, becomes that module's file in this package.

  Args:
    spec: the --config value; as in config_flags, everything after the first ':' is the variant.

  Returns:
    The value with its file part replaced by the packaged file's path where a name was given.

  Raises:
    UnknownConfigError: a one-line message naming the available configs (and the closest name).
  """
  target, sep, variant = spec.partition(":")
  if os.path.isfile(target):
    return spec
  available = names()
  stem = target[:-3] if target.endswith(".py") else target
  if stem in available and os.sep not in target and "/" not in target:
    return f"{DIR / stem}.py{sep}{variant}"
  base = os.path.basename(stem)
  if not target:
    problem = "empty --config"
  elif os.sep in target or "/" in target:
    problem = f"config file {target!r} not found"
  else:
    problem = f"unknown config {target!r}"
  hint = ""
  if base in available:  # a path to a missing copy of a packaged config
    hint = f"; the packaged one is --config={base}{sep}{variant}"
  elif close := difflib.get_close_matches(base, available, n=1, cutoff=0.5):
    hint = f"; did you mean {close[0]}?"
  raise UnknownConfigError(
      f"{problem}{hint} (a config file path or one of: {', '.join(available)})")


def resolve_argv(argv: Sequence[str]) -> list[str]:
  """`resolve` applied to every --config value of an absl command line (`--config=X`,
  `--config X`, one dash or two) before '--'; `--config.KEY=VALUE` overrides are left alone."""
  out = list(argv)
  i = 0
  while i < len(out) and out[i] != "--":
    flag, eq, value = out[i].partition("=")
    if flag in ("--config", "-config"):
      if eq:
        out[i] = f"{flag}={resolve(value)}"
      elif i + 1 < len(out):
        out[i + 1] = resolve(out[i + 1])
        i += 1
    i += 1
  return out
