"""CUDA-graph replay (sdtm/core/graphs.py): one graph per distinct call, static inputs, outputs copied, the same
results as eager calls in every generation. On the CPU a stand-in capture 'replays' by running the
captured call again on the graph's static inputs, which exercises everything but the CUDA driver."""

import copy

import pytest
import torch
from torch.utils import _pytree as pytree

from support import SD3_SPEC, generate, requires_cuda
from sdtm import SDTMConfig, apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core.graphs import disable_cuda_graphs, enable_cuda_graphs, graph_stats
from sdtm.models.sd3 import tiny_pipeline


class RerunCapture:
    """Stands in for CUDA capture on the CPU: replay runs the captured call on the static inputs and writes
    its outputs into the static outputs, as a replayed graph would."""

    def check(self, tensors):
        pass

    def capture(self, run, example_outputs):
        static = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, example_outputs)

        def replay():
            fresh = run()
            for target, value in zip(pytree.tree_leaves(static), pytree.tree_leaves(fresh)):
                if isinstance(target, torch.Tensor):
                    target.copy_(value)

        return replay, static


STEPS = 8
SETTINGS = dict(ratio=0.5, switch_step=3, protect_steps_frequency=3, use_rand=True)


@pytest.fixture()
def pipe():
    return tiny_pipeline(SD3_SPEC)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_sdtm_with_graphs_equals_eager_in_every_generation(pipe, backend):
    from sdtm.core.ops import cpp_unavailable_reason

    if backend == "cpp" and cpp_unavailable_reason() is not None:
        pytest.skip(cpp_unavailable_reason())
    apply_SDTM(pipe, backend=backend, **SETTINGS)
    expected = generate(pipe, batch=2, num_inference_steps=STEPS)
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    first = generate(pipe, batch=2, num_inference_steps=STEPS)
    stats = graph_stats(pipe.transformer)
    records = sdtm_state(pipe).records
    merged_steps = len({r.step for r in records if r.mode == "merged"})
    protected_steps = len({r.step for r in records if r.mode == "protected"})
    # One graph for all protected steps, one per merged step (each has its own token count).
    assert stats["graphs"] == stats["captures"] == merged_steps + 1
    assert stats["replays"] == protected_steps - 1
    assert torch.equal(first, expected)
    second = generate(pipe, batch=2, num_inference_steps=STEPS)  # same seed: replays only
    assert torch.equal(second, expected)
    assert graph_stats(pipe.transformer)["captures"] == stats["captures"]
    assert graph_stats(pipe.transformer)["replays"] == stats["replays"] + STEPS


def test_unmerged_model_with_graphs_captures_once(pipe):
    expected = generate(pipe, batch=2, num_inference_steps=STEPS)
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    assert torch.equal(generate(pipe, batch=2, num_inference_steps=STEPS), expected)
    assert graph_stats(pipe.transformer) == {"graphs": 1, "captures": 1, "replays": STEPS - 1, "eager": 0}
    disable_cuda_graphs(pipe.transformer)
    assert graph_stats(pipe.transformer) is None and "forward" not in pipe.transformer.__dict__
    assert torch.equal(generate(pipe, batch=2, num_inference_steps=STEPS), expected)


def test_a_new_batch_size_or_image_size_is_a_new_graph(pipe):
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    generate(pipe, batch=1, num_inference_steps=3)
    generate(pipe, batch=2, num_inference_steps=3)
    generate(pipe, batch=2, height=40, width=32, num_inference_steps=3)
    assert graph_stats(pipe.transformer)["graphs"] == 3


def test_graphs_switch_on_apply_and_removal(pipe):
    apply_SDTM(pipe, cuda_graphs=True)
    assert graph_stats(pipe.transformer) == {"graphs": 0, "captures": 0, "replays": 0, "eager": 0}
    if not torch.cuda.is_available():  # the CPU model cannot be captured: refused at the first call
        with pytest.raises(ValueError, match="CUDA graphs need the transformer's inputs on a CUDA device"):
            generate(pipe, num_inference_steps=3)
    remove_SDTM(pipe)
    assert graph_stats(pipe.transformer) is None
    with pytest.raises(TypeError, match="cuda_graphs must be a bool"):
        SDTMConfig(cuda_graphs=1)


def test_calls_with_autograd_run_eagerly(pipe):
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    transformer = pipe.transformer
    x = torch.randn(1, 4, 16, 16)
    with torch.enable_grad():
        transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 7, 32),
                    pooled_projections=torch.randn(1, 16))
    assert graph_stats(transformer) == {"graphs": 0, "captures": 0, "replays": 0, "eager": 1}


def test_deep_copy_gets_its_own_empty_graphs(pipe):
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    expected = generate(pipe, batch=2, num_inference_steps=4)
    clone = copy.deepcopy(pipe)
    assert graph_stats(clone.transformer)["graphs"] == 0
    assert clone.transformer.forward.module is clone.transformer
    assert torch.equal(generate(clone, batch=2, num_inference_steps=4), expected)


@requires_cuda
def test_cuda_graphs_equal_eager_on_the_gpu():
    pipe = tiny_pipeline(SD3_SPEC).to("cuda")
    apply_SDTM(pipe, **SETTINGS)
    expected = generate(pipe, batch=2, num_inference_steps=STEPS)
    apply_SDTM(pipe, cuda_graphs=True, **SETTINGS)
    first = generate(pipe, batch=2, num_inference_steps=STEPS)
    second = generate(pipe, batch=2, num_inference_steps=STEPS)
    stats = graph_stats(pipe.transformer)
    assert stats["captures"] > 0 and stats["replays"] >= STEPS and stats["eager"] == 0
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, expected, rtol=1e-4, atol=1e-4)


class ReplayWithoutHooks(RerunCapture):
    """As RerunCapture, but afterwards the blocks look as if their Python hooks had not run, as after a
    real CUDA-graph replay (kernels only)."""

    def __init__(self, state):
        self.state = state

    def capture(self, run, example_outputs):
        replay, static = super().capture(run, example_outputs)

        def replay_kernels_only():
            replay()
            for link in self.state.links:
                link.ran = False

        return replay_kernels_only, static


def test_replayed_calls_are_not_mistaken_for_skipped_blocks(pipe):
    apply_SDTM(pipe, **SETTINGS)
    enable_cuda_graphs(pipe.transformer, capture=ReplayWithoutHooks(sdtm_state(pipe)))
    generate(pipe, batch=2, num_inference_steps=STEPS)
    generate(pipe, batch=2, num_inference_steps=STEPS)  # replays only; a skip would raise here
    assert graph_stats(pipe.transformer)["replays"] >= STEPS
    records = sdtm_state(pipe).records
    assert records and not [r for r in records if r.mode == "skipped"]
    assert any(r.mode == "merged" for r in records)
