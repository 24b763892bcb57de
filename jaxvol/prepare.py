"""Command line: build paired training data from the real volumes in ../shared/data, as a store.

Usage (`python tools/prepare_data.py ...` in a checkout runs the same)::

  jaxvol prepare --task TASK --out DIR [--source ../shared/data] [--seed 0]
      [--dose 0.1] [--counts 3e8] [--realisations 3] [--overwrite]

Writes, under DIR:
  nifti/*.nii.gz    the simulated volumes (clean MRI and CT targets are read from the source)
  datalist.csv      one row per subject: subject, split, one column per modality
  store/            the preconverted store (`jaxvol.data.store.convert`), path printed last

Tasks:

``mri_t1_t2``
  stroke_T1 -> stroke_T2 of one subject (`mri_stroke/`), modalities ``t1`` and ``t2`` with MRI
  percentile presets, one subject ``stroke`` in the ``train`` split. The region split (train on RAS
  x in [0, 0.5), validate on [0.5, 0.6), evaluate on [0.6, 1]) is made by the configs' ``heldout`` variant
  (`jaxvol.config.mri_t1_t2_task`), not here.

``pet_denoise``
  Low-count -> full-count PET on two anatomies:
    * ``tmpl``: the SPM H2-15O PET template (`templates_2mm/PET.nii.gz`, 2 mm) as activity.
    * ``t1``: a harder, FDG-like PET simulated from the stroke T1 (`simulate_t1_pet`): inside the
      brain (T1 > 0; the volume is brain-extracted) voxels are labelled by T1 intensity quantiles,
      CSF below the 20th percentile, grey matter from the 20th to the 60th, white matter above
      (in T1w images white matter is brightest and CSF darkest; the infarct is dark, so it gets
      CSF-like, near-zero uptake, as a hypometabolic lesion would). Activity is GM 4 : WM 1 :
      CSF 0.05 (`jaxvol.data.phantoms.FDG_RATIOS`), blurred with a 4 mm FWHM Gaussian (scanner
      resolution) at 1 mm, then averaged over 2x2x2 blocks onto a 2 mm grid (62x80x70), the
      voxel size of a clinical brain PET and of the template.
  For each realisation, full-count = a reconstruction of Poisson counts drawn on the activity's
  sinogram at ``--counts`` expected coincidences (`degrade.simulate_low_count_pet` with dose 1:
  2D parallel-beam projections of every axial slice, scanner axis along RAS z, filtered
  back-projection with a Hann-apodised ramp), low-count = an independent one at dose fraction
  ``--dose``; both are scaled back to activity units and share one expectation (the activity as
  seen through the reconstruction kernel). The noise is spatially correlated, as in a
  reconstructed PET image; no attenuation, scatter or randoms. At the default 3e8 counts the
  template's full-count image has about 7% noise (std / mean) in the brain, the 10% image about
  23%. Modalities ``pet_low`` and ``pet_full``, presets ``pet_low=pet`` (its cap fitted on the
  training subjects' training region, see "Presets" below) and ``pet_full=pet:ref=pet_low`` (one
  scale for both). Subjects: ``pet_tmpl_0..N-1`` and ``pet_t1_0..N-1`` (train, N =
  ``--realisations``), ``pet_tmpl_test`` and ``pet_t1_test`` (test, other noise seeds).
  With only two anatomies, the TEST SUBJECTS SHARE THEIR ANATOMY WITH TRAINING SUBJECTS; only the
  noise differs. The configs' ``heldout`` variant therefore also splits each volume: training crops come from RAS z in
  [0, 0.6) and evaluation is on [0.6, 1] (the task's regions, jaxvol.data.tasks), so the evaluated
  anatomy is never trained on.

``pet_ac``
  Joint denoising and attenuation correction from the SPM PET and transmission templates:
  mu = `degrade.mu_from_transmission(Transm)` (1/cm at 511 keV). Both images come from one
  simulated scan of the same injected dose (``--counts`` coincidences before attenuation at full
  dose; `degrade.simulate_low_count_pet` with ``mu_map``, scanner axis along RAS z; its
  docstring and the module's state the physics): every line of response of the PET's sinogram
  is attenuated by exp(-integral of mu along the whole line), so the head keeps about a fifth to
  a quarter of the counts, fewest through its centre. Input ``pet_nac_low`` = Poisson counts of
  that attenuated sinogram at dose ``--dose``, reconstructed WITHOUT attenuation correction (the
  NAC image: dark centre, bright rim; about 0.17 of the AC image's mean in the brain); target
  ``pet_ac`` = the full-count scan reconstructed WITH attenuation correction (each bin divided by
  its survival before FBP, which amplifies the noise of deep lines, as in a real scan). Both use
  the same Hann-apodised FBP, so the pair differs only by attenuation and counts, not by
  resolution. Presets ``pet_nac_low=pet`` and ``pet_ac=pet``, each fitted on the training
  subjects' training region (the two images have different units, so the input is not scored as
  a baseline), matching `configs/ppdm_pet_ac.py`. Subjects ``pet_ac_0..N-1`` (train) and
  ``pet_ac_test`` (test): one anatomy, so the configs' ``heldout`` variant splits each volume like pet_denoise (train
  on RAS z in [0, 0.6), evaluate on [0.6, 1]).

``ct_denoise``
  Low-dose -> full-dose CT from the abdominal CT of `ct_abdomen/example_ct.nii.gz` (real HU,
  122x101x112 at 3 mm). Target ``ct`` = the source HU (read from the source file); input
  ``ct_low`` = `degrade.simulate_low_dose_ct` (projection-domain noise insertion, scanner axis
  along RAS z; its docstring states the physics) at dose fraction ``--dose`` (default 0.1). The
  source is a full-dose scan whose own noise is about 11 HU (`degrade.CT_FULL_DOSE_NOISE_HU`,
  measured in its liver), so only the MISSING variance is added: 11^2 (1 / dose - 1) HU^2
  averaged over the body, 33 HU at dose 0.1 (nothing at dose 1), for a total of about
  11 / sqrt(0.1) = 35 HU as in a real 10% scan; input PSNR about 36 dB over the 2000 HU window.
  The photon count per ray follows from that calibration for the kernel and the 360 views
  used; the noise is reconstructed with the plain ramp filter (``CT_FILTER``: a sharp kernel,
  fine streaky grain; a Hann kernel gives the same level with a smoother texture). Presets
  ``ct_low=ct`` (HU window
  -1000..1000 -> [-1, 1], clipped outside it) and ``ct=ct:ref=ct_low``: one fixed scale for both,
  inverted by the evaluation so metrics are in HU. Subjects ``ct_abdomen_0..N-1`` (train, N noise
  realisations) and ``ct_abdomen_test`` (test, another noise seed). One volume: the configs train
  on RAS z in [0, 0.6) and evaluate on [0.6, 1] (``train_region {"2": (0.0, 0.6)}``,
  ``eval_region {"2": (0.6, 1.0)}``), so evaluated anatomy is never trained on; the test subject
  differs from the training ones by its noise only.

``ct_gen``
  Unconditional CT generation (PRDiT, `configs/prdit_ct_gen.py`): the abdominal CT
  `ct_abdomen/example_ct.nii.gz` itself (real HU, 122x101x112 at 3 mm), modality ``ct`` with the
  CT HU-window preset (-1000..1000 HU -> [-1, 1], clipped outside it; inverted when samples are
  written, so they are in HU), the whole volume as subject ``ct_abdomen`` in the ``train`` split.
  ONE VOLUME: a model trained on it can only show the mechanics (two-stage training, sampling,
  metrics), not learn a generative model of a population of CT scans; its samples are variations
  of crops of this one scan.

``ct_gen_prdit``
  The same CT preprocessed as PRDiT's authors preprocess LIDC-IDRI (scripts/preproc_lidc_idri.py,
  datasets/lidc.py; `prdit_geometry`): resampled to 1 mm (cubic spline), the centred 256^3 box
  (the scan is 366x303x336 mm, so 256^3), average-pooled to 128^3 at 2 mm, and normalised with the
  ``prdit`` preset fitted on the volume itself (clip to [-1000 HU, its 0.999 quantile], min-max
  to [-1, 1]; jaxvol.data.presets). The store and every checkpoint trained on it name the preset.
  Samples are written in HU with this volume's preset (the authors' samples have no HU scale).

``mri_sr``
  Through-plane super-resolution of the stroke T1: target ``t1`` (read from the source, 1 mm),
  inputs ``t1_x2`` and ``t1_x4`` = `degrade.simulate_low_resolution` along the RAS z axis (array
  axis 2) with factors 2 and 4: slices 2 or 4 mm thick (box profile), interpolated back onto the
  1 mm grid, so input and target share one grid and affine. Presets ``t1=mri`` and
  ``t1_x2``/``t1_x4`` = ``mri:ref=t1`` (the target's scale). One subject ``stroke`` in ``train``;
  the configs' ``heldout`` variant splits it by hemisphere like ``mri_t1_t2`` (train on RAS x in [0, 0.5), validate on
  [0.5, 0.6), evaluate on [0.6, 1]).

PET and CT noise are both reconstructed from projections by filtered back-projection, so they
have the spatially correlated texture of real reconstructed images (blotchy for PET, streaky for
CT); slices are reconstructed one by one (no oblique lines of response, no correlation across
slices).

Presets: percentile presets (PET caps, MRI lo/hi) are fitted here on the TRAINING subjects'
TRAINING REGION only (`_training_presets`: the median over those subjects) and handed to the store
as explicit numbers, so no evaluated voxel, and no target of an evaluated volume, sets a scale;
mri_sr's inputs take the same numbers as their target (one scale, a comparable input).
``describe`` prints them. Every output is a
deterministic function of the arguments (``--seed``). Files are written atomically (temporary
name, then rename); the store conversion is atomic and resumable. An existing DIR/store is never
replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Sequence

from nibabel import orientations as nio
import numpy as np

from jaxvol import fileio
from jaxvol.data import degrade
from jaxvol.data import nifti
from jaxvol.data import phantoms
from jaxvol.data import pipeline
from jaxvol.data import presets as presets_lib
from jaxvol.data import store as store_lib
from jaxvol.data import tasks as tasks_lib

TASKS = tasks_lib.PREPARED
# shared/data beside the checkout (jaxvol/prepare.py -> ../../shared/data); an installed jaxvol
# has none there, so it needs --source.
DEFAULT_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DOSE = 0.1  # a task without its own default dose
CT_FILTER = "ramp"  # sharp reconstruction kernel for the inserted noise
SR_FACTORS = tasks_lib.SR_FACTORS
# Expected counts of one full-count image, about a clinical brain scan (as in jaxvol.data.phantoms).
DEFAULT_COUNTS = phantoms.DEFAULT_TOTAL_COUNTS
DEFAULT_REALISATIONS = 3
# T1 intensity quantiles (within the brain) separating CSF | GM | WM for `simulate_t1_pet`.
T1_QUANTILES = (0.2, 0.6)
PET_FWHM_MM = 4.0
T1_PET_POOL = 2  # 1 mm T1 grid -> 2 mm PET grid

SOURCES = {
    "t1": "mri_stroke/stroke_T1.nii.gz",
    "t2": "mri_stroke/stroke_T2.nii.gz",
    "pet": "templates_2mm/PET.nii.gz",
    "transm": "templates_2mm/Transm.nii.gz",
    "ct": "ct_abdomen/example_ct.nii.gz",
}


def default_dose(task: str) -> float:
  """The task's dose fraction of the simulated low-count PET or low-dose CT (jaxvol.data.tasks)."""
  dose = tasks_lib.get(task).default_dose
  return DEFAULT_DOSE if dose is None else dose


