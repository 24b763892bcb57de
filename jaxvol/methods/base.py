"""The small interface every method implements, and helpers they share.

A method wires a network, a diffusion process, a loss and a sampler:
  init(rng, batch) -> params
  loss(params, batch, rng) -> (scalar loss, dict of scalar metrics)
  sample(params, cond, rng) -> prediction with the target's channels, same spatial shape as cond
Batches are dicts of (B, D, H, W, C) float arrays in network range: "cond" (the conditional input,
channels = input modalities; 0 channels for unconditional generation) and "target". Methods never
read files; `sample` accepts any spatial shape and pads/crops internally to what the network needs
(PRDiT, whose tokens tile the volume exactly, asks for multiples of its stride instead).
Two optional hooks let a method train in stages: `frozen_prefixes` names parameters the optimizer
must leave alone, and `param_sources` names other runs' checkpoints to copy parameters from before
the first step (jaxvol.train.transfer does the copying; methods never read files). With
`config.inference.window` set, every sampler evaluates its network on overlapping Gaussian-blended
windows of that size at each step (jaxvol.ops.windows), spread over this process's devices.
Each method declares the config fields that define what its parameters mean (`MODEL_FIELDS`,
`Method.model_fields`); a checkpoint is only restored under a config that agrees on them
(jaxvol.train.checkpoint.check_same_model). Every other field (sampling steps, eta, learning rate,
dropout, remat, windows, ...) may change between training, resumption and evaluation.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from jaxvol.diffusion import flow as flow_lib
from jaxvol.models import unet3d
from jaxvol.ops import puzzle as puzzle_lib
from jaxvol.ops import windows as windows_lib


# Fields every method's parameters depend on: which method, and the dtype they compute in.
RUN_FIELDS = ("method", "compute_dtype")
# The condition's channels (inputs, then position channels) and the predicted modality.
DATA_FIELDS = ("data.inputs", "data.target", "data.position_channels", "data.position_axes")
# The U-Net of `build_unet`; its dropout and remat change training, not the function.
UNET_FIELDS = ("model.base_width", "model.channel_mults", "model.num_res_blocks",
               "model.attention_levels", "model.num_heads", "model.groups",
               "model.time_embed_dim", "model.layout")
# STM's structure encoder (methods that pass the condition to it: baselines.Full3D and its kind).
STM_FIELDS = ("model.stm", "model.stm_dim")
# Fields that only matter while another field switches them on: field -> is_on(config). The switch
# is declared too, so a checkpoint that differs in it is refused on the switch itself.
SWITCHED_FIELDS = {
    "data.position_axes": lambda c: bool(c.data.get("position_channels", False)),
    "model.num_heads": lambda c: len(c.model.attention_levels) > 0,
    "model.stm_dim": lambda c: bool(c.model.get("stm", False)),
}

def objective_switches(diffusion_fields) -> dict:
  """SWITCHED_FIELDS entries of a method that offers flow matching beside its noise diffusion:
  the diffusion's fields matter without flow matching, the flow's time scale with it."""
  return {**{f: (lambda c: objective_of(c) != "flow") for f in diffusion_fields},
          "flow.embed_t_scale": lambda c: objective_of(c) == "flow"}


def objective_of(config) -> str:
  """config.diffusion.objective ("diffusion" for configs that predate it)."""
  return config.diffusion.get("objective", "diffusion")


def flow_of(config):
  """The FlowMatching of config.flow when the objective is flow matching, else None."""
  if objective_of(config) != "flow":
    return None
  f = config.flow
  flow_lib.check_solver(f.solver, f.sample_steps)
  return flow_lib.FlowMatching(embed_t_scale=float(f.embed_t_scale))


def residual_of(config) -> bool:
  """config.model.residual (residual learning); a config saved while the option was
  config.regression.residual (regression only) is read there."""
  legacy = config.get("regression") or {}
  return bool(config.model.get("residual", False) or legacy.get("residual", False))


def add_input(out, y):
  """Residual learning's estimate: the network's output plus the condition's first channels (as
  many as `out` has), which are normalised like the target (jaxvol.train.loop.check_residual)."""
  return out + y[..., :out.shape[-1]].astype(out.dtype)


def resolve_dtype(name: str, platform: str):
  """'auto' -> bfloat16 on accelerators, float32 on CPU; otherwise the named dtype."""
  if name == "auto":
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
  return jnp.dtype(name)


def build_unet(model_cfg: ml_collections.ConfigDict, out_channels: int, dtype) -> unet3d.UNet3D:
  return unet3d.UNet3D(
      out_channels=out_channels,
      base_width=model_cfg.base_width,
      channel_mults=tuple(model_cfg.channel_mults),
      num_res_blocks=model_cfg.num_res_blocks,
      attention_levels=tuple(model_cfg.attention_levels),
      num_heads=model_cfg.num_heads,
      groups=model_cfg.groups,
      dropout=model_cfg.dropout,
      time_embed_dim=model_cfg.time_embed_dim,
      dtype=dtype,
      remat=model_cfg.remat,
      stm=model_cfg.get("stm", False),
      stm_dim=model_cfg.get("stm_dim", 128),
      layout=model_cfg.get("layout", "jaxvol"),
  )


def regression_loss(pred, target, kind: str):
  if kind == "l1":
    return jnp.mean(jnp.abs(pred - target))
  if kind == "l2":
    return jnp.mean(jnp.square(pred - target))
  raise ValueError(f"unknown loss {kind!r}: use l1 or l2")


def pad_spatial(x, multiple):
  """Edge-pads (B, D, H, W, C) up to a per-axis multiple; returns the padded array and the crop."""
  shape = x.shape[1:4]
  return puzzle_lib.pad_to_multiple(x, multiple, "edge"), shape


def crop_spatial(x, shape):
  return x[:, :shape[0], :shape[1], :shape[2]]


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Parameters to copy from another run's checkpoint before training starts.

  Attributes:
    name: what the copied parameters are called in logs and optimizer labels ("stage1",
      "warm_start").
    workdir: the other run's WORKDIR; the parameters (`tree`) of its latest checkpoint are read.
    prefix: only leaves under this path of the variables tree are considered, e.g.
      ("params", "local"); () = every leaf.
    require_all: every considered leaf must exist there with the same shape (else a clear error);
      False copies the leaves whose path and shape match and leaves the rest fresh.
    lr_scale: learning-rate factor for the copied leaves that are not frozen.
    same_fields: dotted config fields that must agree with the other run's saved config.
    tree: the train-state entry read there: "ema_params" (EMA weights) or "params" (raw).
    exclude: paths under `prefix` that are never copied (they keep their fresh initialisation).
    check: optional function of the saved parameter paths (tuples) returning why they cannot be
      used (a string, e.g. an old parameter layout) or None.
  """

  name: str
  workdir: str
  prefix: tuple[str, ...] = ()
  require_all: bool = False
  lr_scale: float = 1.0
  same_fields: tuple[str, ...] = ()
  tree: str = "ema_params"
  exclude: tuple[tuple[str, ...], ...] = ()
  check: Callable[[list], str | None] | None = None


