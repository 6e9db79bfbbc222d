"""``python -m d2ema``: the ``d2ema`` command."""

import sys

from d2ema.cli import main

if __name__ == "__main__":
    sys.exit(main())
