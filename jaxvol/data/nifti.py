"""NIfTI input and output that keeps the geometry of the original file.

Training works on volumes in RAS orientation (first axis towards the subject's Right, then
Anterior, then Superior) so that every subject and modality lines up the same way. Outputs must
overlay their inputs in any viewer, so every load records the original file's geometry and
`save_volume` puts arrays back onto the original voxel grid with the original affine.

The reorientation is the one of `nibabel.as_closest_canonical`: only axis permutations and flips,
never resampling, so it is exactly invertible (`to_original`).

Every problem with an input file (missing, empty, truncated, not 3D, complex or RGB voxels,
non-finite voxels, paired volumes on different grids) raises `VolumeError` with the file name and
the reason.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import nibabel as nib
from nibabel import orientations as nio
import numpy as np

from jaxvol import fileio

_RAS_ORNT = nio.axcodes2ornt(("R", "A", "S"))


class VolumeError(ValueError):
  """A volume file (or a list of them) cannot be used; the message names the file and why."""


@dataclasses.dataclass(eq=False)
class Geometry:
  """Where the voxels of an ORIGINAL file sit in the world.

  Attributes:
    affine: 4x4 float64 voxel -> world (mm) matrix of the original file.
    shape: the original 3D shape.
    spacing: voxel sizes in mm from the header zooms.
    orientation: axis codes of the original file, e.g. "RAS" or "LPS".
    codes: the file's (qform_code, sform_code), written back unchanged by `save_volume` (1, 1:
      scanner-anatomical, for geometries that did not come from a file).
  """

  affine: np.ndarray
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  orientation: str
  codes: tuple[int, int] = (1, 1)

  def __post_init__(self):
    self.affine = np.asarray(self.affine, dtype=np.float64).reshape(4, 4)
    self.shape = tuple(int(s) for s in self.shape)
    self.spacing = tuple(float(s) for s in self.spacing)
    self.orientation = str(self.orientation)
    self.codes = tuple(int(c) for c in self.codes)

  def __eq__(self, other) -> bool:
    # The generated __eq__ would compare the affine arrays element-wise and fail on truth value.
    if not isinstance(other, Geometry):
      return NotImplemented
    return (self.shape == other.shape and self.spacing == other.spacing
            and self.orientation == other.orientation
            and np.array_equal(self.affine, other.affine))

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict (plain lists and numbers)."""
    return {
        "affine": self.affine.tolist(),
        "shape": list(self.shape),
        "spacing": list(self.spacing),
        "orientation": self.orientation,
        "codes": list(self.codes),
    }

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Geometry":
    return cls(affine=np.asarray(d["affine"], dtype=np.float64), shape=tuple(d["shape"]),
               spacing=tuple(d["spacing"]), orientation=d["orientation"],
               codes=tuple(d.get("codes", (1, 1))))

  @property
  def ras_shape(self) -> tuple[int, int, int]:
    """Shape of the array after reorientation to RAS."""
    ornt = _ornt(self)
    out = [0, 0, 0]
    for i, (axis, _) in enumerate(ornt):
      out[int(axis)] = self.shape[i]
    return tuple(out)


def _ornt(geometry: Geometry) -> np.ndarray:
  """Orientation (nibabel ornt array) taking the original axes to RAS."""
  ornt = nio.io_orientation(geometry.affine)
  if np.isnan(ornt).any():
    raise ValueError(f"degenerate affine, cannot find its orientation: {geometry.affine.tolist()}")
  return ornt


def _inverse_ornt(ornt: np.ndarray) -> np.ndarray:
  """Orientation undoing `ornt` (RAS axes back to the original axes)."""
  return nio.ornt_transform(_RAS_ORNT, ornt)


def _geometry_of(img, path: str) -> Geometry:
  affine = np.asarray(img.affine, dtype=np.float64)
  if not np.isfinite(affine).all():
    raise VolumeError(f"{path}: affine has non-finite entries")
  ornt = nio.io_orientation(affine)
  if np.isnan(ornt).any():
    raise VolumeError(f"{path}: degenerate affine (a zero-length axis), cannot orient it")
  zooms = img.header.get_zooms()[:3]
  try:
    codes = (int(img.header["qform_code"]), int(img.header["sform_code"]))
  except (KeyError, TypeError, ValueError):  # not a NIfTI header (e.g. Analyze)
    codes = (1, 1)
  return Geometry(affine=affine, shape=tuple(img.shape[:3]), spacing=tuple(zooms),
                  orientation="".join(nio.ornt2axcodes(ornt)), codes=codes)


