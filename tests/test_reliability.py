"""Ways a merged generation could go silently wrong: the grid of the call's own ids, the calling pipeline's
schedule, inference mode, seeds, gradients, plans that merge nothing, autocast and layerwise casting."""

from __future__ import annotations

import pytest
import torch

from support import FAMILY_PIPELINES, make_pipeline, relative_difference, requires_cpp, run_pipeline
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.models.sd3 import TinySpec, tiny_prompt_embeds

MERGING = dict(ratio=0.5, deviation=0.0, switch_step=3)


@pytest.fixture(scope="module")
def pipes():
    return {name: make_pipeline(name) for name in FAMILY_PIPELINES}


@pytest.fixture(autouse=True)
def _unpatched(pipes):
    yield
    for pipe in pipes.values():
        remove_SDTM(pipe)


def merged_records(pipe):
    return [r for r in sdtm_state(pipe).records if r.mode == "merged"]


# 1. Flux merges on the grid its own ids describe.
def test_flux_alternating_transposed_grids_merge_on_their_own_grid(pipes):
    flux = pipes["flux"]
    apply_SDTM(flux, use_rand=False, **MERGING)
    fresh = {}
    for height, width in ((32, 16), (16, 32)):
        fresh[height, width] = run_pipeline(flux, "flux", height, width)
    for _ in range(3):
        for height, width in ((32, 16), (16, 32)):
            out = run_pipeline(flux, "flux", height, width)
            grid = sdtm_state(flux).grid
            assert (grid.height, grid.width) == (height // 2, width // 2)
            assert torch.equal(out, fresh[height, width])


def test_flux_grid_memo_goes_with_the_patch(pipes):
    flux = pipes["flux"]
    apply_SDTM(flux, **MERGING)
    run_pipeline(flux, "flux")
    remove_SDTM(flux)
    assert not any(name.startswith("_sdtm") for name in vars(flux.transformer))


def test_flux_bf16_ids_past_256_columns_are_accepted():
    from sdtm.models.flux import image_grid

    width, height = 300, 2
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(torch.bfloat16)
    assert image_grid(torch.nn.Module(), ids, height * width) == (height, width)
    shuffled = ids.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]
    with pytest.raises(ValueError, match="row by row"):
        image_grid(torch.nn.Module(), shuffled, height * width)


# 2. A transformer shared by a second pipeline follows the calling pipeline's schedule.
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
@pytest.mark.parametrize("first_runs", [True, False], ids=["A-ran", "A-never-ran"])
def test_shared_transformer_follows_the_calling_pipeline(pipes, family, first_runs):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    a = pipes[family]
    scheduler = (FlowMatchEulerDiscreteScheduler if family != "pixart" else DPMSolverMultistepScheduler).from_config(
        a.scheduler.config)
    b = type(a).from_pipe(a, scheduler=scheduler)
    own = type(a).from_pipe(a, scheduler=scheduler.from_config(scheduler.config))
    apply_SDTM(own, **MERGING)
    expected = run_pipeline(own, family, steps=4)
    expected_steps = sorted({r.step for r in sdtm_state(own).records})
    remove_SDTM(own)

    apply_SDTM(a, **MERGING)
    if first_runs:
        run_pipeline(a, family, steps=8)
    out = run_pipeline(b, family, steps=4)
    assert sorted({r.step for r in sdtm_state(a).records}) == expected_steps == [0, 1, 2, 3]
    assert sdtm_state(a).num_steps == 4
    assert merged_records(a)
    assert torch.equal(out, expected)


# 3. Inference mode, in either order with no_grad.
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_inference_mode_and_no_grad_in_either_order_agree(pipes, family):
    pipe = pipes[family]
    apply_SDTM(pipe, **MERGING)
    with torch.inference_mode():
        first = run_pipeline(pipe, family)
    with torch.no_grad():
        second = run_pipeline(pipe, family)
    with torch.inference_mode():
        third = run_pipeline(pipe, family)
    assert merged_records(pipe)
    assert torch.equal(first, second) and torch.equal(second, third)
    apply_SDTM(pipe, **MERGING)  # fresh buffers, first call outside inference mode
    with torch.no_grad():
        fresh = run_pipeline(pipe, family)
    assert torch.equal(fresh, first)


# 4. Same inputs and generator, same image, whatever the global RNG did.
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_seeded_generation_ignores_the_global_rng(pipes, family):
    pipe = pipes[family]
    batch_rand = dict(MERGING, use_rand=True, pseudo_merge=True)  # a group takes its (random) destination's value
    apply_SDTM(pipe, **batch_rand)
    torch.manual_seed(1)
    first = run_pipeline(pipe, family)
    torch.randn(1000)
    torch.nn.Linear(8, 8)
    second = run_pipeline(pipe, family)
    assert torch.equal(first, second)
    apply_SDTM(pipe, **batch_rand, seed=1)
    other_seed = run_pipeline(pipe, family)
    assert not torch.equal(other_seed, first)


