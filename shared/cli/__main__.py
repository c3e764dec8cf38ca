"""`python -m shared.cli ...`: the `tandem` command, as the console script runs it."""

import sys

from shared.cli import main

sys.exit(main())