def load_volume(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, Geometry]:
  """Reads a 3D NIfTI file, applies its intensity scaling and reorients it to RAS.

  Args:
    path: a .nii or .nii.gz file.
    dtype: float dtype of the returned array (float32 or float64).

  Returns:
    (array in RAS orientation, Geometry of the original file).

  Raises:
    VolumeError: missing, empty, truncated or corrupt file; not a 3D volume (a 4D file is accepted
      only when its fourth axis has length 1); a zero-sized axis; voxels that are not real numbers
      (complex, RGB); NaN or Inf voxels.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VolumeError(f"{path}: file not found")
  if os.path.isdir(path):
    raise VolumeError(f"{path}: is a directory, not a NIfTI file")
  if os.path.getsize(path) == 0:
    raise VolumeError(f"{path}: file is empty")
  try:
    img = nib.load(path)
  except Exception as e:  # nibabel raises many types for bad headers; all mean "unreadable".
    raise VolumeError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise VolumeError(f"{path}: not a NIfTI image (nibabel read it as {type(img).__name__})")
  shape = tuple(int(s) for s in img.shape)
  if len(shape) == 4 and shape[3] == 1:
    pass  # A single 3D volume stored with a trailing time axis: squeezed below.
  elif len(shape) != 3:
    why = "; 4D files with more than one volume are not supported" if len(shape) == 4 else ""
    raise VolumeError(f"{path}: expected a 3D volume, got shape {shape} ({len(shape)}D{why})")
  if min(shape) == 0:
    raise VolumeError(f"{path}: zero-sized axis in shape {shape}")
  stored = img.get_data_dtype()
  if stored.kind not in "biuf":
    # get_fdata would keep only the real part of complex voxels (with a warning) and fails on
    # structured RGB voxels with an error that reads like a corrupt file.
    label = img.header.get_value_label("datatype")
    raise VolumeError(f"{path}: voxels of type {label} are not real numbers; "
                      "store one real value per voxel (e.g. the magnitude of complex data, or "
                      "one file per colour channel)")
  geometry = _geometry_of(img, path)
  dtype = np.dtype(dtype)
  # get_fdata applies scl_slope/scl_inter and byte order; read in float64 only when asked for.
  read_dtype = np.float64 if dtype == np.float64 else np.float32
  try:
    data = img.get_fdata(dtype=read_dtype, caching="unchanged")
  except Exception as e:  # Truncated gzip streams raise EOFError, OSError, zlib.error, ValueError.
    raise VolumeError(f"{path}: cannot read voxel data, file truncated or corrupt "
                      f"({type(e).__name__}: {e})") from e
  data = data.reshape(shape[:3])
  bad = int(np.count_nonzero(~np.isfinite(data)))
  if bad:
    n_nan = int(np.count_nonzero(np.isnan(data)))
    raise VolumeError(f"{path}: {bad} non-finite voxels ({n_nan} NaN, {bad - n_nan} Inf) "
                      f"out of {data.size}")
  ras = nio.apply_orientation(data, _ornt(geometry))
  return np.ascontiguousarray(ras, dtype=dtype), geometry


def ras_affine(geometry: Geometry) -> np.ndarray:
  """Affine of the RAS-reoriented array (same world positions as the original voxels)."""
  ornt = _ornt(geometry)
  return geometry.affine @ nio.inv_ornt_aff(ornt, geometry.shape)


def to_original(array_ras: np.ndarray, geometry: Geometry) -> np.ndarray:
  """Puts a RAS-oriented array back onto the original voxel grid (exact inverse of the load)."""
  array_ras = np.asarray(array_ras)
  if array_ras.shape[:3] != geometry.ras_shape:
    raise ValueError(f"array shape {array_ras.shape} does not match the RAS grid "
                     f"{geometry.ras_shape} of the geometry")
  return np.ascontiguousarray(nio.apply_orientation(array_ras, _inverse_ornt(_ornt(geometry))))


def _normalise_region(region, shape: Sequence[int], what: str) -> tuple[tuple[int, int], ...]:
  if len(region) != 3:
    raise ValueError(f"{what}: region must have 3 (start, stop) pairs, got {region!r}")
  out = []
  for axis, r in enumerate(region):
    if isinstance(r, slice):
      start, stop = r.start or 0, shape[axis] if r.stop is None else r.stop
    else:
      start, stop = r
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= shape[axis]:
      raise ValueError(f"{what}: region axis {axis} = ({start}, {stop}) is outside "
                       f"[0, {shape[axis]}]")
    out.append((start, stop))
  return tuple(out)


def save_volume(path: str | os.PathLike, array: np.ndarray, geometry: Geometry | None = None,
                affine: np.ndarray | None = None,
                region: Sequence[tuple[int, int] | slice] | None = None) -> None:
  """Writes a float32 NIfTI atomically (temporary file in the same folder, then rename).

  Args:
    path: output .nii or .nii.gz path; parent folders are created.
    array: 3D array (a trailing channel axis of length 1 is dropped). With `geometry`, it is in RAS
      orientation on the geometry's RAS grid (or on the `region` sub-box of it).
    geometry: geometry of the input the array was derived from; the array is put back onto the
      original voxel grid and written with the original affine, so it overlays the input.
    affine: used instead of `geometry` to write `array` exactly as given.
    region: 3 (start, stop) pairs (or slices) in voxel coordinates of the RAS grid (with
      `geometry`) or of `array`'s own grid (with `affine`): `array` covers only that sub-box, and
      the written affine is translated so the sub-box lands at its world position.

  Raises:
    VolumeError: shapes disagree, non-finite values, or a bad file name.
    ValueError: neither or both of `geometry` and `affine` given.
  """
  path = os.fspath(path)
  if not (path.endswith(".nii") or path.endswith(".nii.gz")):
    raise VolumeError(f"{path}: output name must end in .nii or .nii.gz")
  if (geometry is None) == (affine is None):
    raise ValueError(f"{path}: give exactly one of geometry= or affine=")
  array = np.asarray(array)
  if array.ndim == 4 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim != 3:
    raise VolumeError(f"{path}: can only write 3D arrays, got shape {array.shape}")
  bad = int(np.count_nonzero(~np.isfinite(array)))
  if bad:
    raise VolumeError(f"{path}: refusing to write {bad} non-finite voxels")
  array = array.astype(np.float32, copy=False)

  if geometry is not None:
    ornt = _ornt(geometry)
    ras_shape = geometry.ras_shape
    if region is None:
      if array.shape != ras_shape:
        raise VolumeError(f"{path}: array shape {array.shape} does not match the RAS grid "
                          f"{ras_shape} of the geometry")
      data, out_affine = to_original(array, geometry), geometry.affine
    else:
      try:
        box = _normalise_region(region, ras_shape, path)
      except ValueError as e:
        raise VolumeError(str(e)) from e
      want = tuple(b - a for a, b in box)
      if array.shape != want:
        raise VolumeError(f"{path}: array shape {array.shape} does not match region {box} "
                          f"(size {want})")
      data = np.ascontiguousarray(nio.apply_orientation(array, _inverse_ornt(ornt)))
      # First voxel of the sub-box on the original grid: a flipped axis counts from its far end.
      start = np.zeros(3)
      for i, (ras_axis, flip) in enumerate(ornt):
        a, b = box[int(ras_axis)]
        start[i] = a if flip > 0 else geometry.shape[i] - b
      out_affine = geometry.affine.copy()
      out_affine[:3, 3] = geometry.affine[:3, :3] @ start + geometry.affine[:3, 3]
  else:
    out_affine = np.asarray(affine, dtype=np.float64)
    if out_affine.shape != (4, 4) or not np.isfinite(out_affine).all():
      raise VolumeError(f"{path}: affine must be a finite 4x4 matrix")
    data = array
    if region is not None:
      box = np.array([(r.start or 0) if isinstance(r, slice) else r[0] for r in region], float)
      out_affine = out_affine.copy()
      out_affine[:3, 3] = out_affine[:3, :3] @ box + out_affine[:3, 3]

  img = nib.Nifti1Image(data, out_affine)
  img.header.set_xyzt_units("mm", "sec")
  qcode, scode = geometry.codes if geometry is not None else (1, 1)
  img.header.set_qform(out_affine, code=qcode)
  img.header.set_sform(out_affine, code=scode)
  # nibabel picks compression from the suffix, so the temporary file keeps it.
  fileio.write_path_atomic(path, lambda tmp: nib.save(img, tmp),
                           suffix=".nii.gz" if path.endswith(".nii.gz") else ".nii")


def check_same_grid(items: Iterable[tuple[str, Geometry]], atol: float = 1e-3) -> None:
  """Checks that paired volumes of one subject share one voxel grid.

  Args:
    items: (file name, Geometry) pairs.
    atol: tolerance on affine entries (mm); headers written by different tools round differently.

  Raises:
    VolumeError: naming both files, when shapes differ or affines differ by more than `atol`.
  """
  items = list(items)
  if not items:
    return
  ref_name, ref = items[0]
  for name, geom in items[1:]:
    if geom.shape != ref.shape:
      raise VolumeError(f"{name}: shape {geom.shape} differs from {ref_name}: shape {ref.shape}; "
                        "paired volumes must be on one grid")
    if not np.allclose(geom.affine, ref.affine, rtol=0.0, atol=atol):
      diff = float(np.abs(geom.affine - ref.affine).max())
      raise VolumeError(f"{name}: affine differs from {ref_name} (max difference {diff:.4g}); "
                        "paired volumes must be on one grid")
