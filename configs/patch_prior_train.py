"""The path form of the packaged config jaxvol/configs/patch_prior_train.py (its docstring: data, launch
commands, variants), so that `--config=configs/patch_prior_train.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=patch_prior_train`)."""

from jaxvol.configs.patch_prior_train import get_config  # noqa: F401  pylint: disable=unused-import
