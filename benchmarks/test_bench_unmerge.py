import pytest
import torch

from bench_support import BACKENDS, inputs_for, ops, synchronized


@pytest.mark.parametrize("fused", ["blend+cache", "blend+cache+gate+residual"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_unmerge(benchmark, backend, shape, fused):
    """Unmerge with mcw blending and the cache write (the block's use), optionally fusing gate and residual."""
    benchmark.group = "unmerge"
    i = inputs_for(shape, backend)
    plan = i.ssm
    g = torch.Generator().manual_seed(1)
    b, n, c = i.x.shape
    y = torch.randn(b, plan.num_merged, c, generator=g).to(i.x.device)
    cache = torch.randn(b, n, c, generator=g).to(i.x.device)
    gate = torch.randn(b, c, generator=g).to(i.x.device) if "gate" in fused else None
    residual = i.x if "residual" in fused else None
    op = ops(backend).unmerge
    benchmark(synchronized(lambda: op(y, plan.slot, plan.blend, cache, gate, residual, 0.1, True), backend))