# 5. Gradients: the fused ops' twins run under autograd; gradient checkpointing is refused.
@requires_cpp
def test_gradients_reach_every_parameter_on_the_cpp_backend(pipes):
    pipe = pipes["sd3"]
    transformer = pipe.transformer
    spec = TinySpec()
    embeds = tiny_prompt_embeds(spec, 1)
    latents = torch.randn(2, spec.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    inputs = dict(hidden_states=latents, encoder_hidden_states=torch.cat([embeds["prompt_embeds"]] * 2),
                  pooled_projections=torch.cat([embeds["pooled_prompt_embeds"]] * 2))
    pipe.scheduler.set_timesteps(8)
    t = pipe.scheduler.timesteps[1]

    def grads(backend):
        apply_SDTM(transformer, backend=backend, scheduler=pipe.scheduler, **MERGING)
        transformer.zero_grad(set_to_none=True)
        out = transformer(**inputs, timestep=t.expand(2), return_dict=False)[0]
        assert merged_records(transformer)
        out.square().mean().backward()
        result = {n: p.grad for n, p in transformer.named_parameters()}
        remove_SDTM(transformer)
        return result

    cpp, reference = grads("cpp"), grads("torch")
    missing = [n for n, g in cpp.items() if g is None and reference[n] is not None]
    assert not missing
    for name, g in reference.items():
        if g is not None:
            assert torch.allclose(cpp[name], g, rtol=1e-5, atol=1e-7), name
    transformer.zero_grad(set_to_none=True)


def test_gradient_checkpointing_is_refused_with_the_reason(pipes):
    pipe = pipes["sd3"]
    pipe.transformer.enable_gradient_checkpointing()
    try:
        apply_SDTM(pipe, **MERGING)
        with pytest.raises(ValueError, match="gradient checkpointing"):
            pipe.transformer(hidden_states=torch.randn(1, 4, 16, 16), encoder_hidden_states=torch.randn(1, 7, 32),
                             pooled_projections=torch.randn(1, 16), timestep=torch.tensor([1.0]))
        with torch.no_grad():  # inference with checkpointing enabled recomputes nothing: allowed
            run_pipeline(pipe, "sd3", steps=2)
    finally:
        pipe.transformer.disable_gradient_checkpointing()


# 6. A plan that merges nothing leaves the block unchanged.
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_blocks_whose_plan_merges_nothing_run_unchanged(pipes, family):
    pipe = pipes[family]
    size = 8  # a 4x4 token grid: no multiple of 16 sources in detail steps
    expected = run_pipeline(pipe, family, size, size)
    apply_SDTM(pipe, ratio=0.99, deviation=0.0, switch_step=-1, protect_steps_frequency=2)
    out = run_pipeline(pipe, family, size, size)
    records = sdtm_state(pipe).records
    assert (sdtm_state(pipe).grid.height, sdtm_state(pipe).grid.width) == (4, 4)
    assert records and all(r.mode != "merged" for r in records)
    assert torch.equal(out, expected)


# 7. Autocast and layerwise casting: caches and fused ops follow the compute dtype.
@requires_cpp
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_autocast_bf16_runs_on_the_cpp_backend_like_the_torch_backend(pipes, family):
    pipe = pipes[family]
    outputs = {}
    for backend in ("cpp", "torch"):
        apply_SDTM(pipe, backend=backend, **MERGING)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[backend] = run_pipeline(pipe, family)
        caches = [c for s in sdtm_state(pipe).streams.values() for c in s.caches.values()]
        assert caches and {c.dtype for c in caches} == {torch.bfloat16}
        assert merged_records(pipe)
    assert torch.isfinite(outputs["cpp"]).all()
    assert relative_difference(outputs["cpp"], outputs["torch"]) < 2e-2


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_layerwise_casting_caches_take_the_compute_dtype(storage, backend):
    flux = make_pipeline("flux")
    flux.transformer.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    expected = run_pipeline(flux, "flux")
    apply_SDTM(flux, backend=backend, protect_steps_frequency=1)  # every step protected: exact
    assert torch.equal(run_pipeline(flux, "flux"), expected)
    apply_SDTM(flux, backend=backend, **MERGING)
    out = run_pipeline(flux, "flux")
    caches = [c for s in sdtm_state(flux).streams.values() for c in s.caches.values()]
    assert caches and {c.dtype for c in caches} == {torch.float32}
    assert merged_records(flux) and torch.isfinite(out).all()


def test_tensors_remembered_under_inference_mode_serve_later_autograd_calls():
    from sdtm.core.reference import window_tokens

    window_tokens.cache_clear()
    with torch.inference_mode():
        first = window_tokens(6, 6, 2, 2)
    assert not first.is_inference()
    x = torch.randn(36, 3, requires_grad=True)
    x[window_tokens(6, 6, 2, 2)].sum().backward()  # an inference tensor could not be saved for backward
    assert x.grad is not None
