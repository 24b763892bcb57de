"""Diffusion priors behind one interface for plug-and-play solvers: (x_t, t, key) -> x0 estimate.

"Investigating the Feasibility of Patch-based Inference for Generalized Diffusion Priors in Inverse
Problems for Medical Images" (2025): a prior trained on random 3D patches is evaluated on the
whole volume as overlapping patches with smooth fusion weights and a random shift of the patch
grid at every step, so patch borders never stay in one place. Here:

  GaussianPrior   the exact E[x0 | x_t] for x0 ~ N(mu, s^2) per voxel (tests and sanity checks);
  NetworkPrior    a trained denoiser (any `(params, x_t, t) -> raw output` with a DDPM
                  parameterisation), on the whole volume, or, with a `SlidingWindow`, as a patch
                  prior: Gaussian-blended windows (a partition of unity, jaxvol.ops.windows)
                  whose grid is shifted by a random offset drawn from `key` at every call.

Every prior exposes `diffusion` (the DDPM whose abar indexes t), so a solver needs nothing else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxvol.diffusion import gaussian
from jaxvol.ops import windows as windows_lib


def _bcast(v, x):
  return jnp.reshape(v, jnp.shape(v) + (1,) * (x.ndim - jnp.ndim(v))).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class GaussianPrior:
  """x0 ~ N(mu, s^2) independently per voxel; the posterior mean of x0 given x_t, exactly."""

  mu: float
  s: float
  diffusion: gaussian.GaussianDiffusion = gaussian.GaussianDiffusion(parameterization="x0")

  def __call__(self, x_t, t, key=None):
    del key
    a = _bcast(self.diffusion.abar(t), x_t)
    gain = jnp.sqrt(a) * self.s**2 / (a * self.s**2 + 1.0 - a)
    return self.mu + gain * (x_t - jnp.sqrt(a) * self.mu)


@dataclasses.dataclass(frozen=True)
class NetworkPrior:
  """A trained diffusion network as a prior, whole-volume or patch-based.

  Attributes:
    apply: (params, x_t (B, D, H, W, C), t (B,)) -> raw network output, read through
      `diffusion.split_output` (eps, x0 or v).
    params: the network's parameters.
    diffusion: the DDPM the network was trained with.
    window: None for whole-volume evaluation; a SlidingWindow for a patch prior.
    shift: with a window, shift the window grid by a random offset (from `key`) at every call.
    clip: clip the x0 estimate to [-clip, clip] (the training intensity range); None for no clip.
  """

  apply: Callable
  params: Any
  diffusion: gaussian.GaussianDiffusion
  window: windows_lib.SlidingWindow | None = None
  shift: bool = True
  clip: float | None = 1.0

  def __call__(self, x_t, t, key=None):
    squeeze = x_t.ndim == 3
    x = x_t[None, ..., None] if squeeze else x_t
    tv = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    net = lambda xw, tw: self.apply(self.params, xw, tw)
    if self.window is None:
      out = net(x, tv)
    else:
      offset = None
      if self.shift and key is not None:
        offset = jax.random.randint(key, (3,), 0, jnp.asarray(self.window.window))
      out = self.window(net, (x,), (tv,), offset=offset)
    x0, _ = self.diffusion.split_output(out, x, tv)
    if self.clip is not None:
      x0 = jnp.clip(x0, -self.clip, self.clip)
    return x0[0, ..., 0] if squeeze else x0


def from_method(method, params, window: windows_lib.SlidingWindow | None = None,
                shift: bool = True, clip: float | None = 1.0) -> NetworkPrior:
  """A NetworkPrior from an unconditional `full3d` method (config.data.inputs = ()).

  The method's network takes [x_t] (no condition channels) and its DDPM parameterisation.
  """
  if method.cond_channels:
    raise ValueError(f"a prior must be unconditional; this method has {method.cond_channels} "
                     "condition channels (set config.data.inputs = ())")
  if not hasattr(method, "diffusion"):
    raise ValueError(f"method {type(method).__name__} has no Gaussian diffusion to act as a prior")

  def apply(p, x, t):
    empty = jnp.zeros(x.shape[:4] + (0,), x.dtype)
    return method._apply(p, x, empty, t)  # pylint: disable=protected-access

  return NetworkPrior(apply, params, method.diffusion, window, shift, clip)
