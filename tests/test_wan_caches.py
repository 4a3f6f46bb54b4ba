"""SDTM on Wan composed with step caches, in both orders: diffusers' FirstBlockCache and TaylorSeer
(``WanTransformer3DModel`` is a ``CacheMixin``: ``enable_cache``) and cache-dit's DBCache on a fixed
steps mask. Each test proves both sides ran from their own counters (forward pre-hooks on every block's
cross-attention, which fire only when the block really computes; SDTM's records of merged token counts and
of skipped blocks), and that SDTM merging nothing leaves the cache's result bit for bit."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import pytest
import torch
from diffusers import WanPipeline
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.models.wan import TinyWanSpec, tiny_wan_pipeline, tiny_wan_prompt_embeds

SPEC = TinyWanSpec(num_layers=3)
STEPS = 8
TOKENS = 3 * 8 * 6  # 128 x 96 pixels, 9 frames
MERGING = dict(ratio=0.5, deviation=0.0, switch_step=3)
NOTHING = dict(ratio=0.0, deviation=0.0)
ORDERS = ("cache_first", "sdtm_first")


def generate(pipe, guidance=1.0):
    return pipe(**tiny_wan_prompt_embeds(SPEC), height=128, width=96, num_frames=9, num_inference_steps=STEPS,
                guidance_scale=guidance, output_type="latent", generator=torch.Generator().manual_seed(0)).frames


@contextlib.contextmanager
def computed_blocks(pipe):
    """(step, layer) of every block call that really computed, counted on the cross-attention module."""
    computed: dict[int, set] = defaultdict(set)
    handles = []
    for layer, block in enumerate(pipe.transformer.blocks):
        def count(module, args, layer=layer):
            computed[len(pipe.scheduler.timesteps) and _step(pipe)].add(layer)
        handles.append(block.attn2.register_forward_pre_hook(count))
    try:
        yield computed
    finally:
        for handle in handles:
            handle.remove()


def _step(pipe) -> int:
    index = pipe.scheduler.step_index
    return 0 if index is None else index


def _merged(pipe):
    return [r for r in sdtm_state(pipe).records if r.mode == "merged" and min(r.attn_tokens, r.mlp_tokens) < TOKENS]


# --- diffusers' caches ------------------------------------------------------------------------------------
# FirstBlockCache with an infinite threshold: the first block computes at every step, the others only at
# step 0. TaylorSeer on the blocks, interval 3 from step 2: steps 0, 1, 3, 6 computed, the others predicted.
def _fbcache():
    return FirstBlockCacheConfig(threshold=1e9)


def _taylorseer():
    return TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2, max_order=1,
                                 taylor_factors_dtype=torch.float32, cache_identifiers=[r"blocks\.\d+"])


DIFFUSERS_CACHES = {
    "fbcache": (_fbcache, lambda layers: {(0, layer) for layer in range(layers)} | {(s, 0) for s in range(STEPS)}),
    "taylorseer": (_taylorseer, lambda layers: {(s, layer) for s in (0, 1, 3, 6) for layer in range(layers)}),
}


def _with_cache(pipe, make_config, order, sdtm):
    if order == "sdtm_first":
        apply_SDTM(pipe, **sdtm)
    pipe.transformer.enable_cache(make_config())
    if order == "cache_first":
        apply_SDTM(pipe, **sdtm)


def _computed_set(computed):
    return {(step, layer) for step, layers in computed.items() for layer in layers}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("cache", DIFFUSERS_CACHES)
def test_diffusers_caches_and_sdtm_both_run(cache, order):
    make_config, expected_computed = DIFFUSERS_CACHES[cache]
    alone = tiny_wan_pipeline(SPEC)
    alone.transformer.enable_cache(make_config())
    with computed_blocks(alone) as computed_alone:
        reference = generate(alone)
    assert _computed_set(computed_alone) == expected_computed(SPEC.num_layers)

    pipe = tiny_wan_pipeline(SPEC)
    _with_cache(pipe, make_config, order, NOTHING)
    assert torch.equal(generate(pipe), reference)  # SDTM merging nothing: the cache's result bit for bit

    pipe = tiny_wan_pipeline(SPEC)
    _with_cache(pipe, make_config, order, MERGING)
    with computed_blocks(pipe) as computed:
        out = generate(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert _computed_set(computed) == expected_computed(SPEC.num_layers)  # the cache ran as alone
    records = sdtm_state(pipe).records
    skipped = {(r.step, r.layer) for r in records if r.mode == "skipped"}
    if cache == "fbcache":  # SDTM saw the blocks the cache skipped
        assert skipped == {(s, layer) for s in range(1, STEPS) for layer in range(1, SPEC.num_layers)}
    assert _merged(pipe)  # and merged where blocks computed
    assert all((r.step, r.layer) in _computed_set(computed) for r in _merged(pipe))
    pipe.transformer.disable_cache()
    remove_SDTM(pipe)
    assert torch.equal(generate(pipe), generate(tiny_wan_pipeline(SPEC)))  # both removed: the plain model


# --- cache-dit ----------------------------------------------------------------------------------------------
MASK = [1, 1, 0, 1, 0, 0, 1, 1]  # compute steps 0, 1, 3, 6, 7; the first block runs at every step
CACHED_STEPS = [i for i, compute in enumerate(MASK) if not compute]
# cache-dit counts Wan's steps in pairs of calls (conditional, then unconditional: its separate-CFG mode),
# so these tests run with classifier-free guidance, as Wan is used.
CFG = 5.0


@contextlib.contextmanager
def cache_dit_on(pipe, order, sdtm):
    cache_dit = pytest.importorskip("cache_dit")
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, warmup_interval=1, max_cached_steps=-1,
        max_continuous_cached_steps=-1, residual_diff_threshold=0.08, num_inference_steps=STEPS,
        steps_computation_mask=MASK, steps_computation_policy="static",
    )
    if order == "sdtm_first":
        apply_SDTM(pipe, **sdtm)
    cache_dit.enable_cache(pipe, cache_config=config)
    try:
        if order == "cache_first":
            apply_SDTM(pipe, **sdtm)
        yield cache_dit
    finally:
        cache_dit.disable_cache(pipe)
        remove_SDTM(pipe)


@pytest.mark.parametrize("order", ORDERS)
def test_cache_dit_and_sdtm_both_run(order):
    call = WanPipeline.__dict__["__call__"]
    alone = tiny_wan_pipeline(SPEC)
    with cache_dit_on(alone, order, dict(NOTHING, protect_steps_frequency=0)) as cache_dit:
        with_nothing = generate(alone, CFG)
    plain = tiny_wan_pipeline(SPEC)
    cache_dit = pytest.importorskip("cache_dit")
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, warmup_interval=1, max_cached_steps=-1,
        max_continuous_cached_steps=-1, residual_diff_threshold=0.08, num_inference_steps=STEPS,
        steps_computation_mask=MASK, steps_computation_policy="static",
    )
    cache_dit.enable_cache(plain, cache_config=config)
    reference = generate(plain, CFG)
    cache_dit.disable_cache(plain)
    assert torch.equal(with_nothing, reference)

    pipe = tiny_wan_pipeline(SPEC)
    with cache_dit_on(pipe, order, MERGING) as cache_dit:
        with computed_blocks(pipe) as computed:
            out = generate(pipe, CFG)
        stats = cache_dit.summary(pipe, logging=False)
        records = sdtm_state(pipe).records
        merged = _merged(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert stats[0].cached_steps == CACHED_STEPS  # cache-dit's own count
    expected = {(s, layer) for s in range(STEPS) for layer in range(SPEC.num_layers) if MASK[s] or layer == 0}
    assert _computed_set(computed) == expected
    skipped = {(r.step, r.layer) for r in records if r.mode == "skipped"}
    assert skipped == {(s, layer) for s in CACHED_STEPS for layer in range(1, SPEC.num_layers)}
    assert merged and {r.step for r in merged} & set(CACHED_STEPS)  # merged in the block cache-dit always runs
    assert WanPipeline.__dict__["__call__"] is call  # cache-dit restored the pipeline class
