"""Demo PET data simulated from real brain anatomy that ships with a PyPI package.

nilearn bundles the MNI152 (ICBM 2009a nonlinear symmetric) T1 template and its grey- and
white-matter probability maps, so they load with no network access. From them this module
builds an FDG-like activity map (grey matter about four times white matter, Gaussian scanner
blur) and a small paired low-count / full-count PET dataset with a train/val/test split, written
as NIfTI plus a CSV datalist. It is the project's own demo data: nothing here downloads.

Noise model: tomographic (``degrade.simulate_low_count_pet``): Poisson counts on the 2D
parallel-beam sinogram of every axial slice, reconstructed by filtered back-projection with a
Hann-apodised ramp, so the noise is spatially correlated and blotchy as in a reconstructed PET
image (no attenuation, scatter, randoms or oblique lines of response: a controlled denoising
benchmark, not a scanner simulation).
"""

from __future__ import annotations

import csv
import io
import os
import types
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from jaxvol import fileio
from jaxvol.data import degrade
from jaxvol.data import nifti
from jaxvol.data import tasks

__all__ = [
    "FDG_RATIOS",
    "DEFAULT_TOTAL_COUNTS",
    "mni152_tissue_maps",
    "simulate_pet_activity",
    "crop_to_brain",
    "write_demo_pet_dataset",
]

# Relative FDG uptake per tissue class. Grey matter takes up 3-4x more glucose than white matter
# in healthy adults (grey:white ratios of about 3-4:1 are usual in FDG PET quantification); CSF
# has next to none, and the template's background (skull and scalp are stripped) is empty.
FDG_RATIOS = types.MappingProxyType({"gm": 4.0, "wm": 1.0, "csf": 0.05, "background": 0.0})

# Expected counts of the FULL-count image over the whole brain, within the range of a clinical
# brain FDG scan (1e8 to 1e9). Filtered back-projection is noisier than the iterative,
# post-filtered reconstructions of clinical scanners, so the value sits above the low end: with
# `degrade.simulate_low_count_pet` (Hann kernel) on the 2 mm MNI152 demo anatomy, the full-count
# image has about 10% noise (std / mean) in white matter and 26 dB PSNR against the noiseless
# activity inside the brain (range = activity max, no lesions; 30 dB against its own noiseless
# reconstruction), and the 10% dose image about 31% and 20 dB: clearly noisy, anatomy visible.
DEFAULT_TOTAL_COUNTS = 3e8


def _offline_icbm152_csf(resolution: int):
  """The ICBM152 2009 CSF map if an earlier fetch left it on disk, else None (never downloads)."""
  try:
    from nilearn.datasets.utils import get_data_dirs  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  for root in get_data_dirs():
    folder = os.path.join(root, "icbm152_2009", "mni_icbm152_nlin_sym_09a")
    for name in ("mni_icbm152_csf_tal_nlin_sym_09a.nii.gz", "mni_icbm152_csf_tal_nlin_sym_09a.nii"):
      path = os.path.join(folder, name)
      if os.path.isfile(path):
        return nib.load(path)
  return None


def mni152_tissue_maps(resolution: int = 2) -> dict:
  """Loads the MNI152 T1 template and tissue probability maps bundled with nilearn (offline).

  Grey and white matter come from ``load_mni152_gm_template`` / ``load_mni152_wm_template``.
  nilearn does not bundle a CSF map: if ``fetch_icbm152_2009`` has already put its CSF map in the
  local nilearn data folder it is resampled onto the template grid; otherwise CSF is derived as
  ``clip(brain_mask - gm - wm, 0, 1)`` with the template's brain mask (``load_mni152_brain_mask``,
  T1 > 0.2, holes filled), which puts CSF in the ventricles and sulci. Nothing is downloaded.

  Args:
    resolution: voxel size in mm, 1 (197x233x189) or 2 (99x117x95).

  Raises:
    ImportError: nilearn (the ``demo`` extra) is not installed.

  Returns:
    dict with float32 arrays ``gm``, ``wm``, ``csf``, ``t1``, bool ``brain_mask`` (all RAS, one
    grid), the 4x4 ``affine``, the voxel ``spacing`` (mm) and ``csf_source`` ("icbm152_2009" or
    "derived").
  """
  try:
    from nilearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the demo data needs nilearn: pip install 'jaxvol[demo]'") from e

  if resolution not in (1, 2):
    raise ValueError(f"resolution must be 1 or 2 (mm), got {resolution}")
  t1_img = datasets.load_mni152_template(resolution=resolution)
  affine = np.asarray(t1_img.affine, dtype=np.float64)

  def data(img):
    return np.clip(np.asarray(img.dataobj, dtype=np.float32), 0.0, None)

  t1 = data(t1_img)
  gm = np.clip(data(datasets.load_mni152_gm_template(resolution=resolution)), 0.0, 1.0)
  wm = np.clip(data(datasets.load_mni152_wm_template(resolution=resolution)), 0.0, 1.0)
  brain = ndimage.binary_fill_holes(
      np.asarray(datasets.load_mni152_brain_mask(resolution=resolution).dataobj) > 0)
  csf_img = _offline_icbm152_csf(resolution)
  if csf_img is not None:
    from nilearn import image  # pylint: disable=g-import-not-at-top
    csf = np.clip(data(image.resample_to_img(csf_img, t1_img, interpolation="continuous")), 0, 1)
    csf_source = "icbm152_2009"
  else:
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    csf_source = "derived"
  return {
      "gm": gm,
      "wm": wm,
      "csf": csf.astype(np.float32),
      "t1": t1,
      "brain_mask": brain,
      "affine": affine,
      "spacing": tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
      "csf_source": csf_source,
  }