def source_dir(source: str | os.PathLike | None = None) -> pathlib.Path:
  """The folder of real volumes; raises FileNotFoundError with a hint when it is absent."""
  path = pathlib.Path(source) if source is not None else DEFAULT_SOURCE
  missing = [rel for rel in SOURCES.values() if not (path / rel).is_file()]
  if not path.is_dir() or missing:
    what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
    raise FileNotFoundError(
        f"source folder {path} {what}: it must hold the shared real volumes "
        "(mri_stroke/, templates_2mm/, ct_abdomen/; see shared/data/README.md); pass --source")
  return path


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), *keys])


def simulate_t1_pet(t1: np.ndarray, spacing: Sequence[float],
                    quantiles: Sequence[float] = T1_QUANTILES,
                    fwhm_mm: float = PET_FWHM_MM, pool: int = T1_PET_POOL) -> np.ndarray:
  """An FDG-like activity map from a brain-extracted T1 (see the module docstring).

  Args:
    t1: brain-extracted T1 (zero outside the brain), RAS.
    spacing: voxel size of `t1` in mm.
    quantiles: T1 quantiles within the brain separating CSF | GM | WM.
    fwhm_mm: Gaussian blur (scanner resolution) applied on the T1 grid.
    pool: block size of the mean pooling onto the PET grid (1: keep the T1 grid). Trailing voxels
      that do not fill a block are dropped.

  Returns:
    Non-negative float32 activity on the pooled grid.
  """
  t1 = np.asarray(t1, dtype=np.float32)
  brain = t1 > 0
  if not brain.any():
    raise ValueError("T1 volume is empty: cannot derive a brain mask")
  lo, hi = np.quantile(t1[brain], quantiles)
  csf = (brain & (t1 < lo)).astype(np.float32)
  gm = (brain & (t1 >= lo) & (t1 < hi)).astype(np.float32)
  wm = (brain & (t1 >= hi)).astype(np.float32)
  activity = phantoms.simulate_pet_activity(gm, wm, csf, smooth_fwhm_mm=fwhm_mm, spacing=spacing)
  return _mean_pool(activity, pool)


