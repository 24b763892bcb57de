"""Straight-line flow matching (rectified flow): training loss, reconstruction and ODE samplers.

Flow matching: Lipman et al., "Flow Matching for Generative Modeling" (ICLR 2023); the straight
path with sigma_min = 0 is rectified flow (Liu et al., "Flow Straight and Fast", ICLR 2023). The
objective of PRDiT-FM (Fredy-Zhang/PRDiT-FM, `diffusion/flow_matching.py`), whose conventions this
module follows, and of MAISI-v2's rectified flow.

Time convention (PRDiT-FM's): t in [0, 1], t = 0 is noise and t = 1 is data,

    x_t = (1 - t) x_noise + t x_data,     v = x_data - x_noise,     t ~ U(0, 1),

and the network predicts the velocity v from (x_t, t * embed_t_scale): the time is scaled (by
1000, the range the DDPM-era time embedders were made for) only where it enters the network. The
loss is the mean squared velocity error. Sampling integrates dx/dt = v(x, t) from t = 0 to 1 in
N equal steps of dt = 1/N, starting at t_i = i dt:

    euler   x <- x + dt v(x, t_i)                                       (N evaluations)
    heun    x' = x + dt v(x, t_i);  x <- x + dt (v(x, t_i) + v(x', min(t_i + dt, 1))) / 2
                                                                         (2N evaluations; the
                                                                          last step corrects too)

both compiled as one `lax.scan`. MAISI-v2 (NV-Generate-CTMR) states the same path with the time
reversed (t = 1 noise); nothing here depends on which end is called 0 beyond the embedder's input.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SOLVERS = ("euler", "heun")


def _bcast(v, x):
  """Broadcasts a per-example (B,) vector against a (B, ...) array."""
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class FlowMatching:
  """The straight path between N(0, I) noise (t = 0) and data (t = 1), one velocity head.

  `velocity_fn(x_t, model_t)` is the network: x_t (B, ...) and model_t = t * embed_t_scale (B,)
  float32; it returns a velocity shaped like x_t.
  """

  embed_t_scale: float = 1000.0

  def model_t(self, t):
    """The network's time input: t in [0, 1] times `embed_t_scale`."""
    return jnp.asarray(t, jnp.float32) * self.embed_t_scale

  def interpolate(self, x_data, x_noise, t):
    """(x_t, target velocity) at per-example times t (B,)."""
    tb = _bcast(jnp.asarray(t), x_data)
    return (1.0 - tb) * x_noise + tb * x_data, x_data - x_noise

  def training_loss(self, velocity_fn: Callable, x_data, rng, t=None, x_noise=None):
    """Mean squared velocity error at t ~ U(0, 1) (or the given t / noise); (loss, aux).

    aux holds the per-example losses ("per_example", (B,)).
    """
    k_t, k_noise = jax.random.split(rng)
    batch = x_data.shape[0]
    if t is None:
      t = jax.random.uniform(k_t, (batch,), jnp.float32)
    if x_noise is None:
      x_noise = jax.random.normal(k_noise, x_data.shape, x_data.dtype)
    x_t, target = self.interpolate(x_data, x_noise, t)
    v = velocity_fn(x_t, self.model_t(t))
    per_example = jnp.mean(jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32)),
                           axis=tuple(range(1, x_data.ndim)))
    return jnp.mean(per_example), {"per_example": per_example}

  def reconstruct(self, velocity_fn: Callable, x_data, x_noise, t_value: float = 0.5):
    """One-evaluation estimate of the data from x_t at a single time t: x_t + (1 - t) v.

    PRDiT-FM's validation of its stage-1 model (at t = 0.5). Returns (estimate, x_t).
    """
    t = jnp.full((x_data.shape[0],), t_value, jnp.float32)
    x_t, _ = self.interpolate(x_data, x_noise, t)
    v = velocity_fn(x_t, self.model_t(t))
    return x_t + (1.0 - t_value) * v, x_t

  @staticmethod
  def nfe(num_steps: int, solver: str) -> int:
    """Network evaluations of a sample."""
    check_solver(solver, num_steps)
    return num_steps * (2 if solver == "heun" else 1)

  @staticmethod
  def step_times(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(t_i, min(t_i + dt, 1)) of each step as float32, computed as PRDiT-FM does (i * dt in
    double precision, then cast)."""
    dt = 1.0 / num_steps
    i = np.arange(num_steps, dtype=np.float64)
    return (i * dt).astype(np.float32), np.minimum((i + 1) * dt, 1.0).astype(np.float32)

  def network_times(self, num_steps: int, solver: str) -> np.ndarray:
    """The network's time inputs (scaled) in the order a sample evaluates them."""
    check_solver(solver, num_steps)
    times, nexts = self.step_times(num_steps)
    seq = times if solver == "euler" else np.stack([times, nexts], 1).reshape(-1)
    return np.asarray(self.model_t(seq))

  def sample(self, velocity_fn: Callable, x_noise, num_steps: int, solver: str = "euler"):
    """Integrates dx/dt = v from x_noise at t = 0 to t = 1 (module docstring) in one scan."""
    check_solver(solver, num_steps)
    dt = 1.0 / num_steps
    times, nexts = self.step_times(num_steps)
    batch = x_noise.shape[0]

    def step(x, t_pair):
      t, t_next = t_pair
      v = velocity_fn(x, self.model_t(jnp.full((batch,), t, jnp.float32)))
      if solver == "euler":
        return (x + dt * v).astype(x.dtype), None
      x_pred = x + dt * v
      v_next = velocity_fn(x_pred, self.model_t(jnp.full((batch,), t_next, jnp.float32)))
      return (x + dt * 0.5 * (v + v_next)).astype(x.dtype), None

    x, _ = jax.lax.scan(step, x_noise, (jnp.asarray(times), jnp.asarray(nexts)))
    return x


def check_solver(solver: str, num_steps: int) -> None:
  """Clear errors for an unknown solver or a step count below 1."""
  if solver not in SOLVERS:
    raise ValueError(f"unknown flow-matching solver {solver!r}: use one of {SOLVERS}")
  if int(num_steps) < 1:
    raise ValueError(f"flow-matching sampling needs >= 1 step, got {num_steps}")
