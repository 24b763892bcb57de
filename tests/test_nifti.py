"""NIfTI I/O: reorientation round trips, intensity scaling, bad inputs, real files."""

import gzip
import json
import os

import nibabel as nib
from nibabel import orientations as nio
import numpy as np
import pytest

from jaxvol.data import nifti
from jaxvol.data.nifti import VolumeError

# Non-RAS affines: LPS, a permuted PSL-like grid, and an all-flipped one with odd spacing.
AFFINES = {
    "LPS": np.array([[-1.0, 0, 0, 30], [0, -1.2, 0, 40], [0, 0, 2.0, -10], [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, -2.0, 10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]]),
    "LPI": np.array([[-0.7, 0, 0, 1], [0, -0.9, 0, 2], [0, 0, -3.0, 3], [0, 0, 0, 1]]),
    "RAS": np.diag([1.0, 1.0, 1.0, 1.0]),
}


def _write(path, data, affine, dtype=None, slope=None, inter=None):
  img = nib.Nifti1Image(data, affine, dtype=dtype)
  if slope is not None:
    img.header.set_slope_inter(slope, inter or 0.0)
  nib.save(img, str(path))
  return str(path)


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_reorientation_matches_closest_canonical_and_inverts(tmp_path, name):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 6, 7)).astype(np.float32)
  path = _write(tmp_path / "a.nii.gz", x, AFFINES[name])
  ras, geom = nifti.load_volume(path)
  canon = nib.as_closest_canonical(nib.load(path))
  np.testing.assert_array_equal(ras, canon.get_fdata())
  np.testing.assert_allclose(nifti.ras_affine(geom), canon.affine)
  assert geom.orientation == "".join(nib.aff2axcodes(AFFINES[name]))
  assert geom.shape == (5, 6, 7) and geom.ras_shape == ras.shape
  np.testing.assert_array_equal(nifti.to_original(ras, geom), x)
  # Save with geometry: same values on the original grid, same affine.
  out = str(tmp_path / "b.nii.gz")
  nifti.save_volume(out, ras, geometry=geom)
  back = nib.load(out)
  np.testing.assert_array_equal(back.get_fdata(), x)
  np.testing.assert_allclose(back.affine, AFFINES[name], atol=1e-6)
  again, geom2 = nifti.load_volume(out)
  np.testing.assert_array_equal(again, ras)
  assert geom2.orientation == geom.orientation
  assert nifti.Geometry.from_dict(json.loads(json.dumps(geom.to_dict()))) == geom


@pytest.mark.parametrize(
    "dtype,slope,inter",
    [(np.uint8, 2.0, 0.0), (np.dtype(">i2"), None, None), (np.float64, None, None),
     (np.int16, 0.5, -100.0)])
def test_dtypes_and_scaling(tmp_path, dtype, slope, inter):
  rng = np.random.default_rng(1)
  raw = rng.integers(0, 250, size=(4, 5, 6)).astype(dtype)
  if np.dtype(dtype).kind == "f":
    raw = (raw + rng.random(raw.shape)).astype(dtype)
  path = _write(tmp_path / "v.nii", raw, AFFINES["LPS"], dtype=dtype, slope=slope, inter=inter)
  expect = raw.astype(np.float64) * (slope or 1.0) + (inter or 0.0)
  ras, geom = nifti.load_volume(path, dtype=np.float64)
  np.testing.assert_array_equal(nifti.to_original(ras, geom), expect)
  ras32, _ = nifti.load_volume(path)
  assert ras32.dtype == np.float32
  np.testing.assert_allclose(nifti.to_original(ras32, geom), expect, rtol=1e-6)
  out = str(tmp_path / "o.nii.gz")
  nifti.save_volume(out, ras32, geometry=geom)
  again, geom2 = nifti.load_volume(out)
  np.testing.assert_array_equal(again, ras32)
  np.testing.assert_allclose(geom2.affine, geom.affine, atol=1e-6)


@pytest.mark.parametrize("name", ["LPS", "permuted", "RAS"])
def test_region_save_lands_at_world_position(tmp_path, name):
  x = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
  path = _write(tmp_path / "a.nii.gz", x, AFFINES[name])
  ras, geom = nifti.load_volume(path)
  box = ((1, 4), (2, 5), (0, 3))
  sub = ras[1:4, 2:5, 0:3]
  out = str(tmp_path / "sub.nii.gz")
  nifti.save_volume(out, sub, geometry=geom, region=box)
  img = nib.load(out)
  assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(AFFINES[name])  # original orientation
  # Every written voxel sits at the world position of the RAS voxel it came from.
  data = img.get_fdata()
  ras_aff = nifti.ras_affine(geom)
  for idx in [(0, 0, 0), (1, 2, 0), tuple(s - 1 for s in data.shape)]:
    world = img.affine @ np.array([*idx, 1.0])
    ras_idx = np.linalg.solve(ras_aff, world)[:3].round().astype(int)
    assert data[idx] == ras[tuple(ras_idx)]
    assert all(b[0] <= i < b[1] for i, b in zip(ras_idx, box))