def _mean_pool(x: np.ndarray, pool: int) -> np.ndarray:
  if pool == 1:
    return x.astype(np.float32)
  shape = [s // pool for s in x.shape]
  x = x[:shape[0] * pool, :shape[1] * pool, :shape[2] * pool]
  x = x.reshape(shape[0], pool, shape[1], pool, shape[2], pool)
  return x.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def _pooled_affine(affine_ras: np.ndarray, pool: int) -> np.ndarray:
  """Affine of a `pool`-times coarser grid whose voxel 0 is the centre of the first block."""
  out = np.asarray(affine_ras, dtype=np.float64).copy()
  out[:3, 3] = affine_ras[:3, :3] @ np.full(3, (pool - 1) / 2.0) + affine_ras[:3, 3]
  out[:3, :3] = affine_ras[:3, :3] * pool
  return out


def _write_datalist(path: pathlib.Path, modalities: Sequence[str], rows: Sequence[dict]) -> None:
  """Writes the CSV datalist atomically (temporary file, then rename)."""
  fileio.write_csv_atomic(path, [{k: row.get(k, "") for k in ("subject", "split", *modalities)}
                                 for row in rows])


def _save_pair(folder: pathlib.Path, subject: str, split: str, volumes: dict[str, np.ndarray],
               affine: np.ndarray | None = None,
               geometry: nifti.Geometry | None = None) -> dict[str, str]:
  """Saves RAS arrays with `affine`, or back on the grid of a source file with `geometry`."""
  row = {"subject": subject, "split": split}
  for modality, array in volumes.items():
    name = f"{subject}_{modality}.nii.gz"
    nifti.save_volume(folder / name, array, affine=affine, geometry=geometry)
    row[modality] = f"nifti/{name}"
  return row


def _mri_rows(src: pathlib.Path, out: pathlib.Path, **_) -> list[dict]:
  del out
  return [{"subject": "stroke", "split": "train", "t1": str(src / SOURCES["t1"]),
           "t2": str(src / SOURCES["t2"])}]


def _realisation_ids(realisations: int) -> list[tuple[str, str, int]]:
  """(suffix, split, noise index) of every realisation: N train ones, one validation one (for
  checkpoint selection during training), then one test one."""
  ids = [(str(k), "train", k) for k in range(realisations)]
  return ids + [("val", "val", 999), ("test", "test", 1000)]


def _pet_denoise_rows(src: pathlib.Path, out: pathlib.Path, seed: int, dose: float, counts: float,
                      realisations: int) -> list[dict]:
  pet, geom = nifti.load_volume(src / SOURCES["pet"])
  t1, t1_geom = nifti.load_volume(src / SOURCES["t1"])
  anatomies = [
      ("tmpl", np.clip(pet, 0.0, None), nifti.ras_affine(geom)),
      ("t1", simulate_t1_pet(t1, t1_geom.spacing),
       _pooled_affine(nifti.ras_affine(t1_geom), T1_PET_POOL)),
  ]
  rows = []
  for a, (name, activity, affine) in enumerate(anatomies):
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))  # RAS voxel sizes
    for suffix, split, k in _realisation_ids(realisations):
      rng = _rng(seed, a, k)
      # Counts on the sinogram of every axial slice, FBP (Hann): `degrade.simulate_low_count_pet`.
      full = degrade.simulate_low_count_pet(activity, counts, 1.0, spacing, rng, axis=2)
      low = degrade.simulate_low_count_pet(activity, counts, dose, spacing, rng, axis=2)
      rows.append(_save_pair(out / "nifti", f"pet_{name}_{suffix}", split,
                             {"pet_low": low, "pet_full": full}, affine))
  return rows


