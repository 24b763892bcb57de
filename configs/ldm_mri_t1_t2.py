"""The path form of the packaged config jaxvol/configs/ldm_mri_t1_t2.py (its docstring: data, launch
commands, variants), so that `--config=configs/ldm_mri_t1_t2.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=ldm_mri_t1_t2`)."""

from jaxvol.configs.ldm_mri_t1_t2 import get_config  # noqa: F401  pylint: disable=unused-import
