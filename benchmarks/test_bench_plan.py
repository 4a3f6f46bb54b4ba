import pytest

from bench_support import BACKENDS, inputs_for, ops, synchronized
from sdtm import SDTMConfig
from sdtm.block import compute_plan
from sdtm.schedule import BlockAction, BlockMode, Phase
from sdtm.state import SDTMState


@pytest.mark.parametrize("phase", [Phase.STRUCTURE, Phase.DETAIL], ids=["ssm", "idm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_plan(benchmark, backend, shape, phase):
    """A whole plan: scores (window_scores or bipartite_match), selection, index tables, merge age."""
    benchmark.group = "plan"
    i = inputs_for(shape, backend)
    state = SDTMState(SDTMConfig(backend=backend.removesuffix("-cuda")), num_layers=1)
    state.grid = i.grid
    action = BlockAction(BlockMode.MERGED, phase, reduce_num=i.grid.num_tokens // 2, merge_attn=True, merge_mlp=True)
    op_set = ops(backend)

    def plan():
        state.streams.clear()
        state.generator = None
        return compute_plan(state, action, i.x, op_set)

    benchmark(synchronized(plan, backend))
