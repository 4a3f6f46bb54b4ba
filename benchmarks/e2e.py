"""Interleaved end-to-end timing on this machine: medians and ratios, next to the MAC ratio.

    python benchmarks/e2e.py [--rounds 5] [--backends torch cpp] [--json]

The same as ``sdtm bench e2e``.
"""

import sys

from sdtm.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", "e2e", *sys.argv[1:]]))
