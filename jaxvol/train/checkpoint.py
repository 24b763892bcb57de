"""Orbax checkpoints of the train state, the Grain iterator and the run's metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. `meta` is JSON: the config and the
intensity presets of the store, so evaluation can map predictions back to the original scale.
Saves are asynchronous; `wait()` before exit. Restoring takes an abstract state that carries the
shardings wanted now, so a checkpoint restores onto any mesh. Evaluation reads checkpoints through
this module only.
"""

import os

import grain
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, with_data: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if with_data:
      handlers["data"] = grain.checkpoint.CheckpointHandler()
    self.with_data = with_data
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True),
    )

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, data_iter=None, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if self.with_data and data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, step=None, data_iter=None):
    """Restores (state, meta) at `step` (default latest) and, if given, the iterator in place."""
    step = self.latest_step() if step is None or step < 0 else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                              f"(available: {self.all_steps()})")
    # With abstract_state None the arrays come back as saved, on the default device.
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if self.with_data and data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], restored["meta"]

  def restore_meta(self, step=None) -> dict:
    step = self.latest_step() if step is None or step < 0 else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
