"""``python -m sdtm``: the command line (sdtm/cli/main.py)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
