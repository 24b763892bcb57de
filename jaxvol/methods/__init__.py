"""Methods behind one interface (init, loss, sample); `build` picks one from a config.

`model_fields` names the config fields that define a method's parameters (each method class
declares them: base.Method.MODEL_FIELDS), read from the config alone, without building a network.
"""

from jaxvol.methods import autoencoder
from jaxvol.methods import base
from jaxvol.methods import baselines
from jaxvol.methods import ldm
from jaxvol.methods import ppdm
from jaxvol.methods import prdit
from jaxvol.methods import puzzle_regression
from jaxvol.methods import sparse

METHODS = {
    "ppdm": ppdm.PPDM,
    "full3d": baselines.Full3D,
    "wdm": baselines.Wavelet,
    "regression": baselines.Regression,
    "puzzle_regression": puzzle_regression.PuzzleRegression,
    "sparse": sparse.Sparse,
    "prdit": prdit.PRDiT,
    "autoencoder": autoencoder.Autoencoder,
    "ldm": ldm.LatentDiffusion,
}


def method_class(config) -> type[base.Method]:
  """The class of the method named by `config.method`."""
  if config.method not in METHODS:
    raise ValueError(f"unknown method {config.method!r}; available: {sorted(METHODS)}")
  return METHODS[config.method]


def model_fields(config) -> tuple[str, ...]:
  """The dotted config fields that define what the parameters of `config`'s method mean.

  Checkpoints are restored only under a config that agrees on them
  (jaxvol.train.checkpoint.check_same_model); "method" is always one of them.

  Raises:
    ValueError: an unknown `config.method`.
  """
  return tuple(dict.fromkeys(("method",) + method_class(config).model_fields(config)))


def build(config, platform: str = "cpu") -> base.Method:
  """Builds the method named by `config.method` with the compute dtype for `platform`.

  Raises:
    ValueError: an unknown method, or an objective (config.diffusion.objective) or residual
      learning (config.model.residual) it does not offer.
  """
  cls = method_class(config)
  objective = base.objective_of(config)
  if objective not in cls.OBJECTIVES:
    offered = [m for m, c in METHODS.items() if objective in c.OBJECTIVES]
    raise ValueError(f"method {config.method!r} does not train with diffusion.objective="
                     f"{objective!r} (it offers {cls.OBJECTIVES}); {objective!r} is available "
                     f"for {offered}")
  if base.residual_of(config) and not cls.RESIDUAL:
    offered = [m for m, c in METHODS.items() if c.RESIDUAL]
    raise ValueError(f"method {config.method!r} does not offer residual learning "
                     f"(config.model.residual); it is available for {offered}")
  return cls(config=config, dtype=base.resolve_dtype(config.compute_dtype, platform))
