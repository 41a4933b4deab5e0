"""`python -m catalog ...`: the same command as `catalog ...`."""

import sys

from catalog.cli import main

sys.exit(main())
