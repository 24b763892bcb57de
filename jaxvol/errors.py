"""Errors a user can act on. The command line reports each in one line with exit status 1
(jaxvol.main; the traceback with --verbose), never as a traceback.

Kept free of heavy imports so the command line can name them before JAX or Orbax load.
"""


class UserError(Exception):
  """A problem the user can fix: a bad setting, a damaged file, a busy workdir."""


class ConfigError(UserError, ValueError):
  """A config value or flag that cannot be used (a ValueError too, for callers that catch it)."""


class CheckpointError(UserError, RuntimeError):
  """No checkpoint restores, a chosen one is damaged, or a save failed (jaxvol.train.checkpoint)."""


class WorkdirLockedError(UserError, RuntimeError):
  """Another training run holds the workdir (jaxvol.train.lock)."""
