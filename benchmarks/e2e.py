"""Interleaved end-to-end timing on this machine: medians and ratios, next to the MAC ratio.

    python benchmarks/e2e.py [--model FAMILY] [--rounds 5] [--backends torch cpp] [--json]

The same as ``sdtm bench e2e``: a transformer of the model family's shape (the default family by default),
shrunk for the CPU, over a 10-step schedule.
"""

import sys

from sdtm.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
