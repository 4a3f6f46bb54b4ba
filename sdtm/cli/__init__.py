"""The ``sdtm`` command line: demo, generate, macs, bench."""
