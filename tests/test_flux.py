"""SDTM on a tiny Flux.1 pipeline: exact where nothing merges, every backend equal to the torch path, any
image shape and batch, half precision, the step found from ``timestep / 1000``, the grid from ``img_ids``,
merged tokens at their destination's rotary position."""

import pytest
import torch

from support import relative_difference, requires_cpp, requires_triton
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.models.flux import image_grid, merged_attention, merged_rotary
from sdtm.core.plans import Grid, ssm_plan
from sdtm.models.flux import TinyFluxSpec, tiny_flux_pipeline, tiny_flux_prompt_embeds

SPEC = TinyFluxSpec()
MERGING = dict(ratio=0.5, switch_step=3)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline(SPEC)


@pytest.fixture(autouse=True)
def _unpatched(flux):
    yield
    remove_SDTM(flux)


def generate(pipe, batch=1, height=32, width=32, steps=8, dtype=torch.float32, **kwargs):
    embeds = tiny_flux_prompt_embeds(SPEC, batch, dtype=dtype)
    return pipe(**embeds, height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("settings", [{"ratio": 0.0, "deviation": 0.0}, {"protect_steps_frequency": 1},
                                      {"protect_layers_frequency": 1}], ids=["ratio0", "steps", "layers"])
def test_nothing_merged_reproduces_unpatched_bit_for_bit(flux, settings):
    expected = generate(flux, height=32, width=48)
    apply_SDTM(flux, **settings)
    assert torch.equal(generate(flux, height=32, width=48), expected)


def test_merging_changes_the_output_and_removal_restores_it(flux):
    expected = generate(flux)
    apply_SDTM(flux, **MERGING)
    merged = generate(flux)
    assert not torch.equal(merged, expected) and torch.isfinite(merged).all()
    state = sdtm_state(flux)
    assert (state.grid.height, state.grid.width) == (16, 16)
    records = state.records
    assert sorted({r.step for r in records}) == list(range(8))  # timestep / 1000 located
    double, single = [r for r in records if r.layer == 0], [r for r in records if r.layer > 0]
    structure = [r for r in records if r.mode == "merged" and r.phase == "ssm"]
    assert {r.layer for r in structure} == {0, 1, 2}
    assert all(r.attn_tokens == r.mlp_tokens < 256 for r in structure)
    # Detail steps: the double-stream block merges its MLP, single-stream blocks run on every token.
    assert any(r.mode == "merged" and r.phase == "idm" and r.attn_tokens == 256 > r.mlp_tokens for r in double)
    assert all(r.mode != "merged" for r in single if r.phase == "idm")
    remove_SDTM(flux)
    assert torch.equal(generate(flux), expected)


def test_default_switch_step_is_a_share_of_the_steps(flux):
    apply_SDTM(flux)
    generate(flux, steps=10)
    records = sdtm_state(flux).records
    structure = {r.step for r in records if r.phase == "ssm"}
    assert structure == {0, 1, 2, 3}  # the first 40% of 10 steps


@requires_cpp
def test_cpp_backend_equals_torch_backend(flux):
    apply_SDTM(flux, backend="torch", **MERGING)
    reference = generate(flux, height=40, width=56)
    apply_SDTM(flux, backend="cpp", **MERGING)
    assert relative_difference(generate(flux, height=40, width=56), reference) <= 1e-5


@requires_triton
def test_triton_backend_equals_torch_backend(flux):
    apply_SDTM(flux, backend="torch", **MERGING)
    reference = generate(flux, steps=5)
    apply_SDTM(flux, backend="triton", **MERGING)
    assert relative_difference(generate(flux, steps=5), reference) <= 1e-5


@pytest.mark.parametrize("height, width", [(24, 56), (40, 24)], ids=["12x28", "20x12"])
def test_non_square_grids(flux, height, width):
    apply_SDTM(flux, **MERGING)
    out = generate(flux, height=height, width=width, steps=6)
    grid = sdtm_state(flux).grid
    assert (grid.height, grid.width) == (height // 2, width // 2)
    assert torch.isfinite(out).all() and out.shape[1] == (height // 2) * (width // 2)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_batches(flux, batch):
    apply_SDTM(flux, **MERGING)
    out = generate(flux, batch=batch, steps=5)
    assert out.shape[0] == batch and torch.isfinite(out).all()


def test_batch_of_one_draws_random_destinations(flux):
    """Guidance-distilled Flux runs batch 1 with no cond/uncond pair: use_rand still draws."""
    apply_SDTM(flux, use_rand=False, **MERGING)
    fixed = generate(flux, steps=5)
    apply_SDTM(flux, use_rand=True, **MERGING)
    drawn = generate(flux, steps=5)
    assert not torch.equal(fixed, drawn)


def test_true_cfg_keeps_one_stream_per_call(flux):
    embeds = tiny_flux_prompt_embeds(SPEC, 1, seed=1)
    negative = {"negative_prompt_embeds": embeds["prompt_embeds"],
                "negative_pooled_prompt_embeds": embeds["pooled_prompt_embeds"]}
    apply_SDTM(flux, **MERGING)
    out = generate(flux, steps=5, true_cfg_scale=2.0, **negative)
    state = sdtm_state(flux)
    assert torch.isfinite(out).all() and sorted(state.streams) == [0, 1]
    assert [r.step for r in state.records if r.layer == 0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


# Relative difference of the latents with MERGING against unmerged, 5 steps, measured: fp16 0.0055, bf16
# 0.0068 (float32: 0.0055). Bounds: a factor 4 either side, room for other random destination draws,
# while an SDTM that merges nothing (0) or changes the image far more fails.
HALF_PRECISION_EFFECT = {torch.float16: 0.0055, torch.bfloat16: 0.0068}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    pipe = tiny_flux_pipeline(SPEC, dtype=dtype)
    expected = generate(pipe, dtype=dtype, steps=5)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(pipe, dtype=dtype, steps=5), expected)
    apply_SDTM(pipe, **MERGING)
    merged = generate(pipe, dtype=dtype, steps=5)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    measured = HALF_PRECISION_EFFECT[dtype]
    assert measured / 4 < relative_difference(merged, expected) < measured * 4
    assert [r.step for r in sdtm_state(pipe).records if r.layer == 0] == [0, 1, 2, 3, 4]


def test_bf16_timesteps_find_their_steps_without_the_pipeline():
    """``t / 1000`` rounded to bfloat16 lands within 0.8% of t, so near t = 1000 several steps round to
    one value: the scheduler's own step count decides, calling the transformer without a pipeline."""
    pipe = tiny_flux_pipeline(SPEC)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(50, mu=1.15)
    transformer = pipe.transformer
    apply_SDTM(transformer, scheduler=scheduler, **MERGING)
    state = sdtm_state(transformer)
    found = []
    for t in scheduler.timesteps:
        timestep = (t.expand(1).to(torch.bfloat16) / 1000)
        state.begin_call(timestep, 4, 4, timestep_scale=1000.0)
        found.append(state.step)
        scheduler.step(torch.zeros(1, 4), t, torch.zeros(1, 4))
    remove_SDTM(transformer)
    assert found == list(range(50))


def test_merged_token_takes_its_destination_rotary_row():
    grid = Grid(4, 4, 2, 2)
    torch.manual_seed(0)
    scores = torch.rand(2, grid.num_windows)
    drawn = torch.randint(4, (2, grid.num_windows))
    plan = ssm_plan(scores, grid, 6, drawn, False)
    text, dim = 3, 8
    cos = torch.arange((text + 16) * dim, dtype=torch.float32).reshape(text + 16, dim)
    merged_cos, merged_sin = merged_rotary((cos, -cos), plan, text)
    assert merged_cos.shape == (2, text + plan.num_merged, dim) and torch.equal(merged_sin, -merged_cos)
    for b in range(2):
        assert torch.equal(merged_cos[b, :text], cos[:text])
        for m in range(plan.num_merged):
            first = plan.members[b, plan.offsets[b, m]]
            assert torch.equal(merged_cos[b, text + m], cos[text + first])
            members = plan.members[b, plan.offsets[b, m]:plan.offsets[b, m + 1]]
            assert bool((plan.slot[b, members] == m).all())


def test_merged_attention_equals_diffusers_with_one_table_per_sample(flux):
    block = flux.transformer.transformer_blocks[0]
    torch.manual_seed(0)
    image, text = torch.randn(2, 16, SPEC.channels), torch.randn(2, 5, SPEC.channels)
    ids = torch.cat([torch.zeros(5, 3), image_ids(4, 4)])
    cos, sin = flux.transformer.pos_embed(ids)
    with torch.no_grad():
        expected = block.attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=(cos, sin))
        got = merged_attention(block.attn, image, text, (cos.expand(2, -1, -1), sin.expand(2, -1, -1)))
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-6, rtol=1e-5)


def image_ids(height, width):
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.zeros(height * width), rows.flatten(), cols.flatten()], dim=1).float()