def _pet_ac_rows(src: pathlib.Path, out: pathlib.Path, seed: int, dose: float, counts: float,
                 realisations: int) -> list[dict]:
  pet, geom = nifti.load_volume(src / SOURCES["pet"])
  transm, transm_geom = nifti.load_volume(src / SOURCES["transm"])
  nifti.check_same_grid([(str(src / SOURCES["pet"]), geom),
                         (str(src / SOURCES["transm"]), transm_geom)])
  pet = np.clip(pet, 0.0, None)
  mu = degrade.mu_from_transmission(transm)
  spacing = _ras_spacing(geom)
  affine = nifti.ras_affine(geom)
  rows = []
  for suffix, split, k in _realisation_ids(realisations):
    rng = _rng(seed, 2, k)
    # One injected dose (`counts` coincidences before attenuation at full dose), attenuated along
    # each line of response. Target: the full-count scan reconstructed with attenuation
    # correction; input: the low-dose scan reconstructed without it.
    target = degrade.simulate_low_count_pet(pet, counts, 1.0, spacing, rng, mu_map=mu,
                                            attenuation_correction=True, axis=2)
    low_nac = degrade.simulate_low_count_pet(pet, counts, dose, spacing, rng, mu_map=mu, axis=2)
    rows.append(_save_pair(out / "nifti", f"pet_ac_{suffix}", split,
                           {"pet_nac_low": low_nac, "pet_ac": target}, affine))
  return rows


