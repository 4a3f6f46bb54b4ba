import pytest
import torch

from bench_support import BACKENDS, inputs_for, ops, synchronized
from sdtm import SDTMConfig
from sdtm.core.engine import compute_plan
from sdtm.core.schedule import BlockAction, BlockMode, Phase
from sdtm.core.state import BlockLink, CallStream, SDTMState


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
    device = i.x.device
    batch, num_tokens = i.x.shape[:2]
    stream = CallStream(merge_age=torch.zeros(batch, num_tokens, dtype=torch.int32, device=device))
    draw = torch.randint(i.grid.window_size, (batch, i.grid.num_windows), device=device)
    link = BlockLink(state, 0, action=action, stream=stream, dst_draw=draw,
                     remove=torch.empty(action.reduce_num, dtype=torch.uint8, device=device))

    def plan():
        stream.merge_age.zero_()  # every run is a generation's first merge
        return compute_plan(link, i.x, op_set)

    benchmark(synchronized(plan, backend))