def test_save_validates_shapes_and_is_atomic(tmp_path):
  x = np.zeros((4, 5, 6), np.float32)
  path = _write(tmp_path / "a.nii.gz", x, AFFINES["LPS"])
  ras, geom = nifti.load_volume(path)
  out = tmp_path / "o.nii.gz"
  with pytest.raises(VolumeError, match="o.nii.gz"):
    nifti.save_volume(out, np.zeros((4, 5, 5)), geometry=geom)
  with pytest.raises(VolumeError, match="o.nii.gz"):
    nifti.save_volume(out, np.zeros((2, 2, 2)), geometry=geom, region=((0, 2), (0, 3), (0, 2)))
  with pytest.raises(VolumeError, match="non-finite"):
    nifti.save_volume(out, np.full(ras.shape, np.nan), geometry=geom)
  with pytest.raises(ValueError):
    nifti.save_volume(out, ras)
  assert os.listdir(tmp_path) == ["a.nii.gz"]  # nothing, not even a temp file
  nifti.save_volume(out, ras[..., None], affine=np.eye(4))  # trailing channel dropped
  assert nib.load(out).shape == ras.shape


def test_4d_single_volume_is_squeezed(tmp_path):
  path = _write(tmp_path / "a.nii.gz", np.ones((3, 4, 5, 1), np.float32), np.eye(4))
  ras, _ = nifti.load_volume(path)
  assert ras.shape == (3, 4, 5)


def test_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(VolumeError, match="missing.nii.gz.*not found"):
    nifti.load_volume(tmp_path / "missing.nii.gz")
  (tmp_path / "empty.nii.gz").write_bytes(b"")
  with pytest.raises(VolumeError, match="empty.nii.gz.*empty"):
    nifti.load_volume(tmp_path / "empty.nii.gz")
  (tmp_path / "junk.nii").write_bytes(b"not a nifti file" * 30)
  with pytest.raises(VolumeError, match="junk.nii"):
    nifti.load_volume(tmp_path / "junk.nii")
  four_d = _write(tmp_path / "four_d.nii.gz", np.ones((3, 4, 5, 2), np.float32), np.eye(4))
  with pytest.raises(VolumeError, match="four_d.nii.gz.*4D"):
    nifti.load_volume(four_d)
  two_d = _write(tmp_path / "two_d.nii.gz", np.ones((3, 4), np.float32), np.eye(4))
  with pytest.raises(VolumeError, match="two_d.nii.gz.*3D"):
    nifti.load_volume(two_d)
  x = np.ones((4, 4, 4), np.float32)
  x[0, 0, :3] = np.nan
  x[1, 1, 1] = np.inf
  nan = _write(tmp_path / "nan.nii.gz", x, np.eye(4))
  with pytest.raises(VolumeError, match=r"nan.nii.gz: 4 non-finite voxels \(3 NaN, 1 Inf\)"):
    nifti.load_volume(nan)
  full = _write(tmp_path / "full.nii.gz", np.random.default_rng(0).random((20, 20, 20)), np.eye(4))
  blob = open(full, "rb").read()
  (tmp_path / "trunc.nii.gz").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(VolumeError, match="trunc.nii.gz.*truncated"):
    nifti.load_volume(tmp_path / "trunc.nii.gz")
  # A gzip stream cut inside the header.
  (tmp_path / "hdr.nii.gz").write_bytes(gzip.compress(gzip.decompress(blob)[:100]))
  with pytest.raises(VolumeError, match="hdr.nii.gz"):
    nifti.load_volume(tmp_path / "hdr.nii.gz")


def test_check_same_grid(tmp_path):
  def geom(affine, shape=(4, 5, 6)):
    return nifti.Geometry(affine, shape, (1, 1, 1), "RAS")

  g = geom(np.eye(4))
  nifti.check_same_grid([("a.nii", g), ("b.nii", geom(np.eye(4) + 1e-6))])
  with pytest.raises(VolumeError, match="b.nii.*shape.*a.nii"):
    nifti.check_same_grid([("a.nii", g), ("b.nii", geom(np.eye(4), (4, 5, 7)))])
  shifted = np.eye(4)
  shifted[0, 3] = 2.0
  with pytest.raises(VolumeError, match="b.nii.*affine.*a.nii"):
    nifti.check_same_grid([("a.nii", g), ("b.nii", geom(shifted))])


# Real volumes (skipped without ../shared/data).


