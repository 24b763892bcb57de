"""The path form of the packaged config jaxvol/configs/ldm_pet_denoise.py (its docstring: data, launch
commands, variants), so that `--config=configs/ldm_pet_denoise.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=ldm_pet_denoise`)."""

from jaxvol.configs.ldm_pet_denoise import get_config  # noqa: F401  pylint: disable=unused-import
