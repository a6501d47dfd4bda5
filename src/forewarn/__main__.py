"""`python -m forewarn`: the command line."""

import sys

from forewarn.cli import main

sys.exit(main())
