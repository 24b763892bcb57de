"""Tests for jaxvol.eval.preview: PNG written atomically, layout and orientation."""

import numpy as np
import pytest
from PIL import Image

from jaxvol.eval import preview


def _vol(shape=(12, 14, 10), seed=0):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_writes_png_and_width_grows_with_panels(tmp_path):
  x, y = _vol(seed=0), _vol(seed=1)
  p2 = preview.save_triplanar(tmp_path / "two.png", [("input", x), ("target", y)])
  p4 = preview.save_triplanar(
      tmp_path / "four.png", [("input", x), ("prediction", y), ("target", x)], error_panel=True)
  with Image.open(p2) as a, Image.open(p4) as b:
    assert a.format == b.format == "PNG"
    w2, h2 = a.size
    w4, h4 = b.size
  assert w4 > w2 and h4 == h2
  # Width is about linear in the number of columns (2 vs 4).
  assert w4 / w2 == pytest.approx(2.0, rel=0.2)
  assert sorted(f.name for f in tmp_path.iterdir()) == ["four.png", "two.png"]


def test_error_panel_tuple_spacing_and_center(tmp_path):
  x = _vol()
  out = tmp_path / "sub" / "p.png"
  preview.save_triplanar(out, [("a", x)], error_panel=("err", x - 0.5), center=(1, 2, 3),
                         spacing=(1.0, 1.0, 3.0), window=(0.0, 1.0))
  with Image.open(out) as im:
    assert im.size[0] > 0
  assert [f.name for f in out.parent.iterdir()] == ["p.png"]


def test_orient_slice_radiological():
  vol = np.zeros((4, 5, 6))
  vol[3, 4, 5] = 1.0  # most Right, Anterior, Superior voxel
  ax = preview.orient_slice(vol, "axial", 5)
  assert ax.shape == (5, 4) and ax[0, 0] == 1.0  # anterior at top, right on the viewer's left
  co = preview.orient_slice(vol, "coronal", 4)
  assert co.shape == (6, 4) and co[0, 0] == 1.0  # superior at top, right on the left
  sa = preview.orient_slice(vol, "sagittal", 3)
  assert sa.shape == (6, 5) and sa[0, 0] == 1.0  # superior at top, anterior on the left


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="shape"):
    preview.save_triplanar(tmp_path / "x.png", [("a", _vol()), ("b", _vol((3, 3, 3)))])
  with pytest.raises(ValueError, match="outside"):
    preview.save_triplanar(tmp_path / "x.png", [("a", _vol())], center=(50, 0, 0))
  assert not list(tmp_path.iterdir())
