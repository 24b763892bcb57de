"""The path form of the packaged config jaxvol/configs/prdit_ct_gen.py (its docstring: data, launch
commands, variants), so that `--config=configs/prdit_ct_gen.py[:variant]` keeps working; an installed
jaxvol finds it by name (`jaxvol train --config=prdit_ct_gen`)."""

from jaxvol.configs.prdit_ct_gen import get_config  # noqa: F401  pylint: disable=unused-import