def test_real_stroke_t2_scl_slope(shared_data):
  ras, geom = nifti.load_volume(shared_data / "mri_stroke" / "stroke_T2.nii.gz")
  assert geom.shape == (124, 160, 140) and geom.orientation == "RAS"
  assert geom.spacing == (1.0, 1.0, 1.0)
  assert ras.min() == 0.0 and 500.0 < ras.max() < 506.0  # uint8 x slope ~2 -> 0..504
  img = nib.load(shared_data / "mri_stroke" / "stroke_T2.nii.gz")
  raw = np.asanyarray(img.dataobj.get_unscaled())
  assert raw.max() <= 255 and ras.max() > 255


def test_real_ct_hu(shared_data):
  ras, geom = nifti.load_volume(shared_data / "ct_abdomen" / "example_ct.nii.gz")
  assert ras.shape == (122, 101, 112) and geom.spacing == (3.0, 3.0, 3.0)
  assert ras.min() == -1207.0 and ras.max() == 3382.0


def test_real_lps_mr_roundtrip(shared_data, tmp_path):
  path = shared_data / "ct_abdomen" / "example_mr_sm.nii.gz"
  ras, geom = nifti.load_volume(path)
  assert geom.orientation == "LPS"
  np.testing.assert_array_equal(nifti.to_original(ras, geom), nib.load(path).get_fdata())
  out = tmp_path / "mr.nii.gz"
  nifti.save_volume(out, ras, geometry=geom)
  np.testing.assert_allclose(nib.load(out).affine, nib.load(path).affine, atol=1e-4)


def test_real_templates_share_a_grid(shared_data):
  folder = shared_data / "templates_2mm"
  items = [(str(folder / f"{n}.nii.gz"), nifti.load_volume(folder / f"{n}.nii.gz")[1])
           for n in ("T1", "T2", "PD", "PET", "Transm", "CT")]
  nifti.check_same_grid(items)
  assert items[0][1].orientation == "LAS" and items[0][1].shape == (91, 109, 91)


def test_orientation_helpers_agree_with_nibabel():
  for aff in AFFINES.values():
    g = nifti.Geometry(aff, (3, 4, 5), (1, 1, 1), "".join(nib.aff2axcodes(aff)))
    ornt = nio.io_orientation(aff)
    assert g.ras_shape == tuple(np.array([3, 4, 5])[np.argsort(ornt[:, 0])])


@pytest.mark.parametrize("dtype,label", [
    (np.complex64, "complex64"), (np.complex128, "complex128"),
    (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]), "RGB")], ids=["c64", "c128", "rgb"])
def test_non_real_voxels_are_refused(tmp_path, dtype, label):
  data = np.zeros((4, 4, 4), dtype)
  path = _write(tmp_path / "odd.nii.gz", data, np.eye(4))
  assert nib.load(path).get_data_dtype() == np.dtype(dtype)  # nibabel kept the stored type
  with pytest.raises(VolumeError, match=f"odd.nii.gz: voxels of type {label} are not real"):
    nifti.load_volume(path)


def test_outputs_are_group_readable_under_the_usual_umask(tmp_path):
  """Atomic writes start from owner-only temporary files; what lands is readable like any file
  written under the umask (0o644 under 022), so a cluster group can read predictions."""
  import stat  # pylint: disable=g-import-not-at-top
  from jaxvol import fileio  # pylint: disable=g-import-not-at-top
  old = os.umask(0o022)
  try:
    nifti.save_volume(tmp_path / "p.nii.gz", np.zeros((4, 4, 4), np.float32), affine=np.eye(4))
    fileio.write_text_atomic(tmp_path / "s.json", "{}")
    fileio.write_bytes_atomic(tmp_path / "b.bin", lambda f: f.write(b"x"))
    for name in ("p.nii.gz", "s.json", "b.bin"):
      assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name
  finally:
    os.umask(old)


def test_qform_and_sform_codes_are_kept(tmp_path):
  """A prediction written on an input's geometry keeps the input's qform/sform codes (e.g. an
  aligned-to-template sform, code 2), so viewers place it as they place the input."""
  affine = np.diag([-1.5, 1.5, 2.0, 1.0])
  img = nib.Nifti1Image(np.random.default_rng(0).random((6, 5, 4)).astype(np.float32), affine)
  img.header.set_qform(affine, code=1)
  img.header.set_sform(affine, code=2)
  nib.save(img, tmp_path / "in.nii.gz")
  arr, geom = nifti.load_volume(tmp_path / "in.nii.gz")
  assert geom.codes == (1, 2) and nifti.Geometry.from_dict(geom.to_dict()).codes == (1, 2)
  nifti.save_volume(tmp_path / "out.nii.gz", arr, geometry=geom)
  out = nib.load(tmp_path / "out.nii.gz")
  assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (1, 2)
  np.testing.assert_allclose(out.affine, affine)
