"""The path form of the packaged config jaxvol/configs/sparse_ct_denoise.py (its docstring: data, launch
commands, variants), so that `--config=configs/sparse_ct_denoise.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=sparse_ct_denoise`)."""

from jaxvol.configs.sparse_ct_denoise import get_config  # noqa: F401  pylint: disable=unused-import
