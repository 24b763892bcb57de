"""Methods behind one interface (init, loss, sample); `build` picks one from a config."""

from jaxvol.methods import base
from jaxvol.methods import baselines
from jaxvol.methods import ppdm
from jaxvol.methods import prdit
from jaxvol.methods import sparse

METHODS = {
    "ppdm": ppdm.PPDM,
    "full3d": baselines.Full3D,
    "wdm": baselines.Wavelet,
    "regression": baselines.Regression,
    "sparse": sparse.Sparse,
    "prdit": prdit.PRDiT,
}


def build(config, platform: str = "cpu") -> base.Method:
  """Builds the method named by `config.method` with the compute dtype for `platform`."""
  if config.method not in METHODS:
    raise ValueError(f"unknown method {config.method!r}; available: {sorted(METHODS)}")
  return METHODS[config.method](config=config, dtype=base.resolve_dtype(config.compute_dtype, platform))
