"""``python -m medfm`` (and ``torchrun ... -m medfm embed ...``): the ``medfm`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
