"""What the experiment scripts (experiments/*.py) share, so that they import the library rather
than each other: the store of a task, a packaged config by name, training that stops the script
when a signal stops it, the device's name and comma-separated command-line lists.

The stores of the tasks come from the task registry (jaxvol.data.tasks): the quick start's
phantom for `demo` (jaxvol.data.phantoms), `jaxvol prepare` for every other task.
"""

from __future__ import annotations

import importlib
import os
import pathlib

from jaxvol.data import tasks as tasks_lib


def task_store(out: str | os.PathLike, task: str, source: str | os.PathLike | None = None) -> str:
  """OUT/data/TASK/store, built once: the demo's phantom, or `jaxvol prepare --task TASK` from
  the shared volumes under `source` (default: shared/data beside the repository)."""
  tasks_lib.get(task)  # a clear error for an unknown task
  folder = pathlib.Path(out) / "data" / task
  store = folder / "store"
  if (store / "manifest.json").is_file():
    return str(store)
  if task == "demo":
    from jaxvol.data import phantoms  # pylint: disable=g-import-not-at-top
    from jaxvol.data import store as store_lib  # pylint: disable=g-import-not-at-top
    datalist = phantoms.write_demo_pet_dataset(folder, **phantoms.DEMO_DATASET)
    store_lib.convert(datalist, store, phantoms.DEMO_PRESETS)
    return str(store)
  from jaxvol import prepare  # pylint: disable=g-import-not-at-top
  return prepare.prepare(task, folder, source=source)


def packaged_config(name: str, variant: str | None = None):
  """The packaged config NAME (jaxvol/configs/NAME.py) with its variant tokens."""
  from jaxvol import configs  # pylint: disable=g-import-not-at-top
  if name not in configs.names():
    raise ValueError(f"unknown config {name!r}; packaged: {', '.join(configs.names())}")
  return importlib.import_module(f"jaxvol.configs.{name}").get_config(variant)


def train(config, workdir: str | os.PathLike, validate=None) -> dict:
  """jaxvol.train.loop.train, except that a run stopped by a signal (a preempted or killed job)
  ends the script with 128 + the signal, as `jaxvol train` does, so that nothing evaluates or
  records a half-trained model as finished: run the same command to resume."""
  from jaxvol.train import loop  # pylint: disable=g-import-not-at-top
  result = loop.train(config, str(workdir), validate=validate)
  if result.get("signal") is not None:
    print(f"stopped by signal {result['signal']} at step {result['step']} of {workdir}: "
          "checkpoint saved; run the same command to resume", flush=True)
    raise SystemExit(128 + int(result["signal"]))
  return result


def device_name() -> str:
  """The first device's kind, e.g. "NVIDIA H100 80GB HBM3" or "cpu"."""
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return getattr(d, "device_kind", d.platform)


def str_list(text: str) -> list[str]:
  """A comma-separated command-line value as a list ("a,b," -> ["a", "b"])."""
  return [t.strip() for t in str(text).split(",") if t.strip()]
