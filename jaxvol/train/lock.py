"""One writer per workdir: training holds WORKDIR/train.lock while it runs.

The lock file is JSON: host, PID, start time and command line of the holder. It is created
atomically (written beside, then hard-linked to its name, which fails if the name exists), so of
two runs started together exactly one gets it; it is removed when training ends, however it ends
short of SIGKILL. A run that finds the lock held:
- by a process on this host that no longer exists (a killed job): takes it over, with a warning;
- by a live process, or by another host (whose processes it cannot see): refuses with
  jaxvol.errors.WorkdirLockedError naming the holder, unless `force` (--force on the command line:
  safe when that host's job is known to be gone, e.g. a requeued job whose node died).
Evaluate, sample and predict only read a workdir and take no lock. In a multi-host job the
first process holds the lock for the job.
"""

import json
import logging
import os
import socket
import sys
import time

from jaxvol.errors import WorkdirLockedError

LOCK_NAME = "train.lock"
log = logging.getLogger("jaxvol")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


class WorkdirLock:
  """Context manager holding WORKDIR/train.lock (module docstring).

  Args:
    workdir: the run's directory (created if missing).
    force: take over a lock held by a live or remote holder.
    enabled: False makes this a no-op (the non-first processes of a multi-host job).
  """

  def __init__(self, workdir: str, force: bool = False, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self.force = force
    self.enabled = enabled
    self.held = False
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                   "command": " ".join(sys.argv)[:500]}

  def _create(self) -> bool:
    """Creates the lock file with our record atomically; False if it exists."""
    tmp = f"{self.path}.{self.record['host']}.{self.record['pid']}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.record, f)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      os.unlink(tmp)

  def holder(self) -> dict | None:
    """The lock file's record; None when there is none, {} when it cannot be read."""
    return self._read(self.path)

  @staticmethod
  def _read(path) -> dict | None:
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or half-written by a holder killed while writing it

  def acquire(self):
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    for _ in range(3):
      if self._create():
        self.held = True
        return self
      holder = self.holder()
      if holder is None:
        continue  # released meanwhile: try again
      here = holder.get("host") == self.record["host"]
      pid = holder.get("pid")
      stale = here and isinstance(pid, int) and not _alive(pid)
      if not holder:
        stale = True
      if not (stale or self.force):
        where = "" if here else (" (another host: if its job is gone, rerun with --force to "
                                 "take the lock over)")
        raise WorkdirLockedError(f"{os.path.dirname(self.path)} is in use by another training run "
                                 f"({describe(holder)}){where}; wait for it or use another "
                                 f"workdir (lock file {self.path})")
      why = "whose process is gone" if stale else "taken over with --force"
      log.warning("workdir lock %s held by %s, %s: taking it over", self.path,
                  describe(holder) if holder else "an unreadable record", why)
      # Moved aside first (atomic): of two runs taking over together, one moves the stale file;
      # one that finds it moved a newer holder's lock puts that back.
      aside = f"{self.path}.{self.record['host']}.{self.record['pid']}.stale"
      try:
        os.rename(self.path, aside)
      except FileNotFoundError:
        continue
      moved = self._read(aside)
      if moved != holder:
        try:
          os.link(aside, self.path)
        except FileExistsError:
          pass
      os.unlink(aside)
    raise WorkdirLockedError(f"could not take the workdir lock {self.path}: other runs keep "
                             "taking it")

  def release(self):
    if not self.held:
      return
    self.held = False
    holder = self.holder()
    if holder and holder.get("pid") == self.record["pid"] and (
        holder.get("host") == self.record["host"]):
      try:
        os.unlink(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False
