import pytest

from bench_support import BACKENDS, inputs_for, ops, synchronized


@pytest.mark.parametrize("phase", ["ssm", "idm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge(benchmark, backend, shape, phase):
    benchmark.group = "merge"
    i = inputs_for(shape, backend)
    plan = getattr(i, phase)
    op = ops(backend).merge
    benchmark(synchronized(lambda: op(i.x, plan.slot, plan.members, plan.offsets, False), backend))
