"""Train state as a plain pytree and the optimizer.

state = {"step", "params", "ema_params", "opt_state"}; shapes come from `jax.eval_shape`, and the
real state is created already placed with its shardings by a jitted init.
"""

import jax
import jax.numpy as jnp
import optax


def _schedule(train_cfg, scale: float = 1.0):
  """Linear warm-up from 0 over warmup_steps (none when <= 0), then train.lr_schedule:
  "constant", or "cosine" decay to train.lr_final x the rate at train.steps (a run stopped
  earlier by its time limit ends before the decay does: set train.steps to what the time fits)."""
  lr = train_cfg.learning_rate * scale
  kind = str(train_cfg.get("lr_schedule", "constant"))
  warmup = max(int(train_cfg.warmup_steps), 0)
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, max(int(train_cfg.steps) - warmup, 1),
                                        alpha=float(train_cfg.get("lr_final", 0.0)))
  else:
    raise ValueError(f"config.train.lr_schedule must be constant or cosine, got {kind!r}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _clip(train_cfg) -> optax.GradientTransformation:
  """Global-norm clipping at grad_clip; grad_clip <= 0 (the sparse authors' recipe): none."""
  if train_cfg.grad_clip <= 0:
    return optax.identity()
  return optax.clip_by_global_norm(train_cfg.grad_clip)


def make_optimizer(train_cfg, labels=None, lr_scales=None) -> optax.GradientTransformation:
  """AdamW with linear warm-up to a constant rate, after global-norm clipping (each optional).

  Args:
    train_cfg: config.train (learning_rate, warmup_steps, weight_decay, grad_clip).
    labels: None (one AdamW for every parameter), or a pytree like the parameters of labels
      from jaxvol.train.transfer: "frozen" leaves get zero updates and no optimizer state, every
      other label its own AdamW at lr_scales[label] times the learning rate.
    lr_scales: label -> learning-rate factor, for every label but "frozen".

  Returns:
    The optax transformation.
  """
  if labels is None:
    return optax.chain(_clip(train_cfg),
                       optax.adamw(_schedule(train_cfg), weight_decay=train_cfg.weight_decay))
  lr_scales = dict(lr_scales or {})
  transforms = {"frozen": optax.set_to_zero()}
  for label in set(jax.tree.leaves(labels)) - {"frozen"}:
    transforms[label] = optax.adamw(_schedule(train_cfg, lr_scales.get(label, 1.0)),
                                    weight_decay=train_cfg.weight_decay)
  # Clipping sees every gradient (the frozen ones are zero), as without labels.
  return optax.chain(_clip(train_cfg), optax.multi_transform(transforms, labels))


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


def create_state(method, optimizer, rng, example_batch, sharding):
  """Initialises the state directly into `sharding` (a sharding or a pytree of them)."""
  return jax.jit(init_fn(method, optimizer, example_batch), out_shardings=sharding)(rng)


def state_shapes(method, optimizer, example_batch):
  return jax.eval_shape(init_fn(method, optimizer, example_batch), jax.random.PRNGKey(0))
