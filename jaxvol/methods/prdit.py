"""PRDiT as a method: unconditional 3D CT generation, trained in two stages.

"Pixel-Level Residual Diffusion Transformer: Scalable 3D CT Volume Generation" (ICLR 2026). The
network (jaxvol.models.prdit) predicts (eps, x0) for every s^3 block from its overlapping p^3
token, under the trigonometric diffusion of jaxvol.diffusion.trig (x_t = cos x0 + sin eps,
eps ~ N(0, 0.5^2), loss MSE(x0) + MSE(eps)). Training is staged (`config.prdit.stage`):

- Stage 1 trains the local denoiser and the shared time MLP alone (the "local" parameters).
- Stage 2 adds the global residual DiT ("residual") on top of the stage-1 weights, which are
  copied from `config.prdit.stage1_workdir` (its RAW weights, as the authors load them;
  `source_weights = "ema"` takes its EMA instead) and frozen: `frozen_prefixes` tells the
  trainer to keep no optimizer state for them and never to change them (the model's
  stop-gradient already gives them zero gradients). The residual DiT's read-out starts at zero, so
  a fresh stage-2 model samples exactly what stage 1 samples.

Warm start (`config.prdit.warm_start_workdir`): a run at a new resolution copies every parameter
whose path and shape match from another run, except the time fine head, which the authors
re-initialise; the copied ones train at `warm_start_lr_scale` times the learning rate (the authors'
0.1), the rest at the full rate.

Both copies refuse checkpoints of another parameter layout (`config.prdit.layout`, see
jaxvol.models.prdit.LAYOUT_VERSION) with a message that names it.

The condition is empty ((B, D, H, W, 0)): `sample` only reads its spatial shape, which must be a
multiple of the token stride per axis (the tokens tile the volume exactly). Sampling is one
compiled `lax.scan` of `config.prdit.sample_steps` network evaluations: Euler on the probability
flow (the authors' default, 1000 steps) or their predictor-corrector (100 steps is the fast
setting); the network always sees the whole volume, because the residual DiT's attention is
global.

Flow matching (`config.diffusion.objective = "flow"`): PRDiT-FM ("PRDiT-FM: Flow Matching for
Pixel-Level 3D CT Generation", Fredy-Zhang/PRDiT-FM) trains the same network, stages and freezing
with one velocity channel per voxel instead of (eps, x0): x_t = (1 - t) noise + t data, target
data - noise, t ~ U(0, 1) continuous and multiplied by config.flow.embed_t_scale (1000) only for
the time embedder (jaxvol.diffusion.flow). Sampling integrates from N(0, I) noise with Euler or
Heun in config.flow.sample_steps steps (one scan); `reconstruct` is their stage-1 validation
estimate at t = config.flow.val_t (0.5).
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvol.diffusion import trig
from jaxvol.methods import base
from jaxvol.models import layers
from jaxvol.models import prdit as prdit_lib
from jaxvol.ops import tokens as tokens_lib

# Config fields that fix what the stage-1 weights compute; a stage-2 run checks them against the
# stage-1 run's saved config (the parameter shapes cover the window size and the widths).
LOCAL_FIELDS = ("compute_dtype", "data.target", "prdit.stride", "prdit.local_width",
                "prdit.local_blocks", "prdit.local_mlp_ratio", "prdit.num_steps", "prdit.sigma",
                "prdit.layout", "diffusion.objective", "flow.embed_t_scale")
LOCAL = ("params", "local")
# The time fine head: re-initialised, not copied, on a warm start (as the authors do).
FINE_HEAD = ("params", "residual", "time_fine")
# config.prdit.source_weights -> the train-state entry copied from another run.
SOURCE_TREES = {"raw": "params", "ema": "ema_params"}


def model_name(prdit_cfg) -> str:
  """The paper's name of a configured model, e.g. "PRDiT-B/12/4" (depth 0 for stage 1)."""
  depth = prdit_cfg.depth if prdit_cfg.stage == 2 else 0
  return f"PRDiT-{prdit_cfg.size}/{prdit_cfg.patch}/{depth}"


