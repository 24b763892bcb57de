"""The path form of the packaged config jaxvol/configs/ppdm_pet_ac.py (its docstring: data, launch
commands, variants), so that `--config=configs/ppdm_pet_ac.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=ppdm_pet_ac`)."""

from jaxvol.configs.ppdm_pet_ac import get_config  # noqa: F401  pylint: disable=unused-import
