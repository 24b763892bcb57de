"""Intensity presets: raw scanner units <-> the network's [-1, 1] range, and back.

A preset is two numbers and a kind, saved as JSON in the store manifest and in checkpoints, so
that predictions are always mapped back to the units of the input (HU, SUV or counts, MRI
intensity) with the exact scale they were trained with.

Forward map: `y = 2 * (x - lo) / (hi - lo) - 1`, so `lo -> -1` and `hi -> 1`.
  * 'ct': `lo`/`hi` are an HU window (default -1000..1000 HU: air to dense bone). Values outside the
    window are clipped before scaling, because far-out HU (metal, outside-the-scanner padding)
    would otherwise dominate the range; the inverse is therefore exact only inside the window.
  * 'pet': `lo = 0`, `hi` = a cap on SUV or counts (given, or the 99.9th percentile). Linear and
    not clipped, so hot lesions above the cap survive and the inverse is exact.
  * 'mri': robust percentiles of the non-zero (non-background) voxels (0.5 and 99.5 by default),
    linear and not clipped (MRI units are arbitrary; only the scale needs to be stable).
  * 'identity': `lo = -1`, `hi = 1` (data already in network range).
  * 'prdit': PRDiT's CT normalisation (Fredy-Zhang/PRDiT, scripts/preproc_lidc_idri.py and
    datasets/lidc.py): clip to [-1000 HU, the volume's 0.999 quantile], min-max to [0, 1], then
    2x - 1. As a preset: `lo` = the clipped volume's minimum (max(-1000, volume min)), `hi` = its
    0.999 quantile (numpy's linear interpolation, as theirs); clipped like 'ct'. Fitted on each
    volume (their normalisation is per volume), so generated samples carry no HU scale of their
    own (jaxvol.eval.generate maps them back with a training volume's).

Forward and inverse accept numpy or JAX arrays (only arithmetic and `.clip` are used).

Where a preset comes from matters for honest evaluation: a preset fitted on a volume is a statistic
of that volume. `depends_on_volume` says whether a kind with its keywords needs one; the store
(jaxvol.data.store) fits such presets on the training split, on an input modality (`ref=`), or on
each volume only where asked (`fit=volume`, legitimate for inputs, which inference has), so that a
target's scale never comes from the target itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("ct", "pet", "mri", "identity", "prdit")


CLIPPED = ("ct", "prdit")  # kinds clipped to [lo, hi] before scaling: their inverse is exact inside
PRDIT_FLOOR_HU, PRDIT_QUANTILE = -1000.0, 0.999


@dataclasses.dataclass(frozen=True)
class Preset:
  """A linear intensity map; see the module docstring for the kinds."""

  name: str
  lo: float
  hi: float

  def __post_init__(self):
    if self.name not in KINDS:
      raise ValueError(f"unknown preset kind {self.name!r}; expected one of {KINDS}")
    lo, hi = float(self.lo), float(self.hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
      raise ValueError(f"preset {self.name!r} needs finite lo < hi, got lo={lo}, hi={hi}")
    object.__setattr__(self, "lo", lo)
    object.__setattr__(self, "hi", hi)

  def forward(self, x):
    """Raw units -> network range (CT is clipped to its window first)."""
    if not hasattr(x, "clip"):
      x = np.asarray(x, dtype=np.float32)
    if self.name in CLIPPED:
      x = x.clip(self.lo, self.hi)
    return (x - self.lo) * (2.0 / (self.hi - self.lo)) - 1.0

  def inverse(self, y):
    """Network range -> raw units."""
    if not hasattr(y, "clip"):
      y = np.asarray(y, dtype=np.float32)
    return (y + 1.0) * ((self.hi - self.lo) / 2.0) + self.lo

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "lo": self.lo, "hi": self.hi}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Preset":
    return cls(name=d["name"], lo=float(d["lo"]), hi=float(d["hi"]))


def depends_on_volume(kind: str, kw: dict[str, Any] | None = None) -> bool:
  """True when `fit_preset(kind, volume, **kw)` reads the volume (a percentile), False when the
  keywords alone fix lo and hi (a CT window, a PET cap, explicit MRI lo and hi, identity)."""
  kw = kw or {}
  if kind == "pet":
    return not ({"hi", "cap"} & set(kw))
  if kind in ("mri", "prdit"):
    return not {"lo", "hi"} <= set(kw)
  return False


def fit_preset(kind: str, volume: np.ndarray | None = None, **kw) -> Preset:
  """Chooses a preset's `lo`/`hi` for a volume in raw units.

  Args:
    kind: 'ct', 'pet', 'mri', 'identity' or 'prdit'.
    volume: the raw volume (needed for 'pet' without a cap, for 'mri' and for 'prdit').
    **kw: overrides. All kinds accept `lo` and `hi` directly. 'pet' accepts `cap` (SUV or counts
      mapped to +1) and `percentile` (default 99.9). 'mri' accepts `lower`/`upper` percentiles of
      the non-zero voxels (default 0.5/99.5). 'prdit' accepts `floor` (HU, default -1000) and
      `quantile` (default 0.999).

  Returns:
    The fitted Preset.

  Raises:
    ValueError: unknown kind or keyword, or a volume that gives lo >= hi (e.g. all zeros).
  """
  kw = dict(kw)
  allowed = {"ct": {"lo", "hi"}, "pet": {"lo", "hi", "cap", "percentile"},
             "mri": {"lo", "hi", "lower", "upper"}, "identity": {"lo", "hi"},
             "prdit": {"lo", "hi", "floor", "quantile"}}
  if kind not in allowed:
    raise ValueError(f"unknown preset kind {kind!r}; expected one of {KINDS}")
  unknown = set(kw) - allowed[kind]
  if unknown:
    raise ValueError(f"preset {kind!r} does not take {sorted(unknown)}; "
                     f"it takes {sorted(allowed[kind])}")

  def need_volume():
    if volume is None:
      raise ValueError(f"preset {kind!r} needs a volume to fit lo/hi")
    return np.asarray(volume)

  if kind == "ct":
    lo, hi = kw.get("lo", -1000.0), kw.get("hi", 1000.0)
  elif kind == "identity":
    lo, hi = kw.get("lo", -1.0), kw.get("hi", 1.0)
  elif kind == "prdit":
    lo, hi = kw.get("lo"), kw.get("hi")
    if lo is None or hi is None:
      v = need_volume()
      q = float(np.quantile(v, float(kw.get("quantile", PRDIT_QUANTILE))))
      floor = float(kw.get("floor", PRDIT_FLOOR_HU))
      lo = max(floor, float(np.min(v))) if lo is None else lo
      hi = max(q, floor) if hi is None else hi
  elif kind == "pet":
    lo = kw.get("lo", 0.0)
    if "hi" in kw or "cap" in kw:
      hi = kw.get("cap", kw.get("hi"))
    else:
      hi = float(np.percentile(need_volume(), float(kw.get("percentile", 99.9))))
  else:  # mri
    lo, hi = kw.get("lo"), kw.get("hi")
    if lo is None or hi is None:
      v = need_volume()
      fg = v[v != 0]
      if fg.size == 0:
        raise ValueError("preset 'mri' cannot fit an all-zero volume")
      p_lo, p_hi = np.percentile(fg, [float(kw.get("lower", 0.5)), float(kw.get("upper", 99.5))])
      lo = p_lo if lo is None else lo
      hi = p_hi if hi is None else hi
  return Preset(name=kind, lo=float(lo), hi=float(hi))
