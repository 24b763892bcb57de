"""Finite-difference spatial gradients of (B, D, H, W, C) volumes.

Forward differences over every neighbouring voxel pair, including pairs that straddle puzzle-cell
borders: that is where the r-periodic seams of a puzzled model live (PPDM's puzzle-gradient loss).
"""

import jax.numpy as jnp


def spatial_gradients(x):
  """Returns (dD, dH, dW), each one voxel shorter along its own axis."""
  return (x[:, 1:] - x[:, :-1], x[:, :, 1:] - x[:, :, :-1], x[:, :, :, 1:] - x[:, :, :, :-1])


def gradient_l1(pred, target):
  """Mean absolute difference between the spatial gradients of two volumes."""
  total = 0.0
  for gp, gt in zip(spatial_gradients(pred), spatial_gradients(target)):
    total = total + jnp.mean(jnp.abs(gp - gt))
  return total / 3.0
