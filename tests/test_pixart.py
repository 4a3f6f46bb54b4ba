"""SDTM on a tiny PixArt-Sigma pipeline: exact where nothing merges, every backend equal to the torch path,
any image shape and batch, half precision, steps found from PixArt's integer timesteps."""

import pytest
import torch

from support import relative_difference, requires_cpp, requires_triton
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.models.pixart import TinyPixArtSpec, tiny_pixart_pipeline, tiny_pixart_prompt_embeds

SPEC = TinyPixArtSpec()
MERGING = dict(ratio=0.5, switch_step=3)


@pytest.fixture(scope="module")
def pixart():
    return tiny_pixart_pipeline(SPEC)


@pytest.fixture(autouse=True)
def _unpatched(pixart):
    yield
    remove_SDTM(pixart)


def generate(pipe, batch=1, height=32, width=32, steps=8, dtype=torch.float32, guidance=4.5):
    embeds = tiny_pixart_prompt_embeds(SPEC, batch, dtype=dtype)
    return pipe(**embeds, negative_prompt=None, use_resolution_binning=False, height=height, width=width,
                num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("settings", [{"ratio": 0.0, "deviation": 0.0}, {"protect_steps_frequency": 1},
                                      {"protect_layers_frequency": 1}], ids=["ratio0", "steps", "layers"])
def test_nothing_merged_reproduces_unpatched_bit_for_bit(pixart, settings):
    expected = generate(pixart)
    apply_SDTM(pixart, **settings)
    assert torch.equal(generate(pixart), expected)


def test_merging_changes_the_output_and_removal_restores_it(pixart):
    expected = generate(pixart)
    apply_SDTM(pixart, **MERGING)
    merged = generate(pixart)
    assert not torch.equal(merged, expected) and torch.isfinite(merged).all()
    records = sdtm_state(pixart).records
    assert sorted({r.step for r in records}) == list(range(8))  # integer timesteps located
    structure = [r for r in records if r.mode == "merged" and r.phase == "ssm"]
    detail = [r for r in records if r.mode == "merged" and r.phase == "idm"]
    assert structure and all(r.attn_tokens == r.mlp_tokens < 256 for r in structure)
    assert detail and all(r.attn_tokens == 256 > r.mlp_tokens for r in detail)
    remove_SDTM(pixart)
    assert torch.equal(generate(pixart), expected)


@requires_cpp
def test_cpp_backend_equals_torch_backend(pixart):
    apply_SDTM(pixart, backend="torch", **MERGING)
    reference = generate(pixart, height=40, width=56)
    apply_SDTM(pixart, backend="cpp", **MERGING)
    assert relative_difference(generate(pixart, height=40, width=56), reference) <= 1e-5


@requires_triton
def test_triton_backend_equals_torch_backend(pixart):
    apply_SDTM(pixart, backend="torch", **MERGING)
    reference = generate(pixart, steps=5)
    apply_SDTM(pixart, backend="triton", **MERGING)
    assert relative_difference(generate(pixart, steps=5), reference) <= 1e-5


@pytest.mark.parametrize("height, width", [(24, 56), (40, 24)], ids=["12x28", "20x12"])
def test_non_square_and_odd_grids(pixart, height, width):
    apply_SDTM(pixart, **MERGING)
    out = generate(pixart, height=height, width=width, steps=6)
    grid = sdtm_state(pixart).grid
    assert (grid.height, grid.width) == (height // 2, width // 2)
    assert torch.isfinite(out).all() and out.shape[-2:] == (height, width)


@pytest.mark.parametrize("batch, guidance", [(1, 1.0), (1, 4.5), (3, 1.0)], ids=["B1", "B2-cfg", "B3"])
def test_batches(pixart, batch, guidance):
    apply_SDTM(pixart, use_rand=True, **MERGING)
    out = generate(pixart, batch=batch, guidance=guidance, steps=5)
    assert out.shape[0] == batch and torch.isfinite(out).all()


# Relative difference of the latents with MERGING against unmerged, 5 steps, measured: fp16 0.0018, bf16
# 0.0055 (float32: 0.0015). Bounds: a factor 4 either side, room for other random destination draws,
# while an SDTM that merges nothing (0) or changes the image far more fails.
HALF_PRECISION_EFFECT = {torch.float16: 0.0018, torch.bfloat16: 0.0055}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    pipe = tiny_pixart_pipeline(SPEC, dtype=dtype)
    expected = generate(pipe, dtype=dtype, steps=5)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(pipe, dtype=dtype, steps=5), expected)
    apply_SDTM(pipe, **MERGING)
    merged = generate(pipe, dtype=dtype, steps=5)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    measured = HALF_PRECISION_EFFECT[dtype]
    assert measured / 4 < relative_difference(merged, expected) < measured * 4


def test_compiled_pixart_has_one_graph_per_block_form():
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe = tiny_pixart_pipeline(SPEC)
    apply_SDTM(pipe, **MERGING)
    expected = {steps: generate(pipe, steps=steps) for steps in (6, 9)}
    torch._dynamo.reset()
    counters.clear()
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
        graphs = []
        for steps, reference in expected.items():
            assert relative_difference(generate(pipe, steps=steps), reference) <= 1e-5
            graphs.append(counters["stats"]["unique_graphs"])
        with torch.compiler.set_stance("fail_on_recompile"):
            assert relative_difference(generate(pipe, steps=9), expected[9]) <= 1e-5
        assert graphs == [3, 3] and sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
        counters.clear()
