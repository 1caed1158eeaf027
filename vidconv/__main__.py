"""``python -m vidconv ...`` (and ``torchrun -m vidconv train ...``): the vidconv command line."""

import sys

from vidconv.cli import main

sys.exit(main())