def build_network(prdit_cfg, dtype, outputs: int = 2) -> prdit_lib.PRDiT:
  """The Flax PRDiT of `config.prdit` (size, window, depth, overrides, stage); `outputs` 2 for
  the (eps, x0) head, 1 for flow matching's velocity head."""
  p = prdit_cfg
  overrides = dict(outputs=outputs, stride=p.stride, stage=p.stage, depth=p.depth, mlp_ratio=p.mlp_ratio,
                   local_width=p.local_width or None, local_blocks=p.local_blocks,
                   local_mlp_ratio=p.local_mlp_ratio, attention=p.attention,
                   chunk_size=p.chunk_size, remat=p.remat, time_width=p.time_width or None,
                   dit_init_gain=p.dit_init_gain, dtype=dtype)
  if p.width:
    overrides["width"] = p.width
  if p.heads:
    overrides["heads"] = p.heads
  return prdit_lib.prdit_from_name(f"{p.size}/{p.patch}", **overrides)


class PRDiT(base.Method):

  # The generated modality (the condition is empty), the network's sizes and stage, and the
  # trigonometric diffusion; not the U-Net's fields. The residual DiT's depth, heads and MLP
  # width exist in stage 2 only; its width also sets the shared time MLP's (prdit.time_width 0).
  MODEL_FIELDS = base.RUN_FIELDS + ("data.target",) + (
      "prdit.size", "prdit.patch", "prdit.stride", "prdit.width", "prdit.time_width",
      "prdit.local_width", "prdit.local_blocks", "prdit.local_mlp_ratio", "prdit.stage",
      "prdit.num_steps", "prdit.sigma", "prdit.layout", "prdit.depth", "prdit.heads",
      "prdit.mlp_ratio", "diffusion.objective", "flow.embed_t_scale")
  SWITCHED_FIELDS = {**base.Method.SWITCHED_FIELDS,
                     **{f"prdit.{k}": (lambda c: c.prdit.stage == 2)
                        for k in ("depth", "heads", "mlp_ratio")},
                     **base.objective_switches(("prdit.num_steps", "prdit.sigma"))}
  # PRDiT-FM (Fredy-Zhang/PRDiT-FM): the same network with one velocity head, trained by
  # straight-line flow matching (jaxvol.diffusion.flow) and sampled by Euler or Heun.
  OBJECTIVES = ("diffusion", "flow")

  def __post_init__(self):
    p = self.config.prdit
    if p.stage not in (1, 2):
      raise ValueError(f"prdit.stage must be 1 or 2, got {p.stage}")
    if p.sampler not in ("euler", "pc"):
      raise ValueError(f"prdit.sampler must be euler or pc, got {p.sampler!r}")
    if p.sample_output not in ("x0", "x"):
      raise ValueError(f"prdit.sample_output must be x0 or x, got {p.sample_output!r}")
    if p.source_weights not in SOURCE_TREES:
      raise ValueError(f"prdit.source_weights must be raw or ema, got {p.source_weights!r}")
    if p.layout != prdit_lib.LAYOUT_VERSION:
      raise ValueError(f"prdit.layout is {p.layout}, but this version builds PRDiT parameter "
                       f"layout {prdit_lib.LAYOUT_VERSION} only (see jaxvol.models.prdit)")
    self.flow = base.flow_of(self.config)
    voxels = p.stride ** 3 * self.target_channels
    if self.flow is not None and 0 < p.local_width < voxels:
      # The velocity's noise part (-noise, every voxel independent) needs a full-rank read-out;
      # a local width below the s^3 voxels of a token caps it (docs/results.md, flow at equal
      # NFE: at local_width 64, stride 8 the one-evaluation estimate is worse than a constant).
      logging.warning(
          "prdit: flow matching with local_width %d < the %d voxels of a token: the local "
          "denoiser's read-out has rank <= %d per token and cannot carry the noise part of the "
          "velocity (samples stay noisy); use local_width=0 (the raw window, the paper's layout) "
          "or >= %d", p.local_width, voxels, p.local_width, voxels)
    if self.flow is None:
      self.diffusion = trig.TrigDiffusion(p.num_steps, p.sigma)
      self.diffusion.sample_schedule(p.sample_steps, p.sampler)  # a clear error for a bad K now
    self.net = build_network(p, self.dtype, outputs=1 if self.flow is not None else 2)

  def sampling_facts(self) -> dict:
    p = self.config.prdit
    if self.flow is not None:
      f = self.config.flow
      return {"model": model_name(p) + " (flow matching)",
              "sampler": {"objective": "flow", "solver": f.solver,
                          "sample_steps": int(f.sample_steps),
                          "nfe": self.flow.nfe(int(f.sample_steps), f.solver)}}
    return {"model": model_name(p),
            "sampler": {"sampler": p.sampler, "predictor": p.predictor,
                        "sample_steps": int(p.sample_steps)}}

  def spatial_multiple(self):
    s = self.config.prdit.stride
    return (s, s, s)

  def frozen_prefixes(self):
    return (LOCAL,) if self.config.prdit.stage == 2 else ()

  def param_sources(self):
    p = self.config.prdit
    sources = []
    tree = SOURCE_TREES[p.source_weights]
    if p.warm_start_workdir:
      sources.append(base.ParamSource("warm_start", p.warm_start_workdir,
                                      lr_scale=float(p.warm_start_lr_scale),
                                      same_fields=("method", "prdit.layout"), tree=tree,
                                      exclude=(FINE_HEAD,), check=prdit_lib.layout_problem))
    if p.stage1_workdir:
      if p.stage != 2:
        raise ValueError("prdit.stage1_workdir is the stage-1 run a stage-2 run builds on; this "
                         "config trains stage 1 (prdit.stage = 1)")
      # Listed last, so the frozen stage-1 weights win over a warm start's "local" ones.
      sources.append(base.ParamSource("stage1", p.stage1_workdir, prefix=LOCAL, require_all=True,
                                      same_fields=("method",) + LOCAL_FIELDS, tree=tree,
                                      check=prdit_lib.layout_problem))
    return tuple(sources)

  def _denoiser(self, params):
    # (eps, x0), or flow matching's velocity, in the volume layout of the active sharding rules
    # (a no-op without them).
    if self.flow is not None:
      return lambda x, t: layers.constrain_volume(self.net.apply(params, x, t))
    return lambda x, t: tuple(map(layers.constrain_volume, self.net.apply(params, x, t)))

  def _boxed_init(self, rng, batch):
    """Variables with the residual DiT's logical partitioning boxes (jaxvol.models.prdit)."""
    x = batch["target"]
    return self.net.init(rng, x, jnp.zeros((x.shape[0],), jnp.float32))

  def init(self, rng, batch):
    return nn.unbox(self._boxed_init(rng, batch))

  def param_axes(self, batch):
    boxed = jax.eval_shape(self._boxed_init, jax.random.PRNGKey(0), batch)
    return nn.get_partition_spec(boxed)

  def loss(self, params, batch, rng):
    if self.flow is not None:
      return self.flow.training_loss(self._denoiser(params), batch["target"], rng)[0], {}
    return self.diffusion.training_loss(self._denoiser(params), batch["target"], rng)

  def reconstruct(self, params, target, rng, t_value: float | None = None):
    """PRDiT-FM's validation estimate: the data from x_t at one time (config.flow.val_t) in one
    evaluation, x_t + (1 - t) v; returns (estimate, x_t). Flow matching only."""
    if self.flow is None:
      raise ValueError("reconstruct is flow matching's validation (diffusion.objective = flow)")
    t_value = float(self.config.flow.val_t if t_value is None else t_value)
    noise = jax.random.normal(rng, target.shape, target.dtype)
    return self.flow.reconstruct(self._denoiser(params), target, noise, t_value)

  def sample(self, params, cond, rng):
    """A volume of cond's spatial shape (cond's channels are not read) from noise."""
    p = self.config.prdit
    if cond.ndim != 5:
      raise ValueError(f"PRDiT samples from a (B, D, H, W, C) condition, got shape {cond.shape}")
    spatial = tuple(cond.shape[1:4])
    if any(v < p.stride or v % p.stride for v in spatial):
      raise ValueError(f"PRDiT generates volumes whose sides are multiples of the token stride "
                       f"{p.stride}; got {spatial} (e.g. use "
                       f"{tuple(max(p.stride, -(-v // p.stride) * p.stride) for v in spatial)})")
    inf = self.config.get("inference")
    if inf is not None and inf.window:
      raise ValueError("PRDiT attends over the whole volume; sliding windows "
                       "(config.inference.window) do not apply: leave it empty")
    tokens_lib.check_patch(p.patch, p.stride)
    k_init, k_loop = jax.random.split(rng)
    if self.flow is not None:  # N(0, I) noise at t = 0, integrated to the data at t = 1
      f = self.config.flow
      x_init = layers.constrain_volume(jax.random.normal(
          k_init, cond.shape[:4] + (self.target_channels,), jnp.float32))
      return self.flow.sample(self._denoiser(params), x_init, f.sample_steps, f.solver)
    x_init = layers.constrain_volume(
        self.diffusion.noise(k_init, cond.shape[:4] + (self.target_channels,)))
    return self.diffusion.sample(self._denoiser(params), x_init, p.sample_steps, p.sampler,
                                 rng=k_loop, predictor=p.predictor, output=p.sample_output)
