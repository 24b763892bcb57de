"""Sparse-timestep DDPM: training and sampling on a few uniformly spaced noise levels.

"Structure-adaptive sparse diffusion for 3D medical image enhancement" (MICCAI 2026): the DDPM of
Ho et al. (T = 1000, linear betas 1e-4..0.02) is trained only at the f_steps + 1 levels
floor(linspace(0, T - 1, f_steps + 1)) ({0, 199, 399, 599, 799, 999} for f_steps = 5) and sampled
by walking that set downwards with deterministic DDIM moves (Song et al., 2021) corrected by
Heun's method: after the DDIM move t -> t', the network is evaluated again at (x_t', t'), the two
noise estimates are averaged and the move is redone from x_t with the average (x0 re-derived from
x_t and the averaged eps). In sigma = sqrt((1 - abar) / abar), x / sqrt(abar) this is exactly Heun's
second-order step for the probability-flow ODE d(x/sqrt(abar)) = eps d(sigma) (Karras et al.,
"Elucidating the design space of diffusion-based generative models", 2022). The correction is
skipped on the move to the lowest level (as in EDM's last step: over a sigma ratio of ~70 a second-
order step overshoots). The result is the sample reached at the lowest level (t = 0: abar =
0.9999, 1% noise), 2 f_steps - 1 network evaluations (9 for f_steps = 5). An extra x0 evaluation at
t = 0 (`final_denoise=True`, one more evaluation) is available but off by default: the velocity
loss weights level t by 1 - abar_t, 1e-4 at t = 0, so the network is effectively untrained there
(on the CT task ending with it cost 4.5 dB, docs/results/sparse_speedup_h100*.json).

Where this differs from the authors' code: their correction averages x0 AND eps and redoes the
move as sqrt(abar') x0_avg + sqrt(1 - abar') eps_avg. With eps re-derived from x0 at each point
(as there), sqrt(abar') x0_n + sqrt(1 - abar') eps_n equals x_t' itself, so that average returns
x_t' unchanged: the correction costs a network evaluation and does nothing (tests show it). Their
loop also takes a last corrected move from t = 0 by evaluating the network at t = -1, a level it
never saw in training; we stop at the t = 0 estimate.

The authors' sampler is also available, as `authors_sample` (config.sparse.sampler = "authors"):
their moves as they compute them, the no-op corrections included, and their ending. Their levels
walk downwards to 0 and then to -1; each move t -> t' (t' > 0) is DDIM from the clipped x0
estimate plus their correction (a second evaluation at t'); the move to t' = 0 is plain DDIM; the
last move 0 -> -1 reads abar_prev = 1 but indexes the noise tables (and the time embedding) at
-1, i.e. at T - 1, so it returns (D(x_0, 0) + D(D(x_0, 0), -1)) / 2, the average of two clipped
x0 estimates. 2 f_steps + 1 network evaluations (11 for f_steps = 5), 4 of them spent on
corrections that change nothing. Their level sets come from a truncated arange,
floor(-1 + k T / f_steps) with the first set to 0 (`sparse_timesteps(..., rule="arange")`): the
same as ours when f_steps divides T, otherwise one lower (f_steps = 3: {0, 332, 665, 999} against
{0, 333, 666, 999}); for some f_steps (19, 38, 61, ...) the top level is 998.

With the exact denoiser of Gaussian data of unit variance, 5 levels reproduce the variance within
3% (plain DDIM: 32% short); with few levels, a deterministic sampler's output of data with small
variance tends towards the posterior mean (for enhancement, the MMSE estimate).

Velocity-space supervision of an x0-predicting network: with the true noise eps,
  v = sqrt(abar) eps - sqrt(1 - abar) x0,   v_hat = sqrt(abar) eps - sqrt(1 - abar) x0_hat,
  ||v - v_hat||^2 = (1 - abar_t) ||x0 - x0_hat||^2,
an x0 loss weighted by the noise variance (nearly no weight at t = 0, full weight at t = T - 1).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol.diffusion import gaussian


LEVEL_RULES = ("linspace", "arange")
SAMPLERS = ("jaxvol", "authors")


def sparse_timesteps(num_steps: int, f_steps: int, rule: str = "linspace") -> np.ndarray:
  """The f_steps + 1 uniformly spaced training/sampling levels, ascending, from 0 to about T - 1.

  rule "linspace" (ours): floor(linspace(0, T - 1, f_steps + 1)).
  rule "arange" (the authors' sampler): the float64 arange(-1, T, T / f_steps) truncated to ints,
    its first entry set to 0. (Their training draws from the float32 torch.arange of the same
    numbers, which rounds the top level to 999 where float64 gives 998, e.g. f_steps = 19:
    `training_timesteps`.)
  """
  if not 1 <= f_steps <= num_steps - 1:
    raise ValueError(f"f_steps must be in [1, {num_steps - 1}], got {f_steps}")
  if rule == "linspace":
    return np.floor(np.linspace(0, num_steps - 1, f_steps + 1) + 1e-9).astype(np.int32)
  if rule == "arange":
    ts = np.arange(-1, num_steps, num_steps / f_steps)
    ts[0] = 0
    ts = ts.astype(np.int64)  # truncation toward zero, as numpy's astype(int)
    if ts.size != f_steps + 1 or len(set(ts.tolist())) != ts.size:
      raise ValueError(f"the arange rule gives no {f_steps + 1} distinct levels for T={num_steps}")
    return ts.astype(np.int32)
  raise ValueError(f"unknown level rule {rule!r}: use one of {LEVEL_RULES}")


def training_timesteps(num_steps: int, f_steps: int, rule: str = "linspace") -> np.ndarray:
  """The levels training draws t from: `sparse_timesteps`, except that the authors' rule
  ("arange") trains on their training set, the same numbers computed as their sampler
  (resample.py `sample_fast`) computes them: torch.arange in float32, its first entry set to 0,
  truncated. It differs from their sampler's float64 set at the top level for some f_steps
  (f_steps = 19: 999 against 998)."""
  if rule != "arange":
    return sparse_timesteps(num_steps, f_steps, rule)
  sparse_timesteps(num_steps, f_steps, rule)  # the same checks
  ts = np.arange(-1, num_steps, num_steps / f_steps).astype(np.float32)
  ts[0] = 0
  return np.minimum(ts.astype(np.int64), num_steps - 1).astype(np.int32)


def check_timesteps(timesteps: Sequence[int], num_steps: int) -> np.ndarray:
  """Validates an explicit level set: unique ints in [0, T), returned ascending."""
  ts = np.asarray(sorted(int(t) for t in timesteps), np.int32)
  if ts.size < 2 or len(set(ts.tolist())) != ts.size or ts[0] < 0 or ts[-1] >= num_steps:
    raise ValueError(f"timesteps must be >= 2 distinct ints in [0, {num_steps}), got {timesteps!r}")
  return ts


def velocity_loss(diffusion: gaussian.GaussianDiffusion, x0_hat, x0, eps, t):
  """Mean of (v_hat - v)^2 with v_hat built from the x0 estimate and the true noise."""
  a = gaussian._bcast(diffusion.abar(t), x0)  # pylint: disable=protected-access
  s1 = jnp.sqrt(1.0 - a)
  v = jnp.sqrt(a) * eps - s1 * x0
  v_hat = jnp.sqrt(a) * eps - s1 * x0_hat
  return jnp.mean(jnp.square(v_hat - v))


def _authors_moves(timesteps: Sequence[int]) -> list[tuple[int, int]]:
  """The authors' (t, t') pairs: the levels downwards, then lowest -> -1."""
  ts = sorted((int(t) for t in timesteps), reverse=True)
  return list(zip(ts, ts[1:] + [-1]))


def nfe(timesteps: Sequence[int], heun: bool = True, final_denoise: bool = False,
        sampler: str = "jaxvol") -> int:
  """Network evaluations of `heun_ddim_sample` (or `authors_sample`) over a level set."""
  if sampler == "authors":
    return sum(1 if t_next == 0 else 2 for _, t_next in _authors_moves(timesteps))
  if sampler != "jaxvol":
    raise ValueError(f"unknown sparse sampler {sampler!r}: use one of {SAMPLERS}")
  moves = len(timesteps) - 1
  return moves + (moves - 1 if heun else 0) + int(final_denoise)


def heun_ddim_sample(diffusion: gaussian.GaussianDiffusion, denoise_fn: Callable, x_T,
                     timesteps: Sequence[int], heun: bool = True, clip_x0: float | None = None,
                     final_denoise: bool = False):
  """Deterministic DDIM over a sparse level set with Heun correction, as one compiled loop.

  Args:
    diffusion: the DDPM whose abar the levels index.
    denoise_fn: (x_t, t: int32 (B,)) -> raw network output (read via diffusion.split_output).
    x_T: starting noise (B, ...), taken as the sample at the highest level.
    timesteps: the level set (any order; walked from the highest to 0's level).
    heun: apply the Heun correction on every move except the one to the lowest level.
    clip_x0: optional clip of the x0 estimates to [-c, c] (eps re-derived from the clipped x0).
    final_denoise: end with the network's x0 estimate at the lowest level (one more evaluation);
      False returns the sample reached at the lowest level itself.

  Returns:
    The sample at the lowest level (or the x0 estimate there with final_denoise).
  """
  ts = np.sort(np.asarray(timesteps, np.int32))[::-1]
  batch = x_T.shape[0]
  abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)

  def predict(x, t):
    tv = jnp.full((batch,), t, jnp.int32)
    x0, eps = diffusion.split_output(denoise_fn(x, tv), x, tv)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      eps = (x - jnp.sqrt(abar[t]) * x0) / jnp.sqrt(1.0 - abar[t])
    return x0, eps

  def move(x0, eps, t_next):
    return jnp.sqrt(abar[t_next]) * x0 + jnp.sqrt(1.0 - abar[t_next]) * eps

  def corrected_step(x, pair):
    t, t_next = pair[0], pair[1]
    x0, eps = predict(x, t)
    x_next = move(x0, eps, t_next)
    if heun:
      _, eps_n = predict(x_next, t_next)
      eps_avg = 0.5 * (eps + eps_n)
      x0_avg = (x - jnp.sqrt(1.0 - abar[t]) * eps_avg) / jnp.sqrt(abar[t])
      x_next = move(x0_avg, eps_avg, t_next)
    return x_next, None

  pairs = np.stack([ts[:-1], ts[1:]], axis=1)
  x, _ = jax.lax.scan(corrected_step, x_T, jnp.asarray(pairs[:-1]))
  x0, eps = predict(x, int(pairs[-1, 0]))
  x = move(x0, eps, int(pairs[-1, 1]))
  if not final_denoise:
    return x
  x0, _ = predict(x, int(ts[-1]))
  return x0


def authors_sample(diffusion: gaussian.GaussianDiffusion, denoise_fn: Callable, x_T,
                   timesteps: Sequence[int], clip_x0: float | None = 1.0):
  """The authors' sampler (their `ddim_sample_loop` with `heun_ddim_sample`), as one compiled loop.

  For each (t, t') of the levels downwards followed by (lowest, -1), with abar' = abar[t'] (1 for
  t' = -1) and x0 estimates clipped to [-clip_x0, clip_x0]:
    x0, eps = D(x, t), (x / sqrt(abar_t) - x0) / sqrt(1 / abar_t - 1)
    x'      = sqrt(abar') x0 + sqrt(1 - abar') eps                       (DDIM, eta 0)
  and, unless t' = 0, their correction: x0', eps' = D(x', t') the same way (the tables read at
  index t', so at T - 1 for t' = -1), then
    x'      = sqrt(abar') (x0 + x0') / 2 + sqrt(1 - abar') (eps + eps') / 2.
  On a move to t' > 0 the correction returns x' itself up to rounding (the network is evaluated
  anyway, as theirs is); the last move returns (x0 + x0') / 2. `nfe(..., sampler="authors")`
  evaluations in all.

  Args:
    diffusion: the DDPM whose abar the levels index.
    denoise_fn: (x_t, t: int32 (B,)) -> raw network output (read via diffusion.split_output); it
      is also called with t = -1.
    x_T: the starting noise (B, ...).
    timesteps: the level set (any order).
    clip_x0: clip bound of the x0 estimates (theirs: 1); None for no clipping.

  Returns:
    The sample (B, ...).
  """
  moves = _authors_moves(timesteps)
  num = diffusion.num_steps
  if min(t for t, _ in moves) < 0 or max(t for t, _ in moves) >= num:
    raise ValueError(f"timesteps must lie in [0, {num}), got {list(timesteps)!r}")
  # Their tables are float64, cast to float32 when read.
  ac = np.asarray(diffusion.alphas_cumprod, np.float64)
  abar = jnp.asarray(ac, jnp.float32)
  recip = jnp.asarray(np.sqrt(1.0 / ac), jnp.float32)
  recipm1 = jnp.asarray(np.sqrt(1.0 / ac - 1.0), jnp.float32)
  batch = x_T.shape[0]

  def predict(x, t):
    tv = jnp.full((batch,), t, jnp.int32)
    x0, _ = diffusion.split_output(denoise_fn(x, tv), x, tv)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    i = jnp.mod(t, num)  # t = -1 reads the last entry, as their tables indexed with -1 do
    return x0, (recip[i] * x - x0) / recipm1[i]

  def move(x, t, t_next, a_next, corrected):
    x0, eps = predict(x, t)
    sa, s1 = jnp.sqrt(a_next), jnp.sqrt(1.0 - a_next)
    x_next = x0 * sa + s1 * eps
    if not corrected:
      return x_next
    x0_n, eps_n = predict(x_next, t_next)
    return 0.5 * (x0 + x0_n) * sa + s1 * (0.5 * (eps + eps_n))

  inner = jnp.asarray([m for m in moves if m[1] > 0], jnp.int32).reshape(-1, 2)
  x = x_T
  if inner.shape[0]:
    x, _ = jax.lax.scan(lambda x, p: (move(x, p[0], p[1], abar[p[1]], True), None), x, inner)
  for t, t_next in moves:
    if t_next == 0:
      x = move(x, t, t_next, abar[0], False)
    elif t_next < 0:
      x = move(x, t, t_next, jnp.float32(1.0), True)
  return x
