"""Fixtures of the microbenchmarks: the SD3-shaped input sizes."""

from __future__ import annotations

import pytest

from bench_support import SHAPES, Shape


@pytest.fixture(params=SHAPES, ids=[s.id for s in SHAPES])
def shape(request) -> Shape:
    return request.param
