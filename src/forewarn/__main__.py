"""`python -m forewarn`: the command line."""

import sys

from forewarn.cli import main

if __name__ == "__main__":
    sys.exit(main())
