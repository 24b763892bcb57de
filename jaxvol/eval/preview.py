"""Tri-planar PNG previews of 3D volumes (input | prediction | target | error) for reports.

One row per anatomical plane (axial, coronal, sagittal) through a chosen voxel, one column per
volume. Volumes are (D, H, W) arrays in RAS+ voxel order, the layout the data pipeline
canonicalises to: index 0 increases towards the subject's Right, index 1 towards Anterior,
index 2 towards Superior. Slices are shown in the radiological convention: the subject's right
on the viewer's left in axial and coronal views, anterior up in axial views, superior up in
coronal and sagittal views, and anterior on the left in sagittal views.

Rendering uses matplotlib's Agg canvas directly, so it works headless (no display, no pyplot
global state) and is safe to call from evaluation jobs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxvol import fileio

__all__ = ["save_triplanar", "orient_slice"]

_PLANES = ("axial", "coronal", "sagittal")


def orient_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
  """A 2D slice of a RAS+ volume, rotated for display with row 0 at the top.

  Args:
    volume: (X, Y, Z) array in RAS+ order.
    plane: "axial" (fixed Z), "coronal" (fixed Y) or "sagittal" (fixed X).
    index: voxel index along the fixed axis.

  Returns:
    2D array (rows, cols). Axial: rows run anterior -> posterior, cols right -> left. Coronal:
    rows superior -> inferior, cols right -> left. Sagittal: rows superior -> inferior, cols
    anterior -> posterior.
  """
  if plane == "axial":
    s = volume[:, :, index]  # (X, Y)
  elif plane == "coronal":
    s = volume[:, index, :]  # (X, Z)
  elif plane == "sagittal":
    s = volume[index, :, :]  # (Y, Z)
  else:
    raise ValueError(f"plane must be one of {_PLANES}, got {plane!r}")
  # In every plane the second in-plane axis becomes rows and both axes are reversed: the vertical
  # axis (Y or Z, increasing towards anterior/superior) must run top-down from its high end, and
  # the horizontal axis (X towards right, or Y towards anterior) must start from its high end so
  # the subject's right (axial/coronal) or anterior (sagittal) sits on the left.
  return s.T[::-1, ::-1]


def _aspect(plane: str, spacing) -> float:
  """Pixel height / width for imshow, from the voxel spacing of the slice's (row, col) axes."""
  sx, sy, sz = spacing
  return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def _default_window(volume: np.ndarray) -> tuple[float, float]:
  finite = volume[np.isfinite(volume)]
  if finite.size == 0:
    return 0.0, 1.0
  lo, hi = np.percentile(finite, [1.0, 99.0])
  if hi <= lo:
    # A flat volume (or one dominated by a single value) would give a zero-width window.
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
      hi = lo + 1.0
  return float(lo), float(hi)


