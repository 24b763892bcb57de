"""Train state as a plain pytree and the optimizer.

state = {"step", "params", "ema_params", "opt_state"}; shapes come from `jax.eval_shape`, and the
real state is created already placed with its shardings by a jitted init.
"""

import jax
import jax.numpy as jnp
import optax


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate, after global-norm clipping."""
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, train_cfg.learning_rate, max(1, train_cfg.warmup_steps)),
       optax.constant_schedule(train_cfg.learning_rate)], [max(1, train_cfg.warmup_steps)])
  return optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=train_cfg.weight_decay))


def init_fn(method, optimizer, example_batch):
  """Returns rng -> state; used both with eval_shape (abstract) and jit (real)."""

  def init(rng):
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_batch)
    params = method.init(rng, batch)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema_params": jax.tree.map(jnp.copy, params),
        "opt_state": optimizer.init(params),
    }

  return init


def abstract_batch(method, batch_size: int, crop_size) -> dict:
  spatial = tuple(int(s) for s in crop_size)
  return {
      "cond": jax.ShapeDtypeStruct((batch_size,) + spatial + (method.cond_channels,), jnp.float32),
      "target": jax.ShapeDtypeStruct((batch_size,) + spatial + (method.target_channels,), jnp.float32),
  }


def create_state(method, optimizer, rng, example_batch, sharding):
  """Initialises the state directly into `sharding` (a sharding or a pytree of them)."""
  return jax.jit(init_fn(method, optimizer, example_batch), out_shardings=sharding)(rng)


def state_shapes(method, optimizer, example_batch):
  return jax.eval_shape(init_fn(method, optimizer, example_batch), jax.random.PRNGKey(0))