def _add_lesions(activity, candidates, n_lesions, rng, spacing, radius_mm, contrast):
  """Multiplies activity inside n random spheres centred in `candidates` by 2-3x (hot lesions)."""
  centres = np.argwhere(candidates)
  if n_lesions == 0 or centres.size == 0:
    return activity
  grid = np.indices(activity.shape, dtype=np.float32)
  sp = np.asarray(spacing, dtype=np.float32).reshape(3, 1, 1, 1)
  for _ in range(n_lesions):
    c = centres[rng.integers(len(centres))].astype(np.float32).reshape(3, 1, 1, 1)
    r = rng.uniform(*radius_mm)
    inside = np.sum(((grid - c) * sp) ** 2, axis=0) <= r * r
    activity = np.where(inside, activity * rng.uniform(*contrast), activity)
  return activity


def simulate_pet_activity(
    gm: np.ndarray,
    wm: np.ndarray,
    csf: np.ndarray,
    ratios: Mapping[str, float] = FDG_RATIOS,
    smooth_fwhm_mm: float | None = 4.0,
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    n_lesions: int = 0,
    rng: np.random.Generator | int | None = None,
    lesion_radius_mm: tuple[float, float] = (3.0, 6.0),
    lesion_contrast: tuple[float, float] = (2.0, 3.0),
) -> np.ndarray:
  """An FDG-like brain activity map from tissue probability maps.

  activity = r_gm * gm + r_wm * wm + r_csf * csf + r_bg * max(0, 1 - gm - wm - csf), with the
  FDG-like default ratios GM 4 : WM 1 : CSF 0.05 : background 0 (literature grey:white FDG uptake
  is about 3-4:1). The probabilities are a linear partial-volume mix, so boundary voxels get the
  weighted mean. Optional hot lesions multiply the activity in small spheres (centred in brain
  tissue) by 2-3x before the blur. Last, an isotropic Gaussian blur models the scanner's spatial
  resolution: a FWHM of about 4 mm is typical of current brain and whole-body PET after
  reconstruction (``None`` or 0 disables it).

  Args:
    gm: grey-matter probability, 3D.
    wm: white-matter probability, same shape.
    csf: CSF probability, same shape.
    ratios: uptake per class, keys "gm", "wm", "csf", "background" (missing keys take the
      defaults).
    smooth_fwhm_mm: scanner resolution (FWHM, mm) of the Gaussian blur.
    spacing: voxel size (mm) along each axis, to convert the FWHM and lesion radii to voxels.
    n_lesions: number of hot spheres (0 = none, the default).
    rng: Generator or seed for the lesion positions, radii and contrasts.
    lesion_radius_mm: (min, max) sphere radius in mm.
    lesion_contrast: (min, max) activity multiplier inside a sphere.

  Returns:
    Non-negative float32 activity (arbitrary units; WM = 1 before blurring).
  """
  gm = np.asarray(gm, dtype=np.float32)
  wm = np.asarray(wm, dtype=np.float32)
  csf = np.asarray(csf, dtype=np.float32)
  if not gm.shape == wm.shape == csf.shape or gm.ndim != 3:
    raise ValueError(f"gm, wm, csf must be 3D and of one shape, got {gm.shape}, {wm.shape}, "
                     f"{csf.shape}")
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or min(spacing) <= 0:
    raise ValueError(f"spacing must be three positive numbers, got {spacing}")
  r = dict(FDG_RATIOS)
  unknown = set(ratios) - set(r)
  if unknown:
    raise ValueError(f"unknown tissue ratio keys {sorted(unknown)}; expected {sorted(r)}")
  r.update({k: float(v) for k, v in ratios.items()})
  if min(r.values()) < 0:
    raise ValueError(f"ratios must be non-negative, got {r}")
  rest = np.clip(1.0 - gm - wm - csf, 0.0, 1.0)
  activity = r["gm"] * gm + r["wm"] * wm + r["csf"] * csf + r["background"] * rest
  if n_lesions:
    activity = _add_lesions(activity, gm + wm > 0.5, int(n_lesions), np.random.default_rng(rng),
                            spacing, lesion_radius_mm, lesion_contrast)
  if smooth_fwhm_mm:
    sigma_mm = float(smooth_fwhm_mm) / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    activity = ndimage.gaussian_filter(activity, [sigma_mm / s for s in spacing], mode="constant")
  return np.clip(activity, 0.0, None).astype(np.float32)


