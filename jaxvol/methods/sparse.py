"""Sparse voxel-space diffusion with STM for 3D enhancement (denoising, super-resolution).

"Structure-adaptive sparse diffusion for 3D medical image enhancement" (MICCAI 2026). The
full-resolution conditional DDPM of `baselines.Full3D` (the condition concatenated to x_t, the same
U-Net), trained only on the few levels of jaxvol.diffusion.sparse and sampled over them with
Heun-corrected deterministic DDIM (about 2 f_steps network evaluations per volume). The network
predicts x0 and is supervised in velocity space ((1 - abar_t)-weighted x0 error); eps and v
prediction (plain MSE on their own targets) are kept for ablation. STM (config.model.stm) feeds the
condition to a structure encoder whose code modulates every ResBlock's time embedding.

The authors' choices are options: config.model.layout = "authors" (their network,
jaxvol.models.unet3d), config.sparse.levels = "arange" (their level sets) and
config.sparse.sampler = "authors" (their sampler with its averaged t = -1 ending,
jaxvol.diffusion.sparse.authors_sample; 2 f_steps + 1 evaluations, which `nfe` reports).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxvol.diffusion import sparse as sparse_lib
from jaxvol.methods import base
from jaxvol.methods import baselines


class Sparse(baselines.Full3D):

  # Full3D's, and the level set the network is trained on (and sampled over): explicit
  # `sparse.timesteps`, or f_steps and the level rule when none are given.
  MODEL_FIELDS = baselines.Full3D.MODEL_FIELDS + (
      "sparse.timesteps", "sparse.f_steps", "sparse.levels")
  SWITCHED_FIELDS = {**baselines.Full3D.SWITCHED_FIELDS,
                     "sparse.f_steps": lambda c: not c.sparse.timesteps,
                     "sparse.levels": lambda c: not c.sparse.timesteps}
  OBJECTIVES = ("diffusion",)  # its sparse levels are a Gaussian schedule's
  # x0 prediction supervised in velocity space (jaxvol.diffusion.sparse), STM on.
  CONFIG_DEFAULTS = {"diffusion.parameterization": "x0", "model.stm": True}

  def __post_init__(self):
    super().__post_init__()
    c = self.config.sparse
    self.sampler = c.get("sampler", "jaxvol")
    if self.sampler not in sparse_lib.SAMPLERS:
      raise ValueError(f"unknown config.sparse.sampler {self.sampler!r}: use one of "
                       f"{sparse_lib.SAMPLERS}")
    if c.timesteps:
      self.timesteps = sparse_lib.check_timesteps(c.timesteps, self.diffusion.num_steps)
      self.train_timesteps = self.timesteps
    else:
      rule = c.get("levels", "linspace")
      self.timesteps = sparse_lib.sparse_timesteps(self.diffusion.num_steps, c.f_steps, rule)
      # The authors' rule trains on their float32 level set (jaxvol.diffusion.sparse).
      self.train_timesteps = sparse_lib.training_timesteps(self.diffusion.num_steps, c.f_steps,
                                                           rule)

  @property
  def nfe(self) -> int:
    """Network evaluations per sampled volume (per window when sampling in windows)."""
    c = self.config.sparse
    return sparse_lib.nfe(self.timesteps, c.heun, c.get("final_denoise", False), self.sampler)

  def loss(self, params, batch, rng):
    x0, y = batch["target"], batch["cond"]
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    idx = jax.random.randint(k_t, (x0.shape[0],), 0, len(self.train_timesteps))
    t = jnp.asarray(self.train_timesteps)[idx]
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    out = self._apply(params, self.diffusion.q_sample(x0, t, eps), y, t, train=True, rng=k_drop)
    if self.diffusion.parameterization == "x0":
      loss = sparse_lib.velocity_loss(self.diffusion, out, x0, eps, t)
      return loss, {"x0_mse": jnp.mean(jnp.square(out - x0))}
    loss = jnp.mean(jnp.square(out - self.diffusion.target(x0, eps, t)))
    return loss, {}

  def sample(self, params, cond, rng):
    c = self.config.diffusion
    y, shape, zy, z_T, _ = self._prepare(cond, rng)
    clip = c.clip_x0 if c.clip_x0 > 0 else None
    if self.sampler == "authors":
      x0 = sparse_lib.authors_sample(self.diffusion, self._denoiser(params, zy), z_T,
                                     np.asarray(self.timesteps), clip_x0=clip)
      return base.crop_spatial(x0, shape)
    x0 = sparse_lib.heun_ddim_sample(self.diffusion, self._denoiser(params, zy), z_T,
                                     np.asarray(self.timesteps), heun=self.config.sparse.heun,
                                     clip_x0=clip,
                                     final_denoise=self.config.sparse.get("final_denoise", False))
    return base.crop_spatial(x0, shape)
