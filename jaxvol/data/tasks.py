"""The data tasks: one record per task, the one place each task's modalities, presets, inputs,
target, splits and regions are written.

A region is {axis: (lo, hi)} in fractions of a volume's RAS-ordered axis (jaxvol.data.pipeline).
The stores `jaxvol prepare` builds from the shared volumes hold one subject (the MRI tasks, CT) or
test subjects that share the training subjects' anatomy (the PET tasks, the demo's phantom): a
whole-volume split would score anatomy the model trained on, so each such task also has a
held-out split (the configs' variant token `heldout`):

  train_region   where training crops come from (and where percentile presets are fitted, and
                 classical references tuned);
  val_split/val_region   the validation set of training (best checkpoint, patience): disjoint
                 from the training crops and from the evaluated voxels;
  eval_split/eval_region what is scored.

Readers: jaxvol.prepare (modalities, presets, the region presets are fitted on, the defaults of
the simulation, notes), jaxvol.config (`apply_split`, the configs' inputs and targets) and the
experiments (their split prose comes from `describe_split`).

Adding a task: a record here, a builder in jaxvol.prepare (`_BUILDERS`, checked against this
registry), a config in jaxvol/configs/ (docs/architecture.md, "How to add a task").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

Region = Mapping[str, tuple[float, float]]

CT_WINDOW_HU = (-1000.0, 1000.0)  # air .. dense bone, mapped to [-1, 1]
SR_FACTORS = (2, 4)  # mri_sr: slice thickness in voxels of the simulated inputs
_CT_PRESET = {"kind": "ct", "lo": CT_WINDOW_HU[0], "hi": CT_WINDOW_HU[1]}

# The held-out regions, written once: PET/CT subjects share anatomy along RAS z (the lower 60%
# trains, the upper 40% is scored); the one-subject MRI stores split the hemispheres along RAS x
# with a validation slab between them.
_Z_TRAIN, _Z_EVAL = {"2": (0.0, 0.6)}, {"2": (0.6, 1.0)}
_X_TRAIN, _X_VAL, _X_EVAL = {"0": (0.0, 0.5)}, {"0": (0.5, 0.6)}, {"0": (0.6, 1.0)}


@dataclasses.dataclass(frozen=True)
class Task:
  """One task (module docstring).

  Attributes:
    name: the task's name (`jaxvol prepare --task NAME`, the configs).
    presets: {modality: preset spec} of the store (jaxvol.data.presets), in datalist order.
    inputs: the condition modalities (empty: unconditional).
    target: the target modality.
    train_region / eval_region / eval_split / val_split / val_region: the held-out split (None
      when the task has none: train on whole volumes of split "train", score split "test").
    default_dose: the dose fraction of the simulated low-count/low-dose input (None: no dose).
    note: what a user should know about the prepared store.
  """

  name: str
  presets: Mapping[str, Mapping]
  inputs: tuple[str, ...]
  target: str
  train_region: Region | None = None
  eval_region: Region | None = None
  eval_split: str = "test"
  val_split: str = "val"
  val_region: Region | None = None
  default_dose: float | None = None
  note: str = ""

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.presets)

  @property
  def heldout(self) -> bool:
    """Whether the task has a held-out region split (the `heldout` token)."""
    return self.train_region is not None


def _hemispheres(name, presets, inputs, target) -> Task:
  return Task(name, presets, inputs, target, train_region=_X_TRAIN, eval_region=_X_EVAL,
              eval_split="train", val_split="train", val_region=_X_VAL,
              note="one subject: the held-out split trains on one hemisphere, validates on the "
                   "slab between, and scores the other hemisphere")


def _shared_anatomy(name, presets, inputs, target, dose, note) -> Task:
  return Task(name, presets, inputs, target, train_region=_Z_TRAIN, eval_region=_Z_EVAL,
              eval_split="test", val_split="val", val_region=None, default_dose=dose, note=note)


TASKS: dict[str, Task] = {t.name: t for t in (
    _hemispheres("mri_t1_t2", {"t1": {"kind": "mri"}, "t2": {"kind": "mri"}}, ("t1",), "t2"),
    _shared_anatomy(
        "pet_denoise", {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "ref": "pet_low"}},
        ("pet_low",), "pet_full", 0.1,
        "test subjects share their anatomy with training subjects (only the noise differs)"),
    _shared_anatomy(
        "pet_ac", {"pet_nac_low": {"kind": "pet"}, "pet_ac": {"kind": "pet"}}, ("pet_nac_low",),
        "pet_ac", 0.1,
        "the test subject shares its anatomy with training subjects (only the noise differs)"),
    # ~33 HU of inserted noise in the body at dose 0.1 (jaxvol.prepare's docstring).
    _shared_anatomy(
        "ct_denoise", {"ct_low": dict(_CT_PRESET), "ct": dict(_CT_PRESET, ref="ct_low")},
        ("ct_low",), "ct", 0.1, "one CT volume: every realisation has its anatomy, with new noise"),
    Task("ct_gen", {"ct": dict(_CT_PRESET)}, (), "ct",
         note="one volume: enough to show the mechanics of training and sampling, not to learn a "
              "generative model of a population of CT scans"),
    # PRDiT's own preprocessing (jaxvol.prepare.prdit_geometry, the 'prdit' preset per volume).
    Task("ct_gen_prdit", {"ct": {"kind": "prdit", "fit": "volume"}}, (), "ct",
         note="one volume, preprocessed as PRDiT's authors do (1 mm, 256^3 centred, pooled to "
              "128^3, clipped to [-1000 HU, its 0.999 quantile] and min-max normalised)"),
    # Inputs on the target's scale (fitted on the target's training region), so the input is a
    # comparable baseline.
    _hemispheres("mri_sr", {**{f"t1_x{f}": {"kind": "mri"} for f in SR_FACTORS},
                            "t1": {"kind": "mri"}}, ("t1_x2",), "t1"),
    # The quick start's phantom (jaxvol.data.phantoms.write_demo_pet_dataset): six subjects of one
    # anatomy, split 4/1/1; it uses the PET denoising regions.
    _shared_anatomy(
        "demo", {"pet_low": {"kind": "pet"}, "pet_full": {"kind": "pet", "ref": "pet_low"}},
        ("pet_low",), "pet_full", 0.1,
        "the phantom's subjects share one anatomy (noise, global scale and lesions differ)"),
)}

# Tasks `jaxvol prepare` builds from the shared volumes (the demo builds its own phantom).
PREPARED = ("mri_t1_t2", "pet_denoise", "pet_ac", "ct_denoise", "ct_gen", "ct_gen_prdit",
            "mri_sr")


def get(name: str) -> Task:
  """The task record; a clear error for an unknown name."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
  return TASKS[name]


def _axis_name(axis: str) -> str:
  return {"0": "RAS x", "1": "RAS y", "2": "RAS z"}[str(axis)]


def describe_region(region: Region | None) -> str:
  """'RAS z in [0.6, 1]' style prose of a region (None: the whole volume)."""
  if not region:
    return "the whole volume"
  return ", ".join(f"{_axis_name(a)} in [{lo:g}, {hi:g}{']' if hi == 1 else ')'}"
                   for a, (lo, hi) in sorted(region.items()))


def describe_split(task: Task) -> str:
  """One sentence on the held-out split of a task, written from its regions."""
  if not task.heldout:
    return "whole volumes: split 'train' trains, split 'test' is scored"
  val = (f"split {task.val_split!r}, " + describe_region(task.val_region or task.eval_region))
  return (f"training crops from {describe_region(task.train_region)} of split 'train'; "
          f"validation on {val}; scored on {describe_region(task.eval_region)} of split "
          f"{task.eval_split!r}")
