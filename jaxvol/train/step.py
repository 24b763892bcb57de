"""The jitted train step: (state, batch, rng) -> (state, metrics), with explicit shardings.

rng for a step is fold_in(rng, step), so a resumed run draws exactly what an uninterrupted run
would. A non-finite loss or gradient leaves the state unchanged and is reported in the metrics
(`finite` = 0); the loop stops on it before any checkpoint is written.
"""

import jax
import jax.numpy as jnp
import optax


def ema_decay_at(step, decay: float):
  """EMA decay warmed up as (1 + step) / (10 + step), so short runs are not dominated by init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(method, optimizer, ema_decay: float, frozen=None):
  """The step function (not jitted).

  Args:
    method: the method (its `loss_at`: `loss` with the step, for losses that change with it).
    optimizer: the optax transformation.
    ema_decay: the EMA decay (warmed up, see `ema_decay_at`).
    frozen: None, or a pytree of Python bools like the parameters (jaxvol.train.transfer): those
      leaves are passed through unchanged, parameters and EMA alike, so they stay bit-identical
      (an EMA of a constant, d e + (1 - d) p with e = p, can move by rounding).
  """

  def hold(new, old):
    if frozen is None:
      return new
    return jax.tree.map(lambda f, a, b: b if f else a, frozen, new, old)

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state["step"])
    loss_fn = lambda params: method.loss_at(params, batch, rng, state["step"])
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = hold(optax.apply_updates(state["params"], updates), state["params"])
    d = ema_decay_at(state["step"], ema_decay)
    ema = hold(jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema_params"], params),
               state["ema_params"])
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "ema_params": keep(ema, state["ema_params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
               "finite": finite.astype(jnp.float32), **aux}
    return new_state, metrics

  return train_step


def jit_train_step(step_fn, state_sharding, batch_sharding, replicated):
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