def save_triplanar(
    path,
    panels: Sequence[tuple[str, np.ndarray]],
    center: Sequence[int] | None = None,
    window: tuple[float, float] | None = None,
    error_panel=None,
    spacing: Sequence[float] | None = None,
    suptitle: str | None = None,
    dpi: int = 100,
) -> str:
  """Writes a tri-planar PNG: one row per plane, one column per panel.

  Args:
    path: output .png path; written atomically (temporary file in the same folder, then
      ``os.replace``), so a reader never sees a half-written image.
    panels: ``[(title, volume), ...]`` intensity volumes, all the same (X, Y, Z) shape in RAS+.
    center: voxel (i, j, k) the three planes pass through; defaults to the volume centre.
    window: (low, high) grey-level window shared by all intensity panels; defaults to the 1st..99th
      percentile of the last intensity panel (by convention the target).
    error_panel: optional extra column with its own colormap and window (0 .. 99.5th percentile).
      ``True`` shows ``|panels[-2] - panels[-1]|`` (prediction vs target by convention); a
      ``(title, volume)`` tuple shows ``|volume|`` (e.g. an error the caller computed).
    spacing: optional voxel size (sx, sy, sz) in mm; sets each plane's pixel aspect so
      anisotropic volumes are not distorted. Defaults to isotropic.
    suptitle: optional figure title.
    dpi: resolution of the PNG.

  Returns:
    The path written, as a string.
  """
  # The OO API with an explicit Agg canvas renders off-screen without switching the process-wide
  # backend, which would disturb an interactive session that imported this module.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not panels:
    raise ValueError("panels is empty: nothing to preview")
  vols = []
  for title, vol in panels:
    vol = np.asarray(vol, dtype=np.float32)
    if vol.ndim != 3:
      raise ValueError(f"panel {title!r} must be a 3D volume, got shape {vol.shape}")
    vols.append((str(title), vol))
  shape = vols[0][1].shape
  for title, vol in vols:
    if vol.shape != shape:
      raise ValueError(f"panel {title!r} has shape {vol.shape}, expected {shape} like {vols[0][0]!r}")

  err = None
  if error_panel is True:
    if len(vols) < 2:
      raise ValueError("error_panel=True needs at least two panels (prediction, target)")
    err = (f"|{vols[-2][0]} - {vols[-1][0]}|", np.abs(vols[-2][1] - vols[-1][1]))
  elif error_panel is not None and error_panel is not False:
    title, vol = error_panel
    vol = np.abs(np.asarray(vol, dtype=np.float32))
    if vol.shape != shape:
      raise ValueError(f"error panel {title!r} has shape {vol.shape}, expected {shape}")
    err = (str(title), vol)

  if center is None:
    center = tuple(s // 2 for s in shape)
  center = tuple(int(c) for c in center)
  if len(center) != 3 or any(not 0 <= c < s for c, s in zip(center, shape)):
    raise ValueError(f"center {center} is outside the volume of shape {shape}")
  if spacing is None:
    spacing = (1.0, 1.0, 1.0)
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) != 3 or any(s <= 0 for s in spacing):
    raise ValueError(f"spacing must be three positive numbers, got {spacing}")

  lo, hi = window if window is not None else _default_window(vols[-1][1])
  if err is not None:
    finite = err[1][np.isfinite(err[1])]
    err_hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    err_hi = err_hi if err_hi > 0 else 1.0

  columns = vols + ([err] if err is not None else [])
  n_cols = len(columns)
  cell = 2.4  # inches per panel; the PNG width grows with the number of panels.
  fig = Figure(figsize=(cell * n_cols + 0.6, cell * 3 + (0.5 if suptitle else 0.2)), dpi=dpi)
  FigureCanvasAgg(fig)
  axes = fig.subplots(3, n_cols, squeeze=False)
  plane_index = {"axial": center[2], "coronal": center[1], "sagittal": center[0]}
  axis_name = {"axial": "k", "coronal": "j", "sagittal": "i"}
  for row, plane in enumerate(_PLANES):
    for col, (title, vol) in enumerate(columns):
      ax = axes[row, col]
      img = orient_slice(vol, plane, plane_index[plane])
      is_err = err is not None and col == n_cols - 1
      ax.imshow(
          img,
          cmap="magma" if is_err else "gray",
          vmin=0.0 if is_err else lo,
          vmax=err_hi if is_err else hi,
          aspect=_aspect(plane, spacing),
          interpolation="nearest",
      )
      ax.set_xticks([])
      ax.set_yticks([])
      if row == 0:
        ax.set_title(title, fontsize=9)
      if col == 0:
        ax.set_ylabel(f"{plane} {axis_name[plane]}={plane_index[plane]}", fontsize=8)
      # Side marker so the radiological convention is unambiguous to the reader.
      ax.text(0.02, 0.5, "A" if plane == "sagittal" else "R", transform=ax.transAxes,
              color="yellow", fontsize=7, va="center", ha="left")
  title = f"window [{lo:.4g}, {hi:.4g}]"
  if err is not None:
    title += f"; error [0, {err_hi:.4g}]"
  fig.suptitle(f"{suptitle}\n{title}" if suptitle else title, fontsize=9)
  fig.tight_layout()

  fileio.write_bytes_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi), suffix=".png")
  return path
