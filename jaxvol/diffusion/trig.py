"""PRDiT's trigonometric image-and-noise diffusion: forward process, loss and compiled samplers.

From "Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026),
checked against the authors' code (Fredy-Zhang/PRDiT, diffusion/ian_diffusion.py; the parity test
is tests/test_authors_parity.py). With the angle theta(t) = pi t / 2T (T = 1000, t in [0, T),
integer in training),
  x_t = cos(theta) x0 + sin(theta) eps,   eps ~ N(0, sigma^2),   sigma = 0.5,
the noise being half as wide as the data range [-1, 1]. The network predicts both eps and x0 (the
local denoiser and residual DiT output one block of each per token) and is trained with
MSE(x0) + MSE(eps), each a mean over voxels.

Samplers (the authors'), each one `lax.scan` over K = num_sample_steps network evaluations, K a
divisor of T. The grid is theirs: the timesteps t_k = T - (k + 1) T/K, k = 0..K-1 (990, 980, ...,
0 for K = 100), the starting noise being taken as the sample at t_0 = T - T/K; the last
evaluation is at t = 0 and its move has length zero, so it only reads x0_hat off the finished
sample. Both the final state and that x0_hat come back (`sample_with_estimate`); the authors save
both.
- Euler (their default, with K = 1000) on the probability-flow ODE in the angle:
  x = cos(th) x0 + sin(th) eps gives dx/dth = -sin(th) x0 + cos(th) eps, evaluated with the
  network's (x0_hat, eps_hat), one grid step per evaluation.
- Predictor-corrector ("--new" in their sample.py; K = 100 is the fast setting): from t_k an Euler
  predictor jumps two grid steps down, to t_k - 2T/K, then fresh noise lifts it one step back up
  to t_{k+1}: x = alpha x' + sigma sqrt(1 - alpha^2) z with alpha = cos(theta_{k+1}) /
  cos(theta_jump). Where the jump would reach t <= 0 (the last two moves) the step is a plain
  Euler step. Why that noise: if x' = cos(a) x0 + sin(a) eps, then alpha x' = cos(b) x0 +
  alpha sin(a) eps, and reaching x = cos(b) x0 + sin(b) eps' with eps' ~ N(0, sigma^2) needs extra
  noise of variance sigma^2 (sin^2 b - alpha^2 sin^2 a) = sigma^2 (1 - alpha^2) since
  alpha cos(a) = cos(b). As an option (ours) the predictor can instead be a DDIM-like jump
  x' = cos(a) x0_hat + sin(a) eps_hat ("ddim").
Noise of step k is drawn from `fold_in(rng, k)`; `noise=` takes the draws instead (used to check
the arithmetic against the authors' sampler with their own draws).

`GaussianDenoiser` is the exact posterior-mean denoiser of data ~ N(m, s^2) (per element), so the
samplers can be checked against a known distribution without a trained network.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# denoise(x_t, t) -> (eps_hat, x0_hat) for a (B,) float array of timesteps in [0, T).
Denoiser = Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _bcast(v, x):
  """Broadcasts a per-example (B,) vector against a (B, ...) array."""
  v = jnp.asarray(v)
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class TrigDiffusion:
  """x_t = cos(pi t / 2T) x0 + sin(pi t / 2T) eps with eps ~ N(0, sigma^2)."""

  num_steps: int = 1000  # T
  sigma: float = 0.5  # noise standard deviation

  def __post_init__(self):
    if self.num_steps < 2 or self.sigma <= 0:
      raise ValueError(f"need T >= 2 and sigma > 0, got T={self.num_steps}, sigma={self.sigma}")

  def angle(self, t):
    """theta(t) = pi t / 2T for timesteps (integer or real) in [0, T)."""
    return jnp.asarray(t, jnp.float32) * (0.5 * math.pi / self.num_steps)

  def noise(self, rng, shape, dtype=jnp.float32):
    """eps ~ N(0, sigma^2); also the starting point of the samplers."""
    return self.sigma * jax.random.normal(rng, shape, dtype)

  def sample_timesteps(self, rng, batch: int):
    """Training timesteps, uniform integers in [0, T)."""
    return jax.random.randint(rng, (batch,), 0, self.num_steps)

  def q_sample(self, x0, t, eps):
    theta = _bcast(self.angle(t), x0)
    return jnp.cos(theta) * x0 + jnp.sin(theta) * eps

  def loss(self, eps_hat, x0_hat, x0, eps):
    """MSE(x0) + MSE(eps), both means over all voxels; returns (loss, per-term metrics)."""
    x0_mse = jnp.mean(jnp.square(x0_hat.astype(jnp.float32) - x0))
    eps_mse = jnp.mean(jnp.square(eps_hat.astype(jnp.float32) - eps))
    return x0_mse + eps_mse, {"x0_mse": x0_mse, "eps_mse": eps_mse}

  def training_loss(self, denoise_fn: Denoiser, x0, rng):
    """Draws t and eps, noises x0 and scores denoise_fn's (eps_hat, x0_hat) with `loss`."""
    rng_t, rng_eps = jax.random.split(rng)
    t = self.sample_timesteps(rng_t, x0.shape[0])
    eps = self.noise(rng_eps, x0.shape, x0.dtype)
    eps_hat, x0_hat = denoise_fn(self.q_sample(x0, t, eps), t.astype(jnp.float32))
    return self.loss(eps_hat, x0_hat, x0, eps)

  def sample_schedule(self, num_sample_steps: int, sampler: str = "euler") -> dict[str, np.ndarray]:
    """Per-step arrays of the authors' sampling grid (see the module docstring), K entries each.

    Keys: t (the timestep the network sees), theta (its angle), target (the angle the move
    jumps to), alpha (the re-noising factor; 1 where no noise is added) and noise_std (sigma
    sqrt(1 - alpha^2); 0 where no noise is added). With sampler "euler" every move goes one grid
    step down; with "pc" a move jumps two steps down and is re-noised one step back up whenever
    the jump target is above t = 0.
    """
    k = int(num_sample_steps)
    if not 1 <= k <= self.num_steps or self.num_steps % k:
      raise ValueError(f"num_sample_steps must divide T = {self.num_steps} (the authors' grid "
                       f"range(0, T, T // K) has K points only then), got {num_sample_steps}")
    if sampler not in ("euler", "pc"):
      raise ValueError(f"unknown sampler {sampler!r}: use euler or pc")
    skip = self.num_steps // k
    t = np.arange(self.num_steps - skip, -1, -skip, dtype=np.float64)  # T - skip, ..., 0
    t_next = np.append(t[1:], 0.0)
    noisy = (t - 2 * skip > 0) if sampler == "pc" else np.zeros(k, bool)
    scale = 0.5 * math.pi / self.num_steps
    target = np.where(noisy, t - 2 * skip, t_next) * scale
    alpha = np.where(noisy, np.cos(t_next * scale) / np.cos(target), 1.0)
    noise_std = self.sigma * np.sqrt(np.clip(1.0 - alpha**2, 0.0, None))
    return {"t": t, "theta": t * scale, "target": target, "alpha": alpha, "noise_std": noise_std}

  def sample_with_estimate(self, denoise_fn: Denoiser, x_init, num_sample_steps: int,
                           sampler: str = "euler", rng=None, predictor: str = "euler",
                           noise=None):
    """Runs a sampler; returns (x, x0_hat): the final state and the last network estimate of x0.

    Args:
      denoise_fn: (x_t, t) -> (eps_hat, x0_hat).
      x_init: starting noise (B, ...) ~ N(0, sigma^2), taken as the sample at the first grid
        timestep T - T/K (as the authors do).
      num_sample_steps: K, the number of network evaluations; must divide T.
      sampler: "euler" (the authors' default, deterministic) or "pc" (predictor-corrector).
      rng: key of the pc sampler's noise: step k draws from fold_in(rng, k).
      predictor: the pc sampler's jump, "euler" (as the authors) or "ddim" (x' = cos(a) x0_hat +
        sin(a) eps_hat at the target angle a).
      noise: instead of rng, the standard-normal draws themselves, (K,) + x_init.shape; row k is
        read on the steps that re-noise (for checks against another implementation).

    Returns:
      (x, x0_hat), both shaped like x_init. The last evaluation is at t = 0, where x0_hat is the
      network's reading of the finished sample.
    """
    if predictor not in ("ddim", "euler"):
      raise ValueError(f"unknown predictor {predictor!r}: use ddim or euler")
    sched = self.sample_schedule(num_sample_steps, sampler)
    noisy = bool(np.any(sched["noise_std"] > 0))
    if noisy and rng is None and noise is None:
      raise ValueError("the predictor-corrector sampler needs an rng (or explicit noise)")
    if noise is not None and tuple(noise.shape) != (num_sample_steps,) + tuple(x_init.shape):
      raise ValueError(f"noise must be shaped {(num_sample_steps,) + tuple(x_init.shape)}, got "
                       f"{tuple(noise.shape)}")
    xs = {k: jnp.asarray(v, jnp.float32) for k, v in sched.items()}
    xs["k"] = jnp.arange(num_sample_steps)
    if noise is not None:
      xs["z"] = jnp.asarray(noise, x_init.dtype)
    ddim = predictor == "ddim"

    def step(carry, inp):
      x, _ = carry
      t = jnp.full((x.shape[0],), inp["t"], jnp.float32)
      eps_hat, x0_hat = denoise_fn(x, t)
      eps_hat, x0_hat = eps_hat.astype(x.dtype), x0_hat.astype(x.dtype)
      theta, target = inp["theta"], inp["target"]
      if ddim:
        x_jump = jnp.cos(target) * x0_hat + jnp.sin(target) * eps_hat
      else:  # dx/dtheta = -sin(theta) x0 + cos(theta) eps
        velocity = jnp.cos(theta) * eps_hat - jnp.sin(theta) * x0_hat
        x_jump = x + (target - theta).astype(x.dtype) * velocity
      if noisy:
        z = inp["z"] if noise is not None else jax.random.normal(
            jax.random.fold_in(rng, inp["k"]), x.shape, x.dtype)
        x_jump = inp["alpha"] * x_jump + inp["noise_std"] * z
      return (x_jump, x0_hat), None

    (x, x0_hat), _ = jax.lax.scan(step, (x_init, jnp.zeros_like(x_init)), xs)
    return x, x0_hat

  def sample(self, denoise_fn: Denoiser, x_init, num_sample_steps: int, sampler: str = "euler",
             rng=None, predictor: str = "euler", output: str = "x0", noise=None):
    """One sample: the last network estimate x0_hat ("x0") or the final state ("x").

    See `sample_with_estimate` for the arguments; the authors save both.
    """
    if output not in ("x0", "x"):
      raise ValueError(f"unknown sample output {output!r}: use x0 or x")
    x, x0_hat = self.sample_with_estimate(denoise_fn, x_init, num_sample_steps, sampler, rng,
                                          predictor, noise)
    return x0_hat if output == "x0" else x


@dataclasses.dataclass(frozen=True)
class GaussianDenoiser:
  """Exact denoiser of data ~ N(mean, std^2) per element: the posterior means of x0 and eps.

  With c = cos(theta), s = sin(theta) and v = c^2 std^2 + s^2 sigma^2 (the variance of x_t),
  E[x0 | x_t] = mean + c std^2 / v (x_t - c mean) and E[eps | x_t] = s sigma^2 / v (x_t - c mean);
  c E[x0] + s E[eps] = x_t, as for any consistent pair.
  """

  diffusion: TrigDiffusion
  mean: float = 0.0
  std: float = 1.0

  def __call__(self, x, t):
    theta = _bcast(self.diffusion.angle(t), x)
    c, s = jnp.cos(theta), jnp.sin(theta)
    var = c**2 * self.std**2 + s**2 * self.diffusion.sigma**2
    r = x - c * self.mean
    return s * self.diffusion.sigma**2 / var * r, self.mean + c * self.std**2 / var * r
