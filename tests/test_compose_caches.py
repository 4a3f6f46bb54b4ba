"""SDTM composed with diffusers' step caches (FirstBlockCache, MagCache, TaylorSeer, PyramidAttentionBroadcast,
SeaCache), in both orders of application, on the tiny SD3, Flux and PixArt pipelines.

Every cache runs on a deterministic schedule, so the steps (and blocks) it computes are known in advance:

- FirstBlockCache, threshold 1e9: the first block computes every step, the others only step 0;
- MagCache, mag_ratios all 1 over 8 steps: steps 0, 1 and 5 computed, the whole stack skipped otherwise;
- SeaCache, threshold 1e9, retention 1, end 1, at most 2 cached in a row: steps 0, 3, 6 and 7 computed;
- TaylorSeer, interval 3, caching from step 2: steps 0, 1, 3 and 6 computed, the others predicted (on the
  attention modules, or on the blocks themselves);
- PyramidAttentionBroadcast, spatial range 2, cross range 4: self-attention computed at steps 0, 2, 4, 6,
  cross-attention at steps 0 and 4.

What each cache computed is counted without SDTM's help: torch forward pre-hooks on the blocks' linear
layers (called only when the block runs) and on the attention modules' ``to_q`` projection (called only when
the attention's processor runs, not when an attention cache returns a stored output). SDTM's side is read
from its records: blocks merged to fewer than N tokens, and blocks a cache skipped recorded "skipped".

diffusers 0.42.1 cannot run some of these caches on some families by itself; those cells are tests of the
limitation (diffusers alone), not of the composition.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig, FirstBlockCacheConfig, HookRegistry, MagCacheConfig, ModelHook,
    PyramidAttentionBroadcastConfig, SeaCacheConfig, TaylorSeerCacheConfig, apply_faster_cache,
    apply_first_block_cache, apply_mag_cache, apply_pyramid_attention_broadcast, apply_sea_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, _set_cache_context
from diffusers.models.cache_utils import CacheMixin

from support import FAMILY_PIPELINES, make_pipeline, run_pipeline
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core.hooks import SDTM_HOOK

STEPS = 8
N = 16 * 16  # image tokens of a 32x32 generation
ALL_STEPS = frozenset(range(STEPS))
MERGING = dict(ratio=0.5, deviation=0.0, switch_step=3)
NO_MERGING = dict(ratio=0.0, deviation=0.0)
ORDERS = ("cache_first", "sdtm_first")


# --- Caches ------------------------------------------------------------------------------------------------


class StepContext(ModelHook):
    """Outer hook on the transformer giving SeaCache the context it needs (no pipeline of the three passes
    one): the step (the scheduler's step index), sigma in [0, 1] and the step count."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    def pre_forward(self, module, *args, **kwargs):
        t = float(kwargs["timestep"].flatten()[0])
        sigma = min(max(t if t <= 1.0 else t / 1000.0, 0.0), 1.0)  # Flux passes t / 1000
        step = self.scheduler.step_index or 0  # None before the first scheduler step
        _set_cache_context(module, CacheContext("cond", step_index=step, sigma=sigma, num_inference_steps=STEPS))
        return args, kwargs


def _raw_vision(module, args, kwargs):
    """SeaCache's view of the latents: one (C, T, H, W) tensor per sample."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden.ndim == 4:  # SD3 / PixArt latents [B, C, H, W]
        return [x.unsqueeze(1) for x in hidden]
    side = math.isqrt(hidden.shape[1])  # Flux packed tokens [B, N, C]
    return [x.transpose(0, 1).reshape(hidden.shape[2], 1, side, side) for x in hidden]


def _every_block(layers):
    return {(step, layer) for step in ALL_STEPS for layer in range(layers)}


class Cache:
    """One diffusers cache on a deterministic schedule: how to enable and remove it, and what it computes.

    ``kind`` "block": ``computed(layers)`` is the set of (step, layer) the blocks run; "attention": the
    blocks always run and ``computed(name)`` is the set of steps the attention module ``name`` computes."""

    def __init__(self, kind, config, apply, hooks, computed, transformer_hook=None):
        self.kind, self.config, self.apply, self.hooks = kind, config, apply, hooks
        self.computed, self.transformer_hook = computed, transformer_hook

    def enable(self, pipe, family):
        transformer = pipe.transformer
        config = self.config(family)
        if isinstance(transformer, CacheMixin):  # Flux
            transformer.enable_cache(config)
        else:
            self.apply(transformer, config)
        if self.transformer_hook is not None:
            HookRegistry.check_if_exists_or_initialize(transformer).register_hook(
                self.transformer_hook(pipe.scheduler), "step_context")

    def disable(self, pipe):
        transformer = pipe.transformer
        if isinstance(transformer, CacheMixin):
            transformer.disable_cache()
        else:
            registry = HookRegistry.check_if_exists_or_initialize(transformer)
            for name in self.hooks:
                registry.remove_hook(name, recurse=True)


PAB_SPATIAL, PAB_CROSS = frozenset({0, 2, 4, 6}), frozenset({0, 4})
TAYLOR_COMPUTED = frozenset({0, 1, 3, 6})
TAYLOR = dict(cache_interval=3, disable_cache_before_step=2, max_order=1, taylor_factors_dtype=torch.float32)
TAYLOR_BLOCKS = [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]


def _taylor_attention(family):
    # The default identifiers match attention modules named "...attn": PixArt's attn1 / attn2 match none
    # (the cache would silently hook nothing), so PixArt's self-attention is named.
    extra = dict(cache_identifiers=[r"transformer_blocks\.\d+\.attn1"]) if family == "pixart" else {}
    return TaylorSeerCacheConfig(**TAYLOR, **extra)


CACHES = {
    "fbc": Cache(
        "block", lambda family: FirstBlockCacheConfig(threshold=1e9), apply_first_block_cache,
        ("fbc_leader_block_hook", "fbc_block_hook"),
        lambda layers: {(step, 0) for step in ALL_STEPS} | {(0, layer) for layer in range(layers)},
    ),
    "magcache": Cache(
        "block", lambda family: MagCacheConfig(mag_ratios=[1.0] * STEPS, num_inference_steps=STEPS), apply_mag_cache,
        ("mag_cache_leader_block_hook", "mag_cache_block_hook"),
        lambda layers: {(step, layer) for step in (0, 1, 5) for layer in range(layers)},
    ),
    "seacache": Cache(
        "block",
        lambda family: SeaCacheConfig(threshold=1e9, retention_steps=1, cache_end_steps=1, max_consecutive_cached=2,
                                      raw_vision_callback=_raw_vision),
        apply_sea_cache, ("sea_cache_root", "sea_cache_leader_block", "sea_cache_block"),
        lambda layers: {(step, layer) for step in (0, 3, 6, 7) for layer in range(layers)},
        transformer_hook=StepContext,
    ),
    "taylorseer_blocks": Cache(
        "block", lambda family: TaylorSeerCacheConfig(**TAYLOR, cache_identifiers=TAYLOR_BLOCKS),
        apply_taylorseer_cache, ("taylorseer_cache",),
        lambda layers: {(step, layer) for step in TAYLOR_COMPUTED for layer in range(layers)},
    ),
    "taylorseer": Cache(
        "attention", _taylor_attention, apply_taylorseer_cache, ("taylorseer_cache",),
        lambda name: ALL_STEPS if name.endswith("attn2") else TAYLOR_COMPUTED,
    ),
    "pab": Cache(
        "attention",
        lambda family: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            cross_attention_block_skip_range=4, cross_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: 500.0),  # a timestep always inside the skip ranges
        apply_pyramid_attention_broadcast, ("pyramid_attention_broadcast",),
        lambda name: PAB_CROSS if name.endswith("attn2") else PAB_SPATIAL,
    ),
}

# Where diffusers runs the cache by itself (SD3's last block returns None for the text stream, which the
# caches that store the tail's outputs cannot take; see test_diffusers_alone_cannot_cache).
COMPOSED = [
    ("sd3", "magcache"), ("sd3", "taylorseer"), ("sd3", "pab"),
    ("flux", "fbc"), ("flux", "magcache"), ("flux", "seacache"), ("flux", "taylorseer_blocks"),
    ("flux", "taylorseer"), ("flux", "pab"),
    ("pixart", "fbc"), ("pixart", "magcache"), ("pixart", "seacache"), ("pixart", "taylorseer_blocks"),
    ("pixart", "taylorseer"), ("pixart", "pab"),
]
CELLS = [pytest.param(f, c, o, id=f"{f}-{c}-{o}") for f, c in COMPOSED for o in ORDERS]
# Removing either side: block-level and attention-level caches, through enable_cache / disable_cache (Flux)
# and through the registry (PixArt).
REMOVALS = [pytest.param(f, c, o, id=f"{f}-{c}-{o}")
            for f, c in (("flux", "fbc"), ("flux", "magcache"), ("flux", "pab"), ("pixart", "magcache"),
                         ("pixart", "pab")) for o in ORDERS]


# --- Running and counting ----------------------------------------------------------------------------------


def _blocks(transformer):
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", ())]


class Counter:
    """What the blocks and attention modules computed in the last generation, from torch forward pre-hooks
    (outside diffusers' hook chains, so they change nothing SDTM or a cache sees): ``blocks`` the set of
    (step, layer) whose block ran (one of its linear layers was called), ``attention`` the steps each
    attention module's processor ran (its ``to_q`` was called)."""

    def __init__(self, transformer):
        self.calls = 0
        self.blocks = set()
        self.attention = defaultdict(set)
        transformer.register_forward_pre_hook(self._step)
        for layer, block in enumerate(_blocks(transformer)):
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_pre_hook(lambda *_, layer=layer: self.blocks.add((self.calls - 1, layer)))
        self.attention_names = [name for name, module in transformer.named_modules()
                                if name.endswith(("attn", "attn1", "attn2")) and hasattr(module, "to_q")]
        for name in self.attention_names:
            transformer.get_submodule(name).to_q.register_forward_pre_hook(
                lambda *_, name=name: self.attention[name].add(self.calls - 1))
        self.layers = len(_blocks(transformer))

    def _step(self, *_):
        self.calls += 1

    def clear(self):
        self.calls = 0
        self.blocks.clear()
        self.attention.clear()


def make(family):
    pipe = make_pipeline(family)
    pipe._counter = Counter(pipe.transformer)
    return pipe


def run(pipe, family):
    """One 8-step generation from fixed noise; SD3 and PixArt (no CacheMixin) get the cache context and the
    reset of the caches' state that diffusers' Flux pipeline does itself."""
    transformer = pipe.transformer
    if not isinstance(transformer, CacheMixin):
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
        _set_cache_context(transformer, CacheContext("cond"))
    pipe._counter.clear()
    out = run_pipeline(pipe, family, steps=STEPS)
    assert pipe._counter.calls == STEPS
    return out


def assert_cache_schedule(pipe, cache):
    """The cache computed exactly its deterministic schedule in the last generation."""
    counter = pipe._counter
    if cache.kind == "block":
        assert counter.blocks == cache.computed(counter.layers)
        assert counter.blocks != _every_block(counter.layers)
    else:
        assert counter.blocks == _every_block(counter.layers)  # attention caches skip no block
        assert counter.attention_names
        computed = {name: counter.attention[name] for name in counter.attention_names}
        assert computed == {name: cache.computed(name) for name in counter.attention_names}
        assert any(steps != ALL_STEPS for steps in computed.values())


def assert_sdtm_saw_the_cache(pipe, cache):
    """SDTM's records agree with what the cache computed: blocks skipped are recorded "skipped" and counted,
    blocks that ran are not; blocks whose attention the cache stores keep the full token count there."""
    state = sdtm_state(pipe)
    records = state.records
    counter = pipe._counter
    assert {(r.step, r.layer) for r in records} == _every_block(counter.layers)
    skipped = {(r.step, r.layer) for r in records if r.mode == "skipped"}
    assert skipped == _every_block(counter.layers) - counter.blocks
    assert state.skipped_blocks == len(skipped)
    if cache.kind == "attention":
        assert not skipped
        assert all(r.attn_tokens == N for r in records)


def merged(pipe):
    return [r for r in sdtm_state(pipe).records if r.mode == "merged" and min(r.attn_tokens, r.mlp_tokens) < N]


def compose(family, name, order, sdtm=MERGING):
    """A fresh pipeline with the cache and SDTM applied in ``order``; returns it and one generation."""
    pipe, cache = make(family), CACHES[name]
    if order == "cache_first":
        cache.enable(pipe, family)
        apply_SDTM(pipe, **sdtm)
    else:
        apply_SDTM(pipe, **sdtm)
        cache.enable(pipe, family)
    assert all(_hook_order(block)[0] == SDTM_HOOK for block in _blocks(pipe.transformer))
    return pipe, run(pipe, family)


def _hook_order(module):
    registry = getattr(module, "_diffusers_hook", None)
    return [] if registry is None else registry._hook_order


_memo: dict = {}


def cache_alone(family, name):
    """The cache's generation without SDTM (its schedule checked), on a fresh pipeline."""
    key = ("cache", family, name)
    if key not in _memo:
        pipe = make(family)
        CACHES[name].enable(pipe, family)
        _memo[key] = run(pipe, family)
        assert_cache_schedule(pipe, CACHES[name])
    return _memo[key]


def sdtm_alone(family):
    key = ("sdtm", family)
    if key not in _memo:
        pipe = make(family)
        apply_SDTM(pipe, **MERGING)
        _memo[key] = run(pipe, family)
        assert pipe._counter.blocks == _every_block(pipe._counter.layers) and merged(pipe)
    return _memo[key]


def composed(family, name, order):
    key = ("composed", family, name, order)
    if key not in _memo:
        _memo[key] = compose(family, name, order)
    return _memo[key]


# --- The matrix --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, name, order", CELLS)
def test_sdtm_merges_and_the_cache_skips(family, name, order):
    """Both sides work: SDTM merges tokens in the blocks that run, the cache computes its schedule (and skips
    the rest), SDTM records the skipped blocks, and the order of application does not matter (SDTM is the
    innermost hook either way)."""
    cache = CACHES[name]
    pipe, out = composed(family, name, order)
    assert merged(pipe)
    assert_cache_schedule(pipe, cache)
    assert_sdtm_saw_the_cache(pipe, cache)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, cache_alone(family, name))  # merging changed the image
    other = composed(family, name, ORDERS[1 - ORDERS.index(order)])[1]
    assert torch.equal(out, other)


@pytest.mark.parametrize("family, name, order", CELLS)
def test_ratio_zero_gives_the_cache_alone_image(family, name, order):
    """SDTM merging nothing (its hooks run, protected steps included) leaves the cache's image bit for bit."""
    cache = CACHES[name]
    expected = cache_alone(family, name)
    pipe, out = compose(family, name, order, sdtm=NO_MERGING)
    assert_cache_schedule(pipe, cache)
    assert_sdtm_saw_the_cache(pipe, cache)
    assert any(r.mode == "protected" for r in sdtm_state(pipe).records)  # SDTM's hooks ran
    assert not any(r.mode == "merged" for r in sdtm_state(pipe).records)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family, name, order", REMOVALS)
def test_removing_sdtm_leaves_the_cache_working(family, name, order):
    cache = CACHES[name]
    pipe, _ = compose(family, name, order)
    assert merged(pipe)
    remove_SDTM(pipe)
    assert all(SDTM_HOOK not in _hook_order(block) for block in _blocks(pipe.transformer))
    out = run(pipe, family)
    assert_cache_schedule(pipe, cache)
    assert torch.equal(out, cache_alone(family, name))


@pytest.mark.parametrize("family, name, order", REMOVALS)
def test_removing_the_cache_leaves_sdtm_working(family, name, order):
    cache = CACHES[name]
    pipe, _ = compose(family, name, order)
    cache.disable(pipe)
    assert all(_hook_order(block) == [SDTM_HOOK] for block in _blocks(pipe.transformer))
    out = run(pipe, family)
    counter = pipe._counter
    assert counter.blocks == _every_block(counter.layers)
    assert all(counter.attention[name] == ALL_STEPS for name in counter.attention_names)
    assert merged(pipe) and not any(r.mode == "skipped" for r in sdtm_state(pipe).records)
    assert torch.equal(out, sdtm_alone(family))


# --- diffusers' own limits, and FasterCache ----------------------------------------------------------------


def test_diffusers_alone_cannot_cache_sd3_with_first_block_cache():
    """FirstBlockCache stores the last block's text-stream residual; SD3's last block returns None there."""
    pipe = make("sd3")
    CACHES["fbc"].enable(pipe, "sd3")
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for -: 'NoneType' and 'Tensor'"):
        run(pipe, "sd3")


def test_diffusers_alone_cannot_cache_sd3_blocks_with_taylorseer():
    """TaylorSeer on the blocks records each output's dtype; SD3's last block returns None for the text."""
    pipe = make("sd3")
    CACHES["taylorseer_blocks"].enable(pipe, "sd3")
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'dtype'"):
        run(pipe, "sd3")


def test_diffusers_alone_seacache_on_sd3_skips_nothing():
    """SeaCache keeps no residual history when the last block's text output is None (SD3), so it fails open:
    every block runs and the image is the uncached one."""
    plain = run(make("sd3"), "sd3")
    pipe = make("sd3")
    CACHES["seacache"].enable(pipe, "sd3")
    out = run(pipe, "sd3")
    assert pipe._counter.blocks == _every_block(pipe._counter.layers)
    assert torch.equal(out, plain)


def _faster_cache_config(family):
    return FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 999.5),
        unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 1001),
        attention_weight_callback=lambda _: 0.5, tensor_format="BCHW", is_guidance_distilled=family == "flux",
        current_timestep_callback=lambda: 500.0)


def _enable_faster_cache(pipe, family):
    config = _faster_cache_config(family)
    if isinstance(pipe.transformer, CacheMixin):
        pipe.transformer.enable_cache(config)
    else:
        apply_faster_cache(pipe.transformer, config)


@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_faster_cache_is_refused_when_applied_after_sdtm(family):
    pipe = make(family)
    apply_SDTM(pipe, **MERGING)
    _enable_faster_cache(pipe, family)
    with pytest.raises(ValueError, match="SDTM cannot run with FasterCache"):
        run(pipe, family)


@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_faster_cache_is_refused_when_applied_before_sdtm(family):
    pipe = make(family)
    _enable_faster_cache(pipe, family)
    with pytest.raises(ValueError, match="SDTM cannot run with FasterCache: FasterCache changes the transformer's"):
        apply_SDTM(pipe, **MERGING)
    assert sdtm_state(pipe) is None
    assert all(SDTM_HOOK not in getattr(getattr(block, "_diffusers_hook", None), "hooks", {})
               for block in _blocks(pipe.transformer))