def _ct_denoise_rows(src: pathlib.Path, out: pathlib.Path, seed: int, dose: float,
                     realisations: int, **_) -> list[dict]:
  path = src / SOURCES["ct"]
  hu, geom = nifti.load_volume(path)
  spacing = _ras_spacing(geom)
  rows = []
  for suffix, split, k in _realisation_ids(realisations):
    low = degrade.simulate_low_dose_ct(hu, spacing, dose, _rng(seed, 3, k), axis=2,
                                       filter_name=CT_FILTER)
    # The input goes back onto the source's grid; the target is the source file itself.
    row = _save_pair(out / "nifti", f"ct_abdomen_{suffix}", split, {"ct_low": low},
                     geometry=geom)
    rows.append(dict(row, ct=str(path)))
  return rows


def _ct_gen_rows(src: pathlib.Path, out: pathlib.Path, **_) -> list[dict]:
  del out  # the source file is the only volume; nothing is simulated
  return [{"subject": "ct_abdomen", "split": "train", "ct": str(src / SOURCES["ct"])}]


def prdit_geometry(volume: np.ndarray, affine: np.ndarray, crop: int = 256, pool: int = 2
                   ) -> tuple[np.ndarray, np.ndarray]:
  """PRDiT's resampling of a CT (Fredy-Zhang/PRDiT, scripts/preproc_lidc_idri.py, datasets/lidc.py):
  cubic spline (scipy zoom, order 3, mode nearest) to 1 mm voxels, the centred crop^3 box (each
  axis as it is where it is shorter), then `pool`^3 average pooling (lidc.py's AvgPool3d(2) for
  128^3 training from 256^3). Returns (volume, affine) on the RAS grid of `affine`'s columns."""
  from scipy import ndimage  # pylint: disable=import-outside-toplevel
  spacing = np.linalg.norm(affine[:3, :3], axis=0)
  new_shape = np.round(np.asarray(volume.shape) * spacing).astype(int)
  resampled = ndimage.zoom(np.asarray(volume, np.float64), new_shape / np.asarray(volume.shape),
                           order=3, mode="nearest")
  # scipy's zoom maps the first and last samples onto each other: old index = new * step.
  step = (np.asarray(volume.shape) - 1) / np.maximum(np.asarray(resampled.shape) - 1, 1)
  starts = [(n - min(crop, n)) // 2 for n in resampled.shape]
  box = tuple(slice(a, a + min(crop, n)) for a, n in zip(starts, resampled.shape))
  cropped = resampled[box]
  keep = [n - n % pool for n in cropped.shape]
  cropped = cropped[:keep[0], :keep[1], :keep[2]]
  pooled = cropped.reshape(keep[0] // pool, pool, keep[1] // pool, pool, keep[2] // pool,
                           pool).mean(axis=(1, 3, 5))
  # New voxel j averages the resampled voxels start + pool j .. start + pool j + pool - 1.
  to_old = np.diag([*(step * pool), 1.0])
  to_old[:3, 3] = step * (np.asarray(starts) + (pool - 1) / 2.0)
  return pooled.astype(np.float32), affine @ to_old


def _ct_gen_prdit_rows(src: pathlib.Path, out: pathlib.Path, **_) -> list[dict]:
  hu, geom = nifti.load_volume(src / SOURCES["ct"])
  volume, affine = prdit_geometry(hu, nifti.ras_affine(geom))
  path = out / "nifti" / "ct_abdomen_prdit.nii.gz"
  nifti.save_volume(path, volume, affine=affine)
  return [{"subject": "ct_abdomen", "split": "train", "ct": str(path)}]


def _mri_sr_rows(src: pathlib.Path, out: pathlib.Path, **_) -> list[dict]:
  path = src / SOURCES["t1"]
  t1, geom = nifti.load_volume(path)
  inputs = {f"t1_x{f}": degrade.simulate_low_resolution(t1, f, axes=(2,)) for f in SR_FACTORS}
  row = _save_pair(out / "nifti", "stroke", "train", inputs, geometry=geom)
  return [dict(row, t1=str(path))]


def _training_presets(task: str, datalist: pathlib.Path) -> dict[str, dict]:
  """The task's preset specs with every percentile preset replaced by explicit lo/hi, fitted on
  the training subjects' training region (the task's train_region, jaxvol.data.tasks): the
  median over those subjects of
  `fit_preset` on the region. A `ref` spec keeps taking its ref's (now fixed) scale."""
  specs = {m: dict(v) for m, v in tasks_lib.get(task).presets.items()}
  region = tasks_lib.get(task).train_region
  train = [s for s in store_lib.read_datalist(datalist) if s["split"] == "train"]
  for mod, spec in specs.items():
    kw = {k: v for k, v in spec.items() if k != "kind"}
    if ("ref" in spec or spec.get("fit") == "volume"
        or not presets_lib.depends_on_volume(spec["kind"], kw)):
      continue
    fits = []
    for subject in train:
      vol, _ = nifti.load_volume(subject["volumes"][mod])
      if region:
        vol = vol[tuple(slice(a, b) for a, b in pipeline.region_box(vol.shape, region))]
      fits.append(presets_lib.fit_preset(spec["kind"], vol, **kw))
    specs[mod] = {"kind": spec["kind"], "lo": float(np.median([p.lo for p in fits])),
                  "hi": float(np.median([p.hi for p in fits]))}
  for f in SR_FACTORS if task == "mri_sr" else ():
    specs[f"t1_x{f}"] = dict(specs["t1"])  # the same fixed scale as the target: comparable
  return specs


def _ras_spacing(geometry: nifti.Geometry) -> tuple[float, float, float]:
  """Voxel sizes along the RAS axes (the header zooms permuted like the array)."""
  ornt = nio.io_orientation(geometry.affine)
  out = [0.0, 0.0, 0.0]
  for i, (axis, _) in enumerate(ornt):
    out[int(axis)] = geometry.spacing[i]
  return tuple(out)


_BUILDERS = {"mri_t1_t2": _mri_rows, "pet_denoise": _pet_denoise_rows, "pet_ac": _pet_ac_rows,
             "ct_denoise": _ct_denoise_rows, "ct_gen": _ct_gen_rows,
             "ct_gen_prdit": _ct_gen_prdit_rows, "mri_sr": _mri_sr_rows}


def prepare(task: str, out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
            seed: int = 0, dose: float | None = None, counts: float = DEFAULT_COUNTS,
            realisations: int = DEFAULT_REALISATIONS, overwrite: bool = False) -> str:
  """Builds the NIfTI pairs, the datalist and the store of one task (see the module docstring).

  Args:
    task: one of TASKS.
    out_dir: output folder (created).
    source: folder of the shared real volumes (default: shared/data beside the repository).
    seed: noise seed.
    dose: dose fraction of the low-count PET or low-dose CT, in (0, 1]; None: the task's default
      (`default_dose`: 0.1 for the PET tasks and for ct_denoise). Unused by the MRI tasks.
    counts: expected counts of a full-count PET image.
    realisations: training noise realisations per anatomy (PET and CT tasks), >= 1.
    overwrite: replace an existing out_dir/store.

  Returns:
    The store path (out_dir/store).

  Raises:
    FileNotFoundError: the source folder (or a file in it) is missing.
    FileExistsError: out_dir/store exists and overwrite is False (checked before any work).
    ValueError: a bad task or argument.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if dose is None:
    dose = default_dose(task)
  if not 0.0 < float(dose) <= 1.0:
    raise ValueError(f"dose must be in (0, 1], got {dose}")
  if not float(counts) > 0:
    raise ValueError(f"counts must be positive, got {counts}")
  if int(realisations) < 1:
    raise ValueError(f"realisations must be >= 1, got {realisations}")
  out = pathlib.Path(out_dir).resolve()
  store_path = out / "store"
  if (store_path / store_lib.MANIFEST).exists() and not overwrite:
    raise FileExistsError(f"{store_path} already holds a store; pass --overwrite to rebuild it")
  src = source_dir(source)
  (out / "nifti").mkdir(parents=True, exist_ok=True)
  rows = _BUILDERS[task](src, out, seed=int(seed), dose=float(dose), counts=float(counts),
                         realisations=int(realisations))
  modalities = list(tasks_lib.get(task).modalities)
  datalist = out / "datalist.csv"
  _write_datalist(datalist, modalities, rows)
  store_lib.convert(datalist, store_path, _training_presets(task, datalist), overwrite=overwrite)
  return str(store_path)


def describe(task: str, store_path: str) -> str:
  """A short human summary of a prepared store: subjects per split, shapes, and the split caveat."""
  store = store_lib.Store(store_path)
  lines = [f"{task}: modalities {', '.join(store.modalities)}"]
  for split in store_lib.SPLITS:
    subjects = store.subjects(split)
    if subjects:
      lines.append(f"  {split}: " + ", ".join(
          f"{s['id']} {'x'.join(map(str, s['shape']))}" for s in subjects))
  record = tasks_lib.get(task)
  lines.append(f"  note: {record.note}")
  if record.heldout:
    lines.append(f"  with the config token `heldout` (--config=NAME:heldout): "
                 f"{tasks_lib.describe_split(record)}, so no evaluated anatomy is trained on")
  for mod in store.modalities:
    p = store.subjects()[0]["volumes"][mod]["preset"]
    lines.append(f"  preset {mod}: {p['name']} [{p['lo']:.6g}, {p['hi']:.6g}]")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--out", required=True, help="output folder (the store goes to OUT/store)")
  parser.add_argument("--source", default=None,
                      help=f"folder of the shared real volumes (default {DEFAULT_SOURCE})")
  parser.add_argument("--seed", type=int, default=0, help="noise seed")
  parser.add_argument("--dose", type=float, default=None,
                      help="dose fraction of the low-count PET or low-dose CT (default: "
                      + ", ".join(f"{t} {default_dose(t)}" for t in TASKS
                                  if tasks_lib.get(t).default_dose is not None) + ")")
  parser.add_argument("--counts", type=float, default=DEFAULT_COUNTS,
                      help="expected counts of a full-count PET image")
  parser.add_argument("--realisations", type=int, default=DEFAULT_REALISATIONS,
                      help="training noise realisations per anatomy (PET and CT tasks)")
  parser.add_argument("--overwrite", action="store_true", help="rebuild an existing OUT/store")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.task, args.out, source=args.source, seed=args.seed, dose=args.dose,
                   counts=args.counts, realisations=args.realisations, overwrite=args.overwrite)
  except (FileNotFoundError, FileExistsError, ValueError) as e:  # VolumeError is a ValueError.
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(describe(args.task, path))
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
