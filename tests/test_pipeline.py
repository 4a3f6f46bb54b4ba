"""SDTM on tiny SD3 / SD3.5 pipelines: exactness where nothing merges, every edge case, backends agree."""

import pytest
import torch

from support import SD3_SPEC, SD35_SPEC, generate, relative_difference, requires_cpp
from sdtm import SDTMConfig, apply_SDTM, apply_sdtm, remove_SDTM, sdtm_state
from sdtm.models.sd3 import TinySpec, tiny_pipeline, tiny_prompt_embeds, tiny_transformer

NO_MERGE_SETTINGS = [
    {"ratio": 0.0, "deviation": 0.0},
    {"protect_steps_frequency": 1},
    {"protect_layers_frequency": 1},
]


@pytest.mark.parametrize("settings", NO_MERGE_SETTINGS, ids=["ratio0", "every-step-protected", "every-layer-protected"])
@pytest.mark.parametrize("model", ["sd3", "sd35"])
def test_nothing_merged_reproduces_unpatched_bit_for_bit(sd3_pipe, sd35_pipe, model, settings):
    pipe, spec = (sd3_pipe, SD3_SPEC) if model == "sd3" else (sd35_pipe, SD35_SPEC)
    expected = generate(pipe, spec, num_inference_steps=6)
    apply_SDTM(pipe, **settings)
    assert torch.equal(generate(pipe, spec, num_inference_steps=6), expected)


def test_remove_restores_exactly_and_apply_twice_is_safe(sd3_pipe):
    block_class = type(sd3_pipe.transformer.transformer_blocks[0])
    expected = generate(sd3_pipe)
    apply_SDTM(sd3_pipe)
    merged = generate(sd3_pipe)
    assert not torch.equal(merged, expected) and torch.isfinite(merged).all()
    apply_SDTM(sd3_pipe)  # again: replaces, does not stack
    block = sd3_pipe.transformer.transformer_blocks[0]
    assert type(block) is block_class  # a hook, not another class
    assert block._diffusers_hook._hook_order == ["sdtm"]
    assert len(sd3_pipe.transformer._forward_pre_hooks) == 1
    assert torch.equal(generate(sd3_pipe), merged)
    assert remove_SDTM(sd3_pipe) is sd3_pipe
    assert type(block) is block_class
    assert "forward" not in vars(block) and not hasattr(block, "_diffusers_hook")
    assert not sd3_pipe.transformer._forward_pre_hooks
    assert torch.equal(generate(sd3_pipe), expected)
    remove_SDTM(sd3_pipe)  # harmless when not applied


def test_apply_returns_what_it_was_given(sd3_pipe):
    assert apply_SDTM(sd3_pipe) is sd3_pipe
    transformer = sd3_pipe.transformer
    assert apply_sdtm(transformer, SDTMConfig(), scheduler=sd3_pipe.scheduler) is transformer


def test_same_seed_same_image_across_generations_and_state_resets(sd3_pipe):
    apply_SDTM(sd3_pipe, use_rand=True)
    first = generate(sd3_pipe, batch=2, num_inference_steps=6)
    state = sdtm_state(sd3_pipe)
    steps_first = [r.step for r in state.records]
    second = generate(sd3_pipe, batch=2, num_inference_steps=6)
    assert torch.equal(first, second)
    assert [r.step for r in state.records] == steps_first == sorted(steps_first)
    assert state.generation >= 2
    other = generate(sd3_pipe, batch=2, num_inference_steps=5)  # a different schedule in between
    assert other.shape == first.shape
    assert torch.equal(generate(sd3_pipe, batch=2, num_inference_steps=6), first)


def _steps_seen(pipe):
    return sorted({r.step for r in sdtm_state(pipe).records})