def test_grid_from_img_ids(flux):
    assert image_grid(flux.transformer, image_ids(3, 5), 15) == (3, 5)
    with pytest.raises(ValueError, match="row by row"):
        image_grid(flux.transformer, image_ids(3, 5).flip(0), 15)
    with pytest.raises(ValueError, match="row by row"):  # reference-image tokens appended (Kontext)
        kontext = torch.cat([image_ids(2, 2), image_ids(2, 2) + torch.tensor([1.0, 0, 0])])
        image_grid(flux.transformer, kontext, 8)
    with pytest.raises(ValueError, match=r"\[15, 3\]"):
        image_grid(flux.transformer, image_ids(3, 4), 15)


def test_other_attention_processor_is_refused_where_attention_merges(flux):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class LoggingProcessor(FluxAttnProcessor):  # a user's processor: SDTM cannot know what it adds
        pass

    apply_SDTM(flux, **MERGING)
    block = flux.transformer.single_transformer_blocks[0]
    original = block.attn.processor
    block.attn.processor = LoggingProcessor()
    try:
        with pytest.raises(ValueError, match="FluxAttnProcessor"):
            generate(flux, steps=3)
    finally:
        block.attn.processor = original


def test_compiled_flux_graph_count_is_constant_in_the_steps():
    import torch._dynamo
    from torch._dynamo.utils import counters

    pipe = tiny_flux_pipeline(SPEC)
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
        assert graphs[0] == graphs[1] and sum(counters["graph_break"].values()) == 0
    finally:
        torch._dynamo.reset()
        counters.clear()


def test_flux_with_graph_replay_equals_eager():
    """CUDA-graph replay (with the CPU stand-in capture of tests/test_graphs.py): img_ids, txt_ids and the
    guidance are static inputs too; every generation equals eager SDTM."""
    from test_graphs import RerunCapture
    from sdtm.core.graphs import enable_cuda_graphs, graph_stats

    pipe = tiny_flux_pipeline(SPEC)
    apply_SDTM(pipe, **MERGING)
    expected = generate(pipe, steps=7)
    enable_cuda_graphs(pipe.transformer, capture=RerunCapture())
    assert torch.equal(generate(pipe, steps=7), expected)
    assert torch.equal(generate(pipe, steps=7), expected)
    stats = graph_stats(pipe.transformer)
    merged_steps = len({r.step for r in sdtm_state(pipe).records if r.mode == "merged"})
    assert stats["graphs"] == stats["captures"] == merged_steps + 1 and stats["replays"] > 0


def test_macs_command_takes_the_family_switch_step(capsys):
    import json

    from sdtm.cli.main import main

    assert main(["macs", "--config", "flux-dev", "--steps", "28", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["switch_step"] == 10 and report["mac_ratio"] > 1
