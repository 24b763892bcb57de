"""The path form of the packaged config jaxvol/configs/pnp_mri_recon.py (its docstring: data, launch
commands, variants), so that `--config=configs/pnp_mri_recon.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=pnp_mri_recon`)."""

from jaxvol.configs.pnp_mri_recon import get_config  # noqa: F401  pylint: disable=unused-import