def crop_to_brain(arrays, affine, margin: int = 2, mask=None):
  """Crops same-grid volumes to the bounding box of a mask plus a margin, fixing the affine.

  Args:
    arrays: a 3D array, a list/tuple of them or a dict name -> array, all one shape.
    affine: 4x4 voxel -> world matrix of that grid.
    margin: voxels kept around the box on every side (clipped at the volume edge).
    mask: boolean volume defining the box; defaults to the voxels where the first array is > 0.

  Returns:
    (cropped arrays in the same container type, new affine, box) where box is the
    ((start, stop),) * 3 voxel range on the original grid. The affine's translation moves to the
    box's first voxel, so every cropped voxel keeps its world position.
  """
  if isinstance(arrays, Mapping):
    items = list(arrays.items())
  elif isinstance(arrays, np.ndarray):
    items = [(None, arrays)]
  else:
    items = list(enumerate(arrays))
  if not items:
    raise ValueError("no arrays to crop")
  shape = np.shape(items[0][1])
  for key, a in items:
    if np.shape(a) != shape or len(shape) != 3:
      raise ValueError(f"array {key!r} has shape {np.shape(a)}, expected 3D {shape}")
  if mask is None:
    mask = np.asarray(items[0][1]) > 0
  mask = np.asarray(mask, dtype=bool)
  if mask.shape != shape:
    raise ValueError(f"mask shape {mask.shape} does not match volume shape {shape}")
  if not mask.any():
    raise ValueError("mask is empty: nothing to crop to")
  idx = np.argwhere(mask)
  lo = np.maximum(idx.min(axis=0) - int(margin), 0)
  hi = np.minimum(idx.max(axis=0) + 1 + int(margin), shape)
  box = tuple((int(a), int(b)) for a, b in zip(lo, hi))
  sl = tuple(slice(a, b) for a, b in box)
  affine = np.asarray(affine, dtype=np.float64).copy()
  affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
  cropped = [(k, np.ascontiguousarray(np.asarray(a)[sl])) for k, a in items]
  if isinstance(arrays, Mapping):
    out = dict(cropped)
  elif isinstance(arrays, np.ndarray):
    out = cropped[0][1]
  else:
    out = [a for _, a in cropped]
    if isinstance(arrays, tuple):
      out = tuple(out)
  return out, affine, box


