"""torch.compile on a patched model: no graph break in the blocks, a graph count that does not grow with
the number of steps, no recompilation in a second generation, output equal to eager SDTM.

Backends "aot_eager" / "eager" trace exactly what inductor would see (dynamo and AOT autograd) without
building C++ kernels, so these tests stay fast on two CPU cores.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from support import SD3_SPEC, fresh_dynamo, generate, relative_difference, requires_cpp  # noqa: F401  (fixture)
from sdtm import apply_SDTM, sdtm_state
from sdtm.models.sd3 import tiny_pipeline

# Both phases and protected steps within a few steps; use_rand on (randomness drawn outside the graphs).
SETTINGS = dict(ratio=0.5, switch_step=3, protect_steps_frequency=3, use_rand=True)
BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp)]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def _generations_then_repeat(pipe, eager: dict[int, torch.Tensor]) -> list[int]:
    """Compiled generations of each length in ``eager``; returns the graph count after each. Then the
    longest again with recompilation forbidden."""
    graphs = []
    for steps, expected in eager.items():
        out = generate(pipe, batch=2, num_inference_steps=steps)
        assert relative_difference(out, expected) <= 1e-5, f"{steps} steps"
        graphs.append(_graphs())
    steps = max(eager)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert relative_difference(generate(pipe, batch=2, num_inference_steps=steps), eager[steps]) <= 1e-5
    return graphs


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_transformer_has_one_graph_per_block_form(fresh_dynamo, backend):
    pipe = tiny_pipeline(SD3_SPEC)
    apply_SDTM(pipe, backend=backend, **SETTINGS)
    eager = {steps: generate(pipe, batch=2, num_inference_steps=steps) for steps in (6, 13)}
    modes = {(r.mode, r.phase) for r in sdtm_state(pipe).records}
    assert {m for m, _ in modes} == {"protected", "merged"} and {p for _, p in modes} == {"ssm", "idm"}
    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    graphs = _generations_then_repeat(pipe, eager)
    # Protected, structure and detail steps: three graphs, however many steps, with no break.
    assert graphs == [3, 3]
    assert _breaks() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_blocks_trace_whole_with_fullgraph(fresh_dynamo, backend):
    """diffusers' regional style: every block compiled on its own, fullgraph=True (a break would raise)."""
    pipe = tiny_pipeline(SD3_SPEC)
    apply_SDTM(pipe, backend=backend, **SETTINGS)
    eager = {steps: generate(pipe, batch=2, num_inference_steps=steps) for steps in (6, 13)}
    for block in pipe.transformer.transformer_blocks:
        block.compile(backend="eager", fullgraph=True)
    graphs = _generations_then_repeat(pipe, eager)
    # Three block forms times two block kinds (the last block has no text output).
    assert graphs == [6, 6]


def test_fifty_steps_stay_within_the_recompile_limit(fresh_dynamo):
    pipe = tiny_pipeline(SD3_SPEC)
    apply_SDTM(pipe, backend="torch", ratio=0.3, deviation=0.2)  # the defaults: switch at step 20
    expected = generate(pipe, batch=2, num_inference_steps=50)
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    out = generate(pipe, batch=2, num_inference_steps=50)  # fail_on_recompile_limit_hit is set
    assert relative_difference(out, expected) <= 1e-5
    assert _graphs() <= 3 and _breaks() == 0
