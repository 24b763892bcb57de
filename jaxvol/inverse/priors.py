"""Diffusion priors behind one interface for plug-and-play solvers: (x_t, t, key) -> x0 estimate.

"Investigating the Feasibility of Patch-based Inference for Generalized Diffusion Priors in Inverse
Problems for Medical Images" (2025): a prior trained on random 3D patches is evaluated on the
whole volume as overlapping patches with smooth fusion weights and a random shift of the patch
grid at every step, so patch borders never stay in one place. Here:

  GaussianPrior   the exact E[x0 | x_t] for x0 ~ N(mu, s^2) per voxel (tests and sanity checks);
  NetworkPrior    a trained denoiser (any `(params, x_t, cond, t) -> raw output` with a DDPM
                  parameterisation), on the whole volume, or, with a `SlidingWindow`, as a patch
                  prior: Gaussian-blended windows (a partition of unity, jaxvol.ops.windows)
                  whose grid is shifted by a random offset drawn from `key` at every call.
                  `cond` holds fixed per-voxel channels cut into the same windows as x_t: the
                  normalised position channels of a prior trained with them (the paper's
                  optional position encoding; config.data.position_channels).

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
    apply: (params, x_t (B, D, H, W, C), cond (B, D, H, W, K), t (B,)) -> raw network output,
      read through `diffusion.split_output` (eps, x0 or v).
    params: the network's parameters.
    diffusion: the DDPM the network was trained with.
    window: None for whole-volume evaluation; a SlidingWindow for a patch prior.
    shift: with a window, shift the window grid by a random offset (from `key`) at every call.
    clip: clip the x0 estimate to [-clip, clip] (the training intensity range); None for no clip.
    cond: None, or fixed channels (D, H, W, K) of the volume being solved for (position
      channels), passed to `apply` next to x_t (windowed with it).
  """

  apply: Callable
  params: Any
  diffusion: gaussian.GaussianDiffusion
  window: windows_lib.SlidingWindow | None = None
  shift: bool = True
  clip: float | None = 1.0
  cond: Any = None

  def __call__(self, x_t, t, key=None):
    squeeze = x_t.ndim == 3
    x = x_t[None, ..., None] if squeeze else x_t
    tv = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
    if self.cond is None:
      cond = jnp.zeros(x.shape[:4] + (0,), x.dtype)
    else:
      if tuple(self.cond.shape[:3]) != tuple(x.shape[1:4]):
        raise ValueError(f"the prior's fixed channels {self.cond.shape} do not match the volume "
                         f"{x.shape[1:4]}")
      cond = jnp.broadcast_to(jnp.asarray(self.cond, x.dtype),
                              (x.shape[0],) + tuple(self.cond.shape))
    net = lambda xw, cw, tw: self.apply(self.params, xw, cw, tw)
    if self.window is None:
      out = net(x, cond, tv)
    else:
      offset = None
      if self.shift and key is not None:
        offset = jax.random.randint(key, (3,), 0, jnp.asarray(self.window.window))
      out = self.window(net, (x, cond), (tv,), offset=offset)
    x0, _ = self.diffusion.split_output(out, x, tv)
    if self.clip is not None:
      x0 = jnp.clip(x0, -self.clip, self.clip)
    return x0[0, ..., 0] if squeeze else x0


def from_method(method, params, window: windows_lib.SlidingWindow | None = None,
                shift: bool = True, clip: float | None | str = "config",
                positions=None) -> NetworkPrior:
  """A NetworkPrior from an unconditional `full3d` method (config.data.inputs = ()).

  The method's network takes [x_t] (plus the position channels when it was trained with them)
  and its DDPM parameterisation.

  Args:
    method: the built method.
    params: its parameters.
    window: None (whole volume) or the patch prior's SlidingWindow.
    shift: random window-grid shift at every call.
    clip: x0 clip (see NetworkPrior); "config": the method's config.diffusion.clip_x0 (0: none),
      which the configs set to cover their preset's range (jaxvol.config.clamp_for_preset).
    positions: (D, H, W, 3) normalised positions of the volume being solved for
      (jaxvol.data.pipeline.position_grid of the region inside its whole volume); required when
      the method uses position channels, refused otherwise.
  """
  if method.config.data.inputs:
    raise ValueError(f"a prior must be unconditional; this method has inputs "
                     f"{tuple(method.config.data.inputs)} (set config.data.inputs = ())")
  if not hasattr(method, "diffusion"):
    raise ValueError(f"method {type(method).__name__} has no Gaussian diffusion to act as a prior")
  uses_positions = getattr(method, "position_channels", False)
  if uses_positions and positions is None:
    raise ValueError("this prior was trained with position channels: pass the positions of the "
                     "volume being solved for (jaxvol.data.pipeline.position_grid)")
  if not uses_positions and positions is not None:
    raise ValueError("positions given to a prior trained without position channels")
  if positions is not None:
    positions = jnp.asarray(positions, jnp.float32)
    if positions.ndim != 4 or positions.shape[-1] != 3:
      raise ValueError(f"positions must be (D, H, W, 3), got {positions.shape}")

  if clip == "config":
    clip = float(method.config.diffusion.clip_x0) or None

  def apply(p, x, cond, t):
    return method._apply(p, x, cond, t)  # pylint: disable=protected-access

  return NetworkPrior(apply, params, method.diffusion, window, shift, clip, positions)