def _write_csv_atomic(path: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
  buf = io.StringIO()
  writer = csv.writer(buf)
  writer.writerow(header)
  writer.writerows(rows)
  fileio.write_text_atomic(path, buf.getvalue())


# The quick start's dataset (tools/demo.py) and its store presets: the low-count scale fitted on the
# training subjects, the full-count target on the same scale.
DEMO_DATASET = {"dose_fraction": tasks.get("demo").default_dose, "seed": 0, "crop_margin": 2}
DEMO_PRESETS = {m: dict(spec) for m, spec in tasks.get("demo").presets.items()}


def write_demo_pet_dataset(
    out_dir,
    dose_fraction: float = 0.1,
    total_counts: float = DEFAULT_TOTAL_COUNTS,
    seed: int = 0,
    resolution: int = 2,
    n_train: int = 4,
    n_val: int = 1,
    n_test: int = 1,
    max_lesions: int = 2,
    intensity_jitter: float = 0.15,
    smooth_fwhm_mm: float | None = 4.0,
    crop_margin: int | None = None,
    write_activity: bool = False,
) -> str:
  """Writes a paired low-count / full-count PET demo dataset and its CSV datalist.

  Each subject shares the MNI152 anatomy but has its own random global intensity scale (uniform
  in 1 +- ``intensity_jitter``, like inter-subject differences in injected dose and uptake), its
  own 0..``max_lesions`` hot lesions, and its own noise. The full-count image is one
  reconstruction of Poisson counts on the activity's sinogram at ``total_counts`` expected
  counts; the low-count image an independent one at ``dose_fraction`` of them
  (``degrade.simulate_low_count_pet``: axial slices, FBP with a Hann kernel, scaled back to
  activity units). Both have one expectation: the activity as seen through the reconstruction
  (slightly smoother than it; the ``activity`` file is the unblurred map). The count budget is
  scaled with the subject's intensity scale, so counts per unit activity are the same for every
  subject (a brighter subject, like a higher injected dose, gets proportionally more counts).
  About 10 s for the default six subjects cropped (``crop_margin=2``) on two CPU cores.

  Files, in ``out_dir``: ``sub-XX_pet_low.nii.gz``, ``sub-XX_pet_full.nii.gz`` (and
  ``sub-XX_activity.nii.gz`` with ``write_activity``), float32 with the MNI affine (shifted when
  cropped), each written atomically; and ``datalist.csv`` with columns
  ``subject,split,pet_low,pet_full`` (plus ``activity`` with ``write_activity``) holding paths
  relative to the CSV. Subjects are numbered train first, then val, then test. The output is a
  deterministic function of the arguments.

  Args:
    out_dir: output folder, created if missing.
    dose_fraction: fraction of the full counts in the low-count image, in (0, 1].
    total_counts: expected counts of a full-count image with intensity scale 1.
    seed: master seed; subject k draws from ``default_rng([seed, k])``.
    resolution: template resolution in mm (1 or 2).
    n_train: number of training subjects.
    n_val: number of validation subjects.
    n_test: number of test subjects.
    max_lesions: each subject gets ``rng.integers(0, max_lesions + 1)`` hot lesions.
    intensity_jitter: half-width of the uniform global intensity scale around 1.
    smooth_fwhm_mm: scanner blur (see ``simulate_pet_activity``).
    crop_margin: if not None, crop every volume to the brain's bounding box plus this many
      voxels (99x117x95 -> about 79x95x79 at 2 mm with margin 2), which makes CPU demos faster.
    write_activity: also write the noiseless activity (the ideal reference) per subject.

  Returns:
    Path of the written ``datalist.csv``.
  """
  counts = (int(n_train), int(n_val), int(n_test))
  if min(counts) < 0 or sum(counts) == 0:
    raise ValueError(f"subject counts must be >= 0 with at least one subject, got {counts}")
  if not 0.0 <= intensity_jitter < 1.0:
    raise ValueError(f"intensity_jitter must be in [0, 1), got {intensity_jitter}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  maps = mni152_tissue_maps(resolution)
  affine = maps["affine"]
  spacing = maps["spacing"]
  box = None
  if crop_margin is not None:
    _, affine, box = crop_to_brain(maps["brain_mask"], affine, crop_margin,
                                   mask=maps["brain_mask"])
  splits = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
  header = ["subject", "split", "pet_low", "pet_full"] + (["activity"] if write_activity else [])
  rows = []
  for k, split in enumerate(splits):
    rng = np.random.default_rng([int(seed), k])
    scale = rng.uniform(1.0 - intensity_jitter, 1.0 + intensity_jitter)
    n_lesions = int(rng.integers(0, max_lesions + 1)) if max_lesions > 0 else 0
    activity = scale * simulate_pet_activity(
        maps["gm"], maps["wm"], maps["csf"], smooth_fwhm_mm=smooth_fwhm_mm, spacing=spacing,
        n_lesions=n_lesions, rng=rng)
    if box is not None:
      activity = activity[tuple(slice(a, b) for a, b in box)]
    subject_counts = float(total_counts) * scale
    full = degrade.simulate_low_count_pet(activity, subject_counts, 1.0, spacing, rng)
    low = degrade.simulate_low_count_pet(activity, subject_counts, dose_fraction, spacing, rng)
    subject = f"sub-{k:02d}"
    names = {"pet_low": f"{subject}_pet_low.nii.gz", "pet_full": f"{subject}_pet_full.nii.gz"}
    volumes = {"pet_low": low, "pet_full": full}
    if write_activity:
      names["activity"] = f"{subject}_activity.nii.gz"
      volumes["activity"] = activity
    for key, name in names.items():
      nifti.save_volume(os.path.join(out_dir, name), volumes[key], affine=affine)
    rows.append([subject, split] + [names[h] for h in header[2:]])
  csv_path = os.path.join(out_dir, "datalist.csv")
  _write_csv_atomic(csv_path, header, rows)
  return csv_path
