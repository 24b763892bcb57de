"""Regression in PPDM's puzzled domain: PPDM's network and loss without the bridge.

The control that isolates what PPDM's diffusion adds ("PPDM: Pixel Puzzling Diffusion Model for
Speed and Memory Efficient Volumetric Medical Image Translation", 2026): the same U-Net at 1/r of
the resolution per axis with r^3 times the channels at its ends, the same loss (L1 or L2 on the
puzzled prediction plus config.ppdm.grad_loss_weight times the puzzle-gradient loss), the same
memory and cost per pass, but one pass from puzzle(y) to puzzle(x0) at time 0 instead of a
Brownian bridge from y. Its input lacks PPDM's puzzle(x_t) channels, so only the first
convolution is smaller.
"""

import jax.numpy as jnp

from jaxvol.methods import base
from jaxvol.ops import gradients
from jaxvol.ops import puzzle as puzzle_lib


class PuzzleRegression(base.Method):

  # The puzzle factor sets the network's channels; no diffusion fields, no STM.
  MODEL_FIELDS = base.Method.MODEL_FIELDS + base.UNET_FIELDS + ("ppdm.factor",)
  RESIDUAL = True  # as PPDM's

  def __post_init__(self):
    c = self.config.ppdm
    self.factor = puzzle_lib.as_factor(c.factor if isinstance(c.factor, int) else tuple(c.factor))
    n = self.factor[0] * self.factor[1] * self.factor[2]
    self.net = base.build_unet(self.config.model, self.target_channels * n, self.dtype)

  def spatial_multiple(self):
    d = self.net.divisor
    return tuple(r * d for r in self.factor)

  def _apply(self, params, y, train=False, rng=None):
    t = jnp.zeros((y.shape[0],), jnp.int32)
    yp = puzzle_lib.puzzle(y, self.factor)
    out = self.net.apply(params, yp, t, train=train, rngs={"dropout": rng} if train else None)
    if self.residual:  # the puzzled first input (its channels interleave with the others' in yp)
      out = base.add_input(out, puzzle_lib.puzzle(y[..., :self.target_channels], self.factor))
    return out

  def init(self, rng, batch):
    y = batch["cond"]
    return self.net.init(rng, puzzle_lib.puzzle(y, self.factor),
                         jnp.zeros((y.shape[0],), jnp.int32))

  def loss(self, params, batch, rng):
    x0, c = batch["target"], self.config.ppdm
    pred_p = self._apply(params, batch["cond"], train=True, rng=rng)
    main = base.regression_loss(pred_p, puzzle_lib.puzzle(x0, self.factor), c.loss)
    grad = gradients.gradient_l1(puzzle_lib.unpuzzle(pred_p, self.factor, x0.shape[1:4]), x0)
    return main + c.grad_loss_weight * grad, {"loss_main": main, "loss_puzzle_grad": grad}

  def sample(self, params, cond, rng):
    del rng
    y, shape = base.pad_spatial(cond, self.spatial_multiple())
    net = lambda yw: puzzle_lib.unpuzzle(self._apply(params, yw), self.factor)
    return base.crop_spatial(self.windowed(net, (y,)), shape)
