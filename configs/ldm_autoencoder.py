"""The path form of the packaged config jaxvol/configs/ldm_autoencoder.py (its docstring: data, launch
commands, variants), so that `--config=configs/ldm_autoencoder.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=ldm_autoencoder`)."""

from jaxvol.configs.ldm_autoencoder import get_config  # noqa: F401  pylint: disable=unused-import
