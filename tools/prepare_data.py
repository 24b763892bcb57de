"""Command line: build paired training data from the real volumes in ../shared/data, as a store.

`python tools/prepare_data.py ARGS` = `jaxvol prepare ARGS`; the code and the tasks' documentation
are in jaxvol/prepare.py. This file re-exports its names, so scripts that load it keep working.
"""

import sys

from jaxvol import prepare as _prepare
from jaxvol.prepare import *  # noqa: F401,F403  pylint: disable=wildcard-import

# The private helpers too (tests and experiments reach for some of them).
globals().update({k: v for k, v in vars(_prepare).items()
                  if k.startswith("_") and not k.startswith("__")})

if __name__ == "__main__":
  sys.exit(main())  # noqa: F405
