"""Puzzle, Haar and gradient operators against naive references."""

import numpy as np
import pytest

from jaxvol.ops import gradients, haar, puzzle


def naive_puzzle(x, f):
  """Strided sub-volumes x[i::r0, j::r1, k::r2] stacked as channels, offset-major."""
  r0, r1, r2 = f
  pieces = [x[:, i::r0, j::r1, k::r2] for i in range(r0) for j in range(r1) for k in range(r2)]
  return np.concatenate(pieces, axis=-1)


@pytest.mark.parametrize("factor,shape", [
    (2, (8, 8, 8)), (4, (16, 8, 12)), ((1, 2, 2), (5, 8, 6)), ((2, 1, 3), (6, 7, 9)),
    (2, (7, 9, 5)), (4, (9, 13, 6)), ((3, 2, 4), (10, 5, 11)),
])
def test_puzzle_round_trip_exact(factor, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape, 3)).astype(np.float32)
  y = puzzle.puzzle(x, factor)
  f = puzzle.as_factor(factor)
  assert y.shape[1:4] == tuple(-(-s // r) for s, r in zip(shape, f))
  assert y.shape[-1] == 3 * f[0] * f[1] * f[2]
  np.testing.assert_array_equal(np.asarray(puzzle.unpuzzle(y, factor, shape)), x)


@pytest.mark.parametrize("factor", [2, (1, 2, 2), (2, 3, 1)])
def test_puzzle_matches_strided_subvolumes(factor):
  x = np.arange(2 * 6 * 6 * 6 * 2, dtype=np.float32).reshape(2, 6, 6, 6, 2)
  f = puzzle.as_factor(factor)
  got = np.asarray(puzzle.puzzle(x, factor))
  # naive layout is piece-major then channel; ours is ((i r1 + j) r2 + k) * C + c: identical.
  np.testing.assert_array_equal(got, naive_puzzle(x, f))


def test_voxel_goes_to_its_cell_and_offset():
  x = np.zeros((1, 8, 8, 8, 1), np.float32)
  x[0, 5, 2, 7, 0] = 1.0
  y = np.asarray(puzzle.puzzle(x, 2))
  (b, d, h, w, c), = np.argwhere(y)
  assert (d, h, w) == (2, 1, 3) and c == (1 * 2 + 0) * 2 + 1


def test_non_divisible_is_padded_not_resized():
  x = np.random.default_rng(1).normal(size=(1, 5, 5, 5, 1)).astype(np.float32)
  y = np.asarray(puzzle.puzzle(x, 2))
  assert y.shape == (1, 3, 3, 3, 8)
  # edge padding: the padded last plane repeats the last real plane
  full = np.asarray(puzzle.unpuzzle(y, 2))
  np.testing.assert_array_equal(full[:, 5, :5, :5], x[:, 4])


def test_bad_factor_and_shapes():
  assert puzzle.as_factor((4,)) == (4, 4, 4)
  with pytest.raises(ValueError, match="factor"):
    puzzle.as_factor((2, 2))
  with pytest.raises(ValueError, match="multiple"):
    puzzle.unpuzzle(np.zeros((1, 2, 2, 2, 7)), 2)
  with pytest.raises(ValueError, match="B, D, H, W, C"):
    puzzle.puzzle(np.zeros((2, 2, 2)), 2)


def test_haar_orthonormal_round_trip_and_lowpass():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 8, 6, 10, 2)).astype(np.float32)
  w = np.asarray(haar.dwt3(x))
  assert w.shape == (2, 4, 3, 5, 16)
  np.testing.assert_allclose(np.asarray(haar.idwt3(w, x.shape[1:4])), x, atol=1e-5)
  np.testing.assert_allclose((w**2).sum(), (x**2).sum(), rtol=1e-5)  # energy preserved
  # LLL band (first C channels) is the 2x2x2 block sum / sqrt(8)
  block = x.reshape(2, 4, 2, 3, 2, 5, 2, 2).sum(axis=(2, 4, 6)) / np.sqrt(8.0)
  np.testing.assert_allclose(w[..., :2], block, atol=1e-5)


def test_gradients_include_cell_borders():
  x = np.zeros((1, 4, 4, 4, 1), np.float32)
  x[:, 2:] = 1.0  # a step exactly at a 2x-puzzle cell border
  gd, gh, gw = (np.asarray(g) for g in gradients.spatial_gradients(x))
  assert gd.shape == (1, 3, 4, 4, 1) and gd[:, 1].min() == 1.0 and gh.max() == 0 and gw.max() == 0
  assert float(gradients.gradient_l1(x, np.zeros_like(x))) > 0
