import pytest

from bench_support import BACKENDS, inputs_for, ops, synchronized


@pytest.mark.parametrize("backend", BACKENDS)
def test_bipartite_match(benchmark, backend, shape):
    benchmark.group = "bipartite_match"
    i = inputs_for(shape, backend)
    op = ops(backend).bipartite_match
    benchmark(synchronized(lambda: op(i.x, i.src_idx, i.dst_idx, i.priority, 0.05), backend))
