"""Which folder pytest collects when run from the repository root without paths.

``pytest`` (and ``make test``) runs ``tests/`` only, with no benchmark timing; ``pytest --benchmark-only``
runs the microbenchmarks of ``benchmarks/`` only. Paths given on the command line are collected as
given (``pytest benchmarks --benchmark-only`` is what ``make bench`` runs).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if config.args_source is not pytest.Config.ArgsSource.TESTPATHS:
        return
    benchmark_only = bool(config.getoption("benchmark_only", default=False))
    wanted = "benchmarks" if benchmark_only else "tests"
    config.args[:] = [arg for arg in config.args if arg.rstrip("/").endswith(wanted)]
