"""PPDM: pixel-puzzling Brownian-bridge diffusion for volumetric image translation.

"PPDM: Pixel Puzzling Diffusion Model for Speed and Memory Efficient Volumetric Medical Image
Translation" (2026). The network runs entirely in the puzzled domain: input = puzzle(x_t) with
puzzle(y) concatenated, output = puzzle(x0 estimate), with the same U-Net as the full-resolution
baseline but at 1/r of the resolution per axis and r^3 times the channels at its ends. Diffusion is
a Brownian bridge that starts from the condition y (jaxvol.diffusion.bridge), sampled in K steps.
Loss (our choice where the abstract is silent): L1 (or L2) on the puzzled x0 estimate plus lambda
times the puzzle-gradient loss, an L1 between finite-difference gradients of the unpuzzled
prediction and the target, which sees the voxel pairs across puzzle-cell borders where r-periodic
seams would appear.
"""

import jax
import jax.numpy as jnp

from jaxvol.diffusion import bridge as bridge_lib
from jaxvol.methods import base
from jaxvol.models import layers
from jaxvol.ops import gradients
from jaxvol.ops import puzzle as puzzle_lib


class PPDM(base.Method):

  # The puzzle factor sets the network's channels; the bridge's T and variance fix what its time
  # input and its x_t mean. No Gaussian schedule (config.diffusion) and no STM.
  MODEL_FIELDS = base.Method.MODEL_FIELDS + base.UNET_FIELDS + (
      "ppdm.factor", "ppdm.num_steps", "ppdm.max_var")
  LOW_RESOLUTION = True  # r = 2: the network sees 1/2 of the crop per axis
  RESIDUAL = True  # puzzle(x0 estimate) = puzzle(y) + network output

  def __post_init__(self):
    c = self.config.ppdm
    self.factor = puzzle_lib.as_factor(c.factor if isinstance(c.factor, int) else tuple(c.factor))
    self.bridge = bridge_lib.BrownianBridge(num_steps=c.num_steps, max_var=c.max_var)
    n = self.factor[0] * self.factor[1] * self.factor[2]
    self.net = base.build_unet(self.config.model, self.target_channels * n, self.dtype)

  def spatial_multiple(self):
    d = self.net.divisor
    return tuple(r * d for r in self.factor)

  def _denoise(self, params, x_t, y, t, train=False, rng=None):
    """The puzzled x0 estimate."""
    inp = jnp.concatenate([puzzle_lib.puzzle(x_t, self.factor), puzzle_lib.puzzle(y, self.factor)], -1)
    rngs = {"dropout": rng} if train else None
    out = self.net.apply(params, inp, t, train=train, rngs=rngs)
    if self.residual:
      out = base.add_input(out, puzzle_lib.puzzle(self._endpoint(y), self.factor))
    return out

  def init(self, rng, batch):
    y = batch["cond"]
    t = jnp.zeros((y.shape[0],), jnp.int32)
    x = jnp.zeros(y.shape[:4] + (self.target_channels,), y.dtype)
    inp = jnp.concatenate([puzzle_lib.puzzle(x, self.factor), puzzle_lib.puzzle(y, self.factor)], -1)
    return self.net.init(rng, inp, t)

  def loss(self, params, batch, rng):
    x0, y = batch["target"], batch["cond"]
    c = self.config.ppdm
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (x0.shape[0],), 1, self.bridge.num_steps + 1)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = self.bridge.q_sample(x0, self._endpoint(y), t, eps)
    pred_p = self._denoise(params, x_t, y, t, train=True, rng=k_drop)
    main = base.regression_loss(pred_p, puzzle_lib.puzzle(x0, self.factor), c.loss)
    grad = gradients.gradient_l1(puzzle_lib.unpuzzle(pred_p, self.factor, x0.shape[1:4]), x0)
    total = main + c.grad_loss_weight * grad
    return total, {"loss_main": main, "loss_puzzle_grad": grad}

  def _endpoint(self, y):
    """The bridge's far end: the condition's first channels (extra channels only feed the network)."""
    return y[..., : self.target_channels]

  def sample(self, params, cond, rng):
    c = self.config.ppdm
    y, shape = base.pad_spatial(cond, self.spatial_multiple())

    def net(x_t, yw, t):
      return puzzle_lib.unpuzzle(self._denoise(params, x_t, yw, t), self.factor)

    def denoise(x_t, t):
      # In the volume layout of the active sharding rules (a no-op without them).
      return layers.constrain_volume(self.windowed(net, (x_t, y), (t,)))

    x0 = self.bridge.sample(denoise, self._endpoint(y), c.sample_steps, rng, eta=c.eta)
    return base.crop_spatial(x0, shape)
