import pytest

from bench_support import BACKENDS, inputs_for, ops, synchronized


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_scores(benchmark, backend, shape):
    benchmark.group = "window_scores"
    i = inputs_for(shape, backend)
    op = ops(backend).window_scores
    g = i.grid
    benchmark(synchronized(lambda: op(i.x, i.priority, g.height, g.width, g.sy, g.sx, 0.05), backend))