@dataclasses.dataclass
class Method:
  """Base class holding the config-derived pieces; subclasses define the three functions.

  Subclasses also declare `MODEL_FIELDS`, the dotted config fields that define what their
  parameters mean (every one must exist in the method's configs), may add entries to
  `SWITCHED_FIELDS` for fields that only matter while another is switched on, and set
  `CLAMPS_X0` when their sampler clips its x0 estimate. `CONFIG_DEFAULTS` holds the choices
  their paper makes where they differ from jaxvol.config.base_config, and `LOW_RESOLUTION` says
  that their network runs below the crop's resolution (which picks their `cpu` budget).
  """

  MODEL_FIELDS: ClassVar[tuple[str, ...]] = RUN_FIELDS + DATA_FIELDS
  SWITCHED_FIELDS: ClassVar[dict] = SWITCHED_FIELDS
  # Whether the sampler clips its x0 estimate to config.diffusion.clip_x0 (training then warns
  # when the normalised targets leave that range: jaxvol.train.loop.check_target_range).
  CLAMPS_X0: ClassVar[bool] = False
  # The paper's choices where they differ from the base config, {dotted field: value}, applied
  # whenever a config selects the method (jaxvol.config.set_method).
  CONFIG_DEFAULTS: ClassVar[dict] = {}
  # Whether the network sees the crop below its resolution (PPDM r = 2's puzzle and WDM's Haar
  # bands at 1/2 per axis, latent diffusion at 1/4): their `cpu` variant then gets the quick
  # start's budget, where a full-resolution network gets smaller crops and windowed sampling
  # (jaxvol.config.cpu_task_overrides).
  LOW_RESOLUTION: ClassVar[bool] = False
  # The training objectives it offers (config.diffusion.objective; checked by jaxvol.methods.build):
  # its own ("diffusion", or none for a regressor) and "flow" where flow matching is available.
  OBJECTIVES: ClassVar[tuple[str, ...]] = ("diffusion",)
  # Whether it offers residual learning (config.model.residual, `residual_of`: its clean-image
  # estimate is the first input plus the network's output; checked by jaxvol.methods.build). The
  # field is then one of its model fields (`model_fields`).
  RESIDUAL: ClassVar[bool] = False

  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  @classmethod
  def model_fields(cls, config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`MODEL_FIELDS` that matter for `config`: those switched off there are left out.

    Reads the config only; no network is built.
    """
    fields = cls.MODEL_FIELDS + (("model.residual",) if cls.RESIDUAL else ())
    return tuple(f for f in fields
                 if f not in cls.SWITCHED_FIELDS or cls.SWITCHED_FIELDS[f](config))

  def __post_init__(self):
    """Subclasses build their network and diffusion here (dataclass hook)."""

  @property
  def residual(self) -> bool:
    """Whether its clean-image estimate adds the first input (`RESIDUAL` and the config's)."""
    return self.RESIDUAL and residual_of(self.config)

  @property
  def cond_channels(self) -> int:
    return len(self.config.data.inputs) + 3 * self.position_channels

  @property
  def position_channels(self) -> bool:
    """Whether the condition ends with 3 normalised position channels (config.data)."""
    return bool(self.config.data.get("position_channels", False))

  @property
  def target_channels(self) -> int:
    return 1

  def spatial_multiple(self) -> tuple[int, int, int]:
    """Crop sizes and padded sample shapes must be multiples of this per axis."""
    d = 2 ** (len(self.config.model.channel_mults) - 1)
    return (d, d, d)

  def frozen_prefixes(self) -> tuple[tuple[str, ...], ...]:
    """Paths (prefixes in the variables tree) that training must never update."""
    return ()

  def param_sources(self) -> tuple[ParamSource, ...]:
    """Checkpoints to copy parameters from before the first step; later sources win."""
    return ()

  def init(self, rng, batch):
    raise NotImplementedError

  def loss_at(self, params, batch, rng, step):
    """The training step's loss at `step` (a traced int32): `loss`, unless the loss changes with
    training progress (the autoencoder's adversarial term after its warm-up)."""
    del step
    return self.loss(params, batch, rng)

  def abstract_batch(self, batch_size: int, crop_size) -> dict:
    """A training batch's {"cond", "target"} as ShapeDtypeStructs (float32, channels last)."""
    spatial = tuple(int(s) for s in crop_size)
    return {
        "cond": jax.ShapeDtypeStruct((batch_size,) + spatial + (self.cond_channels,), jnp.float32),
        "target": jax.ShapeDtypeStruct((batch_size,) + spatial + (self.target_channels,),
                                       jnp.float32),
    }

  def param_shapes(self, example_batch):
    """Abstract parameters for a batch like `example_batch` (nothing allocated)."""
    def init(rng):
      return self.init(rng, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example_batch))

    return jax.eval_shape(init, jax.random.PRNGKey(0))

  def param_axes(self, batch):
    """Logical PartitionSpecs of the parameters (a pytree like `init`'s), or None.

    jaxvol.parallel.sharding maps the names onto the mesh; None (the default, every U-Net method)
    replicates every parameter. Shapes only: nothing is allocated.
    """
    del batch
    return None

  def loss(self, params, batch, rng):
    raise NotImplementedError

  def sample(self, params, cond, rng):
    raise NotImplementedError

  def sampling_facts(self) -> dict:
    """What a record of drawn samples should name about the model and its sampler
    (jaxvol.eval.generate's samples.json); {} when the config says it all."""
    return {}

  def sliding_window(self, domain_scale: int = 1) -> windows_lib.SlidingWindow | None:
    """The window evaluator from `config.inference`, or None for whole-volume passes.

    `domain_scale` converts the configured window (image voxels) into the network domain's voxels
    (2 for the half-resolution wavelet bands).
    """
    inf = self.config.get("inference")
    if inf is None or not inf.window:
      return None
    window = windows_lib.as_triple(inf.window if isinstance(inf.window, int) else tuple(inf.window),
                                   "inference.window")
    mult = self.spatial_multiple()
    if any(w % m for w, m in zip(window, mult)):
      raise ValueError(f"inference.window {window} must be a multiple of {mult} per axis for "
                       f"method {self.config.method!r}")
    mesh = windows_lib.local_mesh() if jax.local_device_count() > 1 else None
    return windows_lib.SlidingWindow(tuple(w // domain_scale for w in window), inf.overlap,
                                     inf.sigma_scale, inf.batch, mesh=mesh)

  def windowed(self, fn, inputs, extras=(), domain_scale: int = 1):
    """fn(*inputs, *extras) over the whole volume, or blended over windows when configured."""
    sw = self.sliding_window(domain_scale)
    if sw is None:
      return fn(*inputs, *extras)
    return sw(fn, inputs, extras)