def test_steps_from_keyword_default_and_custom_sigmas(sd3_pipe):
    apply_SDTM(sd3_pipe)
    generate(sd3_pipe, num_inference_steps=7)
    assert _steps_seen(sd3_pipe) == list(range(7)) and sdtm_state(sd3_pipe).num_steps == 7
    kwargs = tiny_prompt_embeds(SD3_SPEC)
    sd3_pipe(**kwargs, height=32, width=32, output_type="latent")  # num_inference_steps left default (28)
    assert _steps_seen(sd3_pipe) == list(range(28))
    embeds = {k: kwargs[k] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    sd3_pipe(None, None, None, 32, 32, 6, **embeds, guidance_scale=1.0, output_type="latent")  # positional steps
    assert _steps_seen(sd3_pipe) == list(range(6))
    sigmas = [1.0, 0.8, 0.5, 0.3, 0.1]
    sd3_pipe(**kwargs, height=32, width=32, output_type="latent", sigmas=sigmas)
    assert _steps_seen(sd3_pipe) == list(range(5)) and sdtm_state(sd3_pipe).num_steps == 5


def test_skip_layer_guidance_keeps_one_step_per_timestep(sd3_pipe):
    apply_SDTM(sd3_pipe)
    generate(sd3_pipe, num_inference_steps=6, skip_guidance_layers=[0], skip_layer_guidance_start=0.0,
             skip_layer_guidance_stop=1.0)
    state = sdtm_state(sd3_pipe)
    assert _steps_seen(sd3_pipe) == list(range(6))
    # Steps with skip-layer guidance call the transformer twice; each call keeps its own caches.
    assert set(state.streams) == {0, 1}
    assert state.streams[0].caches.keys() != set() and state.streams[1].caches.keys() != set()


def test_transformer_alone_needs_the_scheduler(sd3_pipe):
    transformer, scheduler = sd3_pipe.transformer, sd3_pipe.scheduler
    kwargs = tiny_prompt_embeds(SD3_SPEC)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def denoise():
        scheduler.set_timesteps(5)
        x = latents.clone()
        for t in scheduler.timesteps:
            out = transformer(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kwargs["prompt_embeds"],
                              pooled_projections=kwargs["pooled_prompt_embeds"], return_dict=False)[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
        return x

    apply_SDTM(transformer)
    with pytest.raises(RuntimeError, match="scheduler"):
        denoise()
    apply_SDTM(transformer, scheduler=scheduler)
    result = denoise()
    assert torch.isfinite(result).all()
    assert sorted({r.step for r in sdtm_state(transformer).records}) == list(range(5))
    remove_SDTM(transformer)


@pytest.mark.parametrize(
    "height, width", [(24, 56), (26, 30), (34, 22)], ids=["nonsquare-12x28", "odd-13x15", "odd-17x11"]
)
def test_non_square_and_odd_grids(sd3_pipe, monkeypatch, height, width):
    from sdtm.core import engine as block_module

    plans = []
    original = block_module.compute_plan

    def record(link, metric, ops):
        plan = original(link, metric, ops)
        plans.append(plan)
        return plan

    monkeypatch.setattr(block_module, "compute_plan", record)
    apply_SDTM(sd3_pipe, ratio=0.5, deviation=0.2)
    out = generate(sd3_pipe, height=height, width=width, num_inference_steps=6)
    assert torch.isfinite(out).all()
    grid = sdtm_state(sd3_pipe).grid
    assert (grid.height, grid.width) == (height // 2, width // 2)
    border = [r * grid.width + c for r in range(grid.height) for c in range(grid.width)
              if r >= grid.height // 2 * 2 or c >= grid.width // 2 * 2]
    assert plans and any(p.num_merged < grid.num_tokens for p in plans)
    for plan in plans:
        assert not plan.blend[:, border].any()


@pytest.mark.parametrize("batch, guidance", [(1, 1.0), (3, 1.0), (3, 3.0)], ids=["B1", "B3", "B6-cfg"])
def test_odd_and_large_batches(sd3_pipe, batch, guidance):
    apply_SDTM(sd3_pipe, use_rand=True)
    out = generate(sd3_pipe, batch=batch, guidance_scale=guidance)
    assert out.shape[0] == batch and torch.isfinite(out).all()
    assert sdtm_state(sd3_pipe).streams[0].merge_age.shape[0] == batch * (2 if guidance > 1 else 1)


# Relative difference of the latents merged (ratio 0.5) against unmerged, 5 steps, measured: fp16 0.0040,
# bf16 0.0074 (float32: 0.0039). Bounds: a factor 4 either side, room for other random destination draws,
# while an SDTM that merges nothing (0) or changes the image far more fails.
HALF_PRECISION_EFFECT = {torch.float16: 0.0040, torch.bfloat16: 0.0074}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(dtype):
    pipe = tiny_pipeline(SD3_SPEC, dtype=dtype)
    expected = generate(pipe, dtype=dtype, num_inference_steps=5)
    apply_SDTM(pipe, ratio=0.0, deviation=0.0)
    assert torch.equal(generate(pipe, dtype=dtype, num_inference_steps=5), expected)
    apply_SDTM(pipe, ratio=0.5)
    merged = generate(pipe, dtype=dtype, num_inference_steps=5)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    measured = HALF_PRECISION_EFFECT[dtype]
    assert measured / 4 < relative_difference(merged, expected) < measured * 4


def test_dual_attention_runs_on_merged_tokens(sd35_pipe):
    seen = []
    block = sd35_pipe.transformer.transformer_blocks[0]
    assert block.use_dual_attention
    handle = block.attn2.register_forward_hook(lambda module, args, kwargs_out: seen.append(True))
    token_counts = []
    h2 = block.attn2.register_forward_pre_hook(
        lambda module, args, kwargs: token_counts.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        apply_SDTM(sd35_pipe, ratio=0.5, switch_step=10)
        generate(sd35_pipe, SD35_SPEC, num_inference_steps=5)
    finally:
        handle.remove()
        h2.remove()
    assert len(seen) == 5  # attn2 runs at every step, merged or not
    assert min(token_counts) < 256 == max(token_counts)
    state = sdtm_state(sd35_pipe)
    assert ("attn2", 0) in state.streams[0].caches


def test_chunked_feed_forward_keeps_working(sd3_pipe):
    # 32 text tokens and 256 image tokens divide the chunk; merged counts such as 208 do not.
    spec = TinySpec(text_tokens=32)
    apply_SDTM(sd3_pipe, ratio=0.45)
    expected = generate(sd3_pipe, spec)
    sd3_pipe.transformer.enable_forward_chunking(chunk_size=32, dim=1)
    try:
        chunked = generate(sd3_pipe, spec)
    finally:
        sd3_pipe.transformer.disable_forward_chunking()
    assert relative_difference(chunked, expected) < 1e-5


def test_cache_memory_is_layers_times_sublayers_times_activations(sd3_pipe):
    apply_SDTM(sd3_pipe, switch_step=3)
    generate(sd3_pipe, batch=1, num_inference_steps=6)
    state = sdtm_state(sd3_pipe)
    batch, tokens, channels = 2, 256, SD3_SPEC.channels
    assert state.cache_bytes() == SD3_SPEC.num_layers * 2 * batch * tokens * channels * 4


def test_merge_switches_are_honoured(sd3_pipe):
    apply_SDTM(sd3_pipe, merge_attn=False, ratio=0.5)
    generate(sd3_pipe, num_inference_steps=5)
    records = sdtm_state(sd3_pipe).records
    assert all(r.attn_tokens == 256 for r in records) and any(r.mlp_tokens < 256 for r in records)
    apply_SDTM(sd3_pipe, merge_mlp=False, ratio=0.5, switch_step=2)
    generate(sd3_pipe, num_inference_steps=5)
    records = sdtm_state(sd3_pipe).records
    assert all(r.mlp_tokens == 256 for r in records) and any(r.attn_tokens < 256 for r in records)
    assert all(r.mode != "merged" for r in records if r.step > 2)


@requires_cpp
@pytest.mark.parametrize("model", ["sd3", "sd35"])
def test_cpp_backend_equals_torch_backend(sd3_pipe, sd35_pipe, model):
    pipe, spec = (sd3_pipe, SD3_SPEC) if model == "sd3" else (sd35_pipe, SD35_SPEC)
    apply_SDTM(pipe, backend="torch", switch_step=3)
    reference = generate(pipe, spec, height=40, width=56)
    apply_SDTM(pipe, backend="cpp", switch_step=3)
    fused = generate(pipe, spec, height=40, width=56)
    assert relative_difference(fused, reference) <= 1e-5


def test_block_called_outside_the_transformer_is_an_error(sd3_pipe):
    transformer = tiny_transformer(TinySpec())
    apply_SDTM(transformer, scheduler=sd3_pipe.scheduler)
    block = transformer.transformer_blocks[0]
    x = torch.randn(1, 16, SD3_SPEC.channels)
    with pytest.raises(RuntimeError, match="outside its transformer"):
        block(hidden_states=x, encoder_hidden_states=torch.randn(1, 7, SD3_SPEC.channels), temb=torch.randn(1, 32))


def test_step_found_from_a_view_or_from_the_value(sd3_pipe):
    """A timestep that is a view into the scheduler's timesteps is located by address (no sync); a copied or
    cast one by value; one that is not in the schedule is an error."""
    from sdtm.core.state import SDTMState

    scheduler = sd3_pipe.scheduler
    scheduler.set_timesteps(10)
    state = SDTMState(SDTMConfig(), num_layers=1, timesteps_source=lambda: scheduler.timesteps)
    t = scheduler.timesteps
    state.begin_call(t[3].expand(2), 16, 16)
    assert state.step == 3 and state._locate_view(t[3].expand(2)) == 3
    assert state._locate_view(t[4].clone()) is None
    state.begin_call(t[4].clone().half(), 16, 16)
    assert state.step == 4 and state.call_in_step == 0
    state.begin_call(t[4].clone(), 16, 16)
    assert state.step == 4 and state.call_in_step == 1
    generation = state.generation
    state.begin_call(t[0].expand(2), 16, 16)  # back to step 0: a new generation
    assert state.step == 0 and state.generation == generation + 1
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        state.begin_call(torch.tensor([1234.5]), 16, 16)
    with pytest.raises(ValueError, match="one timestep per call"):
        state.begin_call(torch.stack([t[1], t[2]]), 16, 16)


@pytest.mark.parametrize("model", ["sd3", "sd35"])
def test_in_place_updates_equal_the_autograd_path_and_spare_block_inputs(sd3_pipe, sd35_pipe, model):
    """Without autograd the blocks update their residual stream and caches in place; with autograd they
    allocate. Both give the same result, and no block modifies the hidden states it was given."""
    pipe, spec = (sd3_pipe, SD3_SPEC) if model == "sd3" else (sd35_pipe, SD35_SPEC)
    transformer, scheduler = pipe.transformer, pipe.scheduler
    kwargs = tiny_prompt_embeds(spec, batch=2)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 16x16 tokens: plans merge
    inputs_intact = []

    def check_input_kept(block, args, kwargs_, output):
        inputs_intact.append(torch.equal(kwargs_["hidden_states"], block._sdtm_seen_input))

    def remember_input(block, args, kwargs_):
        block._sdtm_seen_input = kwargs_["hidden_states"].clone()

    handles = [h for b in transformer.transformer_blocks for h in (
        b.register_forward_pre_hook(remember_input, with_kwargs=True),
        b.register_forward_hook(check_input_kept, with_kwargs=True))]

    def denoise():
        scheduler.set_timesteps(6)
        x = latents.clone()
        for t in scheduler.timesteps:
            out = transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=kwargs["prompt_embeds"],
                              pooled_projections=kwargs["pooled_prompt_embeds"], return_dict=False)[0]
            x = scheduler.step(out.detach(), t, x, return_dict=False)[0]
        return x

    # backend torch: with autograd on the torch twins run whatever the backend (no autograd formulas)
    apply_SDTM(transformer, scheduler=scheduler, switch_step=3, use_rand=False, backend="torch")
    with torch.no_grad():
        in_place = denoise()
    with torch.enable_grad():
        allocating = denoise()
    merged_blocks = sum(r.mode == "merged" for r in sdtm_state(transformer).records)
    for h in handles:
        h.remove()
    remove_SDTM(transformer)
    assert merged_blocks > 0
    assert torch.equal(in_place, allocating)
    assert inputs_intact and all(inputs_intact)


@requires_cpp
def test_strided_hidden_states_reach_the_fused_unmerge(sd3_pipe):
    """A block input that is not contiguous still gets contiguous output and cache buffers."""
    transformer = sd3_pipe.transformer
    block = transformer.transformer_blocks[0]
    kwargs = tiny_prompt_embeds(SD3_SPEC, batch=2)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def transposed_input(module, args, kwargs_):
        hidden = kwargs_["hidden_states"]
        kwargs_["hidden_states"] = hidden.transpose(0, 1).contiguous().transpose(0, 1)
        return args, kwargs_

    def denoise():
        sd3_pipe.scheduler.set_timesteps(4)
        x = latents.clone()
        for t in sd3_pipe.scheduler.timesteps:
            out = transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=kwargs["prompt_embeds"],
                              pooled_projections=kwargs["pooled_prompt_embeds"], return_dict=False)[0]
            x = sd3_pipe.scheduler.step(out, t, x, return_dict=False)[0]
        return x

    apply_SDTM(transformer, scheduler=sd3_pipe.scheduler, backend="cpp", protect_steps_frequency=None, ratio=0.5)
    with torch.no_grad():
        expected = denoise()
        handle = block.register_forward_pre_hook(transposed_input, with_kwargs=True)
        strided = denoise()
    handle.remove()
    remove_SDTM(transformer)
    assert torch.equal(strided, expected)
