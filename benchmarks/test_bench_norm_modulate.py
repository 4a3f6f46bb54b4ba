import pytest
import torch

from bench_support import BACKENDS, inputs_for, ops, synchronized


@pytest.mark.parametrize("fused", ["norm_modulate", "norm_modulate_merge"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_modulate(benchmark, backend, shape, fused):
    """The block's adaptive LayerNorm alone (norm1) and fused with the MLP input's merge (norm2)."""
    benchmark.group = "norm_modulate"
    i = inputs_for(shape, backend)
    b, _, c = i.x.shape
    g = torch.Generator().manual_seed(2)
    shift, scale = (torch.randn(b, c, generator=g).to(i.x.device) for _ in range(2))
    op_set, plan = ops(backend), i.ssm
    if fused == "norm_modulate":
        fn = lambda: op_set.norm_modulate(i.x, shift, scale, 1e-6)  # noqa: E731
    else:
        fn = lambda: op_set.norm_modulate_merge(i.x, shift, scale, 1e-6, plan.slot, plan.members,  # noqa: E731
                                                plan.offsets, False)
    benchmark(synchronized(fn, backend))
