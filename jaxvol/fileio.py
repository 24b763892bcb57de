"""Atomic file writes: a temporary file beside the target, then one rename.

Readers never see a half-written file, and a failure leaves the previous file (or none) in place.
Imports nothing from jaxvol, so every layer may use it.
"""

import csv
import io
import json
import os
import tempfile
from typing import Any


def default_mode(directory: bool = False) -> int:
  """The mode a plain `open()` (or `mkdir`) would give under the current umask: 0o644 (0o755)
  under the usual 022. Temporary files are created owner-only, so atomic writes set this before
  the rename, and other members of a cluster group can read the outputs."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if directory else 0o666) & ~mask


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="") as f:
      f.write(text)
    os.chmod(tmp, default_mode() if mode is None else mode)  # mkstemp: owner-only
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_bytes_atomic(path: str | os.PathLike, write) -> None:
  """Calls write(binary file) on a temporary file beside `path`, then renames it into place."""
  path = os.fspath(path)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                             prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.chmod(tmp, default_mode())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
  write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_csv_atomic(path: str | os.PathLike, rows: list[dict]) -> None:
  """Writes dict rows as CSV, atomically; columns in first-seen order over all rows, a row
  without a column leaves its cell empty."""
  fields = list(dict.fromkeys(k for row in rows for k in row))
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=fields, restval="")
  writer.writeheader()
  writer.writerows(rows)
  write_text_atomic(path, buf.getvalue())
