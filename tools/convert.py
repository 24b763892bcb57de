"""Command line: convert a datalist of NIfTI volumes into a jaxvol store.

`python tools/convert.py ARGS` = `jaxvol convert ARGS`; the code and its documentation (presets,
exit status) are in jaxvol/convert_cli.py.
"""

import sys

from jaxvol.convert_cli import main
from jaxvol.convert_cli import parse_preset  # noqa: F401

if __name__ == "__main__":
  sys.exit(main())
