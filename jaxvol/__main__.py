"""`python -m jaxvol ...` runs the `jaxvol` command (jaxvol.cli)."""

import sys

from jaxvol import cli

if __name__ == "__main__":
  sys.exit(cli.main())
