"""Atomic file writes: a temporary file (or folder) beside the target, then one rename.

Every write of a file another program or a later run reads goes through here (NIfTI volumes,
the store's zarr arrays and manifest, previews, datalists, records, output folders).

Readers never see a half-written file, and a failure leaves the previous file (or none) in place.
Imports nothing from jaxvol, so every layer may use it.
"""

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any


def default_mode(directory: bool = False) -> int:
  """The mode a plain `open()` (or `mkdir`) would give under the current umask: 0o644 (0o755)
  under the usual 022. Temporary files are created owner-only, so atomic writes set this before
  the rename, and other members of a cluster group can read the outputs."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if directory else 0o666) & ~mask


def write_path_atomic(path: str | os.PathLike, write_to, suffix: str = ".tmp",
                      mode: int | None = None, fsync: bool = False) -> None:
  """Calls write_to(temporary path) for a file beside `path`, then renames it into place.

  Args:
    path: the file to (re)place.
    write_to: writes the file at the path it is given (nibabel picks compression from the
      suffix: pass ".nii.gz").
    suffix: the temporary file's suffix.
    mode: the file's mode (default: what `open()` gives under the umask, `default_mode`).
    fsync: flush the file to disk before the rename (manifests a crash must not lose).
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=suffix)
  os.close(fd)
  try:
    write_to(tmp)
    if fsync:
      with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, default_mode() if mode is None else mode)  # mkstemp: owner-only
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None,
                      fsync: bool = False) -> None:
  def write_to(tmp):
    with open(tmp, "w", newline="") as f:
      f.write(text)
  write_path_atomic(path, write_to, mode=mode, fsync=fsync)


def write_bytes_atomic(path: str | os.PathLike, write, suffix: str = ".tmp") -> None:
  """Calls write(binary file) on a temporary file beside `path`, then renames it into place."""
  def write_to(tmp):
    with open(tmp, "wb") as f:
      write(f)
  write_path_atomic(path, write_to, suffix=suffix)


def write_dir_atomic(path: str | os.PathLike, fill) -> None:
  """Calls fill(temporary folder) for a folder beside `path`, then renames it into place
  (replacing an existing `path`); the temporary folder is removed if anything fails."""
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=folder)
  try:
    fill(tmp)
    if os.path.exists(path):
      shutil.rmtree(path)
    os.chmod(tmp, default_mode(directory=True))  # mkdtemp creates owner-only folders
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def remove(path: str) -> None:
  """Removes a file, link or folder tree if it exists."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


@contextlib.contextmanager
def fresh_dir(final: str, writes: bool = True):
  """The folder one run writes its outputs into, which then replaces `final` as a whole.

  With `writes`, yields a new, empty folder beside `final` (".NAME.new-XXXXXX", so on the same
  file system); when the block completes, the previous `final` (if any) is renamed aside, the new
  folder renamed to `final`, and the previous one deleted. A reader thus finds the previous run's
  complete outputs or the new run's, never files of both. If the block raises, the new folder is
  deleted and `final` left as it was; if the renames fail, `final` is left as it was and the error
  names the new folder, kept. Without `writes` (every process but 0 of a multi-process run)
  nothing is created, renamed or deleted, and `final` is yielded (not to be written).
  """
  if not writes:
    yield final
    return
  final = os.path.abspath(final)
  parent, name = os.path.split(final)
  os.makedirs(parent, exist_ok=True)
  work = tempfile.mkdtemp(dir=parent, prefix=f".{name}.new-")
  try:
    os.chmod(work, default_mode(directory=True))  # mkdtemp: owner-only
    yield work
  except BaseException:
    remove(work)
    raise
  old = None
  if os.path.lexists(final):
    old = os.path.join(parent, f".{name}.old-{os.path.basename(work).rsplit('-', 1)[-1]}")
  try:
    if old is not None:
      os.rename(final, old)
    try:
      os.rename(work, final)
    except OSError:
      if old is not None:
        os.rename(old, final)
      raise
  except OSError as e:  # e.g. a file of the previous folder held open (Windows): keep both
    raise OSError(f"could not replace {final} with this run's outputs ({e}); they are in "
                  f"{work}") from e
  if old is not None:
    remove(old)


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


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(os.fspath(path), "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
