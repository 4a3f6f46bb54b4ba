"""SDTM composed with the rest of the ecosystem on tiny SD3, Flux.1 and PixArt pipelines, in both orders of
application: cache-dit's DBCache (a fixed steps mask, with and without its TaylorSeer calibrator),
diffusers' group offloading (block and leaf level), layerwise casting, regional compilation, saving, LoRA and
fused QKV projections.

Every combination shows both sides ran from their own counters (SDTM's records, cache-dit's summary,
the hooks diffusers registered), and at ratio 0 SDTM leaves the other side's output bit for bit as it was.

cache-dit patches the pipeline *class* (``__call__``) while enabled and leaves a patched forward on a Flux
transformer after ``disable_cache``, so each cache-dit test builds its own pipelines, disables the cache in a
``finally`` and an autouse fixture checks that no pipeline class is left patched.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import cache_dit
from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline
from diffusers.hooks import apply_group_offloading

from support import FAMILY_PIPELINES, fresh_dynamo, make_pipeline, relative_difference, run_pipeline  # noqa: F401
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core.hooks import SDTM_HOOK


PIPELINE_CLASSES = (StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline)
ORDERS = ["sdtm_first", "other_first"]
STEPS = 8
TOKENS = 16 * 16  # 32x32 images: a 16x16 token grid in every family
MERGING = dict(ratio=0.5, deviation=0.0, switch_step=3)  # structure steps 1-2, detail steps 4-5 and 7
NOTHING = dict(ratio=0.0, deviation=0.0)  # SDTM's forwards still run on protected steps, merging nothing
# cache-dit: compute steps 0, 1, 3, 6, 7 and use the cache on 2, 4, 5; the first block always runs.
MASK = [1, 1, 0, 1, 0, 0, 1, 1]
CACHED_STEPS = [i for i, compute in enumerate(MASK) if not compute]


def generate(pipe, family, **kwargs):
    return run_pipeline(pipe, family, steps=STEPS, **kwargs)


def merged_records(pipe):
    return [r for r in sdtm_state(pipe).records if r.mode == "merged"]


def assert_merged(pipe):
    merged = merged_records(pipe)
    assert merged, "SDTM merged no block"
    assert all(min(r.attn_tokens, r.mlp_tokens) < TOKENS for r in merged)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors are tiny: more intra-op threads only contend for the cores (several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_pipeline_class_left_patched():
    calls = {cls: cls.__dict__["__call__"] for cls in PIPELINE_CLASSES}
    yield
    for cls in PIPELINE_CLASSES:
        assert cls.__dict__["__call__"] is calls[cls], f"{cls.__name__}.__call__ left patched"
        assert "_original_call" not in cls.__dict__ and "_is_cached" not in cls.__dict__, cls.__name__


# ----------------------------------------------------------------------------------------------------------
# 1. cache-dit DBCache (+ TaylorSeer)

def _cache_dit_configs(family, calibrated):
    config = DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=2, warmup_interval=1, max_cached_steps=-1,
        max_continuous_cached_steps=-1, residual_diff_threshold=0.08, num_inference_steps=STEPS,
        steps_computation_mask=MASK, steps_computation_policy="static",
    )
    calibrator = None
    if calibrated:
        # SD3's last block has no text output, which cache-dit's encoder calibrator cannot handle
        # (test_cache_dit_encoder_calibrator_fails_on_sd3_without_sdtm).
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1, enable_encoder_calibrator=family != "sd3")
    return config, calibrator


@contextlib.contextmanager
def cache_dit_on(pipe, family, calibrated, order="other_first", sdtm=None):
    """cache-dit on ``pipe`` (with SDTM ``sdtm`` applied before or after it per ``order``), disabled at exit."""
    config, calibrator = _cache_dit_configs(family, calibrated)
    if sdtm is not None and order == "sdtm_first":
        apply_SDTM(pipe, **sdtm)
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
    try:
        if sdtm is not None and order == "other_first":
            apply_SDTM(pipe, **sdtm)
        yield pipe
    finally:
        cache_dit.disable_cache(pipe)


def cache_dit_alone(family, calibrated):
    pipe = make_pipeline(family)
    with cache_dit_on(pipe, family, calibrated):
        out = generate(pipe, family)
        assert cache_dit.summary(pipe, logging=False)[0].cached_steps == CACHED_STEPS
    return out


# Protected steps 0 and 4: with the mask, merged steps 3 and 6 follow cached ones, and step 4 is a cached
# step whose first block is protected.
CACHE_MERGING = dict(MERGING, protect_steps_frequency=4)


class StateSnapshots:
    """Hooks on the transformer that copy SDTM's state of stream 0 around every call: before the blocks run
    (after SDTM's own pre-hook), the cache each block is to blend with; after the call (once the blocks a
    cache skipped are accounted for), merge age, caches and which caches are valid."""

    def __init__(self, transformer):
        self.blends, self.after = {}, {}
        self.handles = [transformer.register_forward_pre_hook(self.before_call),
                        transformer.register_forward_hook(self.after_call)]

    def before_call(self, module, args):
        state = module._sdtm_state
        self.blends[state.step] = {(name, link.layer): cache.clone() for link in state.links
                                   for name, cache in link.cache_in.items()}

    def after_call(self, module, args, output):
        state = module._sdtm_state
        state.settle()
        stream = state.streams[0]
        self.after[state.step] = dict(
            age=stream.merge_age.clone(), age_exists=stream.age_exists, valid=set(stream.valid),
            caches={key: cache.clone() for key, cache in stream.caches.items()},
        )

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("calibrated", [False, True], ids=["dbcache", "taylorseer"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_cache_dit_and_sdtm_both_run_and_skipped_blocks_leave_sdtm_state_alone(family, order, calibrated):
    pipe = make_pipeline(family)
    with cache_dit_on(pipe, family, calibrated, order, CACHE_MERGING):
        snapshots = StateSnapshots(pipe.transformer)
        out = generate(pipe, family)
        snapshots.remove()
        stats = cache_dit.summary(pipe, logging=False)
        state = sdtm_state(pipe)
        records = state.records
    assert torch.isfinite(out).all()
    # cache-dit's side: its own count of cached steps, and the blocks it did not call are SDTM's skipped ones.
    assert stats[0].cached_steps == CACHED_STEPS
    num_layers = len(state.links)
    skipped = {(r.step, r.layer) for r in records if r.mode == "skipped"}
    assert skipped == {(s, layer) for s in CACHED_STEPS for layer in range(1, num_layers)}
    assert state.skipped_blocks == len(skipped)
    assert all(r.attn_tokens == r.mlp_tokens == 0 for r in records if r.mode == "skipped")
    assert len(records) == STEPS * num_layers
    # SDTM's side: merged with fewer tokens, also on cached steps (in the block cache-dit always runs).
    assert_merged(pipe)
    assert {r.step for r in merged_records(pipe)} >= {2, 5}
    mode = {(r.step, r.layer): r.mode for r in records}

    # On a cached step only the first block ran: the skipped blocks' caches keep the last output they
    # computed (and stay valid or invalid as they were), and merge age advanced only for that first block.
    for step in CACHED_STEPS:
        before, after = snapshots.after[step - 1], snapshots.after[step]
        for (name, layer), cache in before["caches"].items():
            if layer >= 1:
                assert torch.equal(after["caches"][name, layer], cache), (step, name, layer)
                assert ((name, layer) in after["valid"]) == ((name, layer) in before["valid"]), (step, name, layer)
        assert any(layer >= 1 for _, layer in before["valid"])  # there were caches to keep
        age, previous = after["age"], before["age"]
        if mode[step, 0] == "merged":  # one advance: +1, or 0 for the tokens the plan left independent
            assert torch.where(age == 0, True, age == previous + 1).all(), step
            assert (age == previous + 1).any() and after["age_exists"]
        else:  # a protected first block: no plan, no advance
            assert mode[step, 0] == "protected" and torch.equal(age, previous), step

    # The next computed step's merged blocks blend with the output they last computed, before the skip.
    blended = 0
    for step in (3, 6):
        last_computed = max(s for s in range(step) if MASK[s])
        for (name, layer), cache in snapshots.blends[step].items():
            if layer >= 1:
                assert mode[step, layer] == "merged"
                assert torch.equal(cache, snapshots.after[last_computed]["caches"][name, layer]), (step, name, layer)
                blended += 1
    assert blended > 0

    if calibrated:  # the calibrator changed what the cached steps returned
        plain = make_pipeline(family)
        with cache_dit_on(plain, family, False, order, CACHE_MERGING):
            assert not torch.equal(generate(plain, family), out)


@pytest.mark.parametrize("calibrated", [False, True], ids=["dbcache", "taylorseer"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_cache_dit_with_sdtm_at_ratio_zero_is_cache_dit_alone(family, order, calibrated):
    expected = cache_dit_alone(family, calibrated)
    pipe = make_pipeline(family)
    with cache_dit_on(pipe, family, calibrated, order, NOTHING):
        out = generate(pipe, family)
        assert cache_dit.summary(pipe, logging=False)[0].cached_steps == CACHED_STEPS
        records = sdtm_state(pipe).records
        assert {r.mode for r in records} == {"protected", "unchanged", "skipped"}
        remove_SDTM(pipe)  # cache-dit goes on working without SDTM below it
        assert torch.equal(generate(pipe, family), expected)
    assert torch.equal(out, expected)


def test_cache_dit_encoder_calibrator_fails_on_sd3_without_sdtm():
    """cache-dit's limitation, not SDTM's: its TaylorSeer encoder calibrator expects a text output of SD3's last
    block, which has none (context_pre_only); the SD3 cells above use enable_encoder_calibrator=False."""
    pipe = make_pipeline("sd3")
    config, _ = _cache_dit_configs("sd3", False)
    cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=TaylorSeerCalibratorConfig(taylorseer_order=1))
    try:
        with pytest.raises(AssertionError, match="Bn_residual"):
            generate(pipe, "sd3")
    finally:
        cache_dit.disable_cache(pipe)


# ----------------------------------------------------------------------------------------------------------
# 2. Group offloading, 3. layerwise casting

def _offload(pipe, kind):
    transformer = pipe.transformer
    if kind == "block_level":
        transformer.enable_group_offload(onload_device="cpu", offload_device="cpu", offload_type="block_level",
                                         num_blocks_per_group=1)
    elif kind == "leaf_level":
        apply_group_offloading(transformer, onload_device="cpu", offload_device="cpu", offload_type="leaf_level")
    else:
        transformer.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)


def _assert_other_hooks(pipe, family, kind):
    block = pipe.transformer.transformer_blocks[0]
    name = "layerwise_casting" if kind == "casting" else "group_offloading"
    leaf = (block.attn1 if family == "pixart" else block.attn).to_q
    hooked = block if kind == "block_level" else leaf
    assert hooked._diffusers_hook.get_hook(name) is not None, f"no {name} hook"
    if kind == "casting":
        assert leaf.weight.dtype == torch.bfloat16  # stored in bf16 at rest


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kind", ["block_level", "leaf_level", "casting"])
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_offloading_and_casting_compose_in_either_order(family, kind, order):
    alone = make_pipeline(family)
    _offload(alone, kind)
    expected = generate(alone, family)

    def composed(settings):
        pipe = make_pipeline(family)
        if order == "sdtm_first":
            apply_SDTM(pipe, **settings)
            _offload(pipe, kind)
        else:
            _offload(pipe, kind)
            apply_SDTM(pipe, **settings)
        _assert_other_hooks(pipe, family, kind)
        for block in pipe.transformer.transformer_blocks:
            assert block._diffusers_hook._hook_order[0] == SDTM_HOOK  # innermost
        return pipe

    pipe = composed(MERGING)
    out = generate(pipe, family)
    assert_merged(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, expected)
    if kind == "casting":
        caches = [c for s in sdtm_state(pipe).streams.values() for c in s.caches.values()]
        assert caches and {c.dtype for c in caches} == {torch.float32}  # the compute dtype
    remove_SDTM(pipe)  # the offloading or casting hooks stay and keep working
    _assert_other_hooks(pipe, family, kind)
    assert torch.equal(generate(pipe, family), expected)

    zero = composed(NOTHING)
    assert torch.equal(generate(zero, family), expected)
    assert {r.mode for r in sdtm_state(zero).records} == {"protected", "unchanged"}


# ----------------------------------------------------------------------------------------------------------
# 4. Regional compilation

def _compile_blocks(pipe, family):
    transformer = pipe.transformer
    if family == "flux":
        transformer.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    else:  # no _repeated_blocks: the documented per-block loop
        with pytest.raises(ValueError, match="_repeated_blocks"):
            transformer.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        blocks = list(transformer.transformer_blocks)
        for block in blocks:
            block.compile(backend="aot_eager", fullgraph=True)
    assert all(block._compiled_call_impl is not None for block in blocks)


@pytest.mark.parametrize("order", ["sdtm_first", "compile_first"])
@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_regional_compile_matches_eager_sdtm_without_recompiling(fresh_dynamo, family, order):
    pipe = make_pipeline(family)
    apply_SDTM(pipe, **MERGING)
    eager = generate(pipe, family)
    remove_SDTM(pipe)
    if order == "sdtm_first":
        apply_SDTM(pipe, **MERGING)
        _compile_blocks(pipe, family)
    else:
        _compile_blocks(pipe, family)
        apply_SDTM(pipe, **MERGING)
    out = generate(pipe, family)
    assert counters["stats"]["unique_graphs"] > 0 and sum(counters["graph_break"].values()) == 0
    assert_merged(pipe)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    graphs = counters["stats"]["unique_graphs"]
    with torch.compiler.set_stance("fail_on_recompile"):
        again = generate(pipe, family)
    assert counters["stats"]["unique_graphs"] == graphs
    assert_merged(pipe)
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 5. Saving

@pytest.mark.parametrize("family", FAMILY_PIPELINES)
def test_torch_save_refuses_a_patched_transformer_and_save_pretrained_writes_no_sdtm_state(family, tmp_path):
    pipe = make_pipeline(family)
    unpatched = generate(pipe, family)
    apply_SDTM(pipe, **MERGING)
    merged = generate(pipe, family)
    transformer = pipe.transformer
    with pytest.raises(pickle.PicklingError, match="remove_SDTM"):
        torch.save(transformer, io.BytesIO())

    transformer.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert "sdtm" not in json.dumps(json.loads((tmp_path / "config.json").read_text())).lower()
    loaded = type(transformer).from_pretrained(tmp_path).eval()
    assert not any(hasattr(m, "_diffusers_hook") or any(k.startswith("_sdtm") for k in vars(m))
                   for m in loaded.modules())
    saved, original = loaded.state_dict(), transformer.state_dict()
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    assert torch.equal(generate(pipe, family), merged)  # saving left the patch working

    remove_SDTM(pipe)
    buffer = io.BytesIO()
    torch.save(transformer, buffer)
    assert buffer.tell() > 0
    pipe.transformer = loaded
    assert torch.equal(generate(pipe, family), unpatched)


# ----------------------------------------------------------------------------------------------------------
# 6. LoRA, fused QKV projections

def _peft_or_skip():
    try:
        import peft  # noqa: F401
    except ImportError:
        pytest.skip("peft is not installed (LoRA adapters need it)")
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                      init_lora_weights=False)


def _add_lora(pipe, lora):
    torch.manual_seed(1)  # the same adapter weights every time
    pipe.transformer.add_adapter(lora)


def test_pixart_transformer_takes_no_lora_adapter_in_diffusers():
    # A diffusers limitation, not SDTM's: PixArtTransformer2DModel has no PEFT adapter methods.
    assert not hasattr(make_pipeline("pixart").transformer, "add_adapter")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_composes_in_either_order(family, order):
    lora = _peft_or_skip()
    base = generate(make_pipeline(family), family)
    alone = make_pipeline(family)
    _add_lora(alone, lora)
    expected = generate(alone, family)
    assert not torch.equal(expected, base)  # the adapter changes the model

    def composed(settings):
        pipe = make_pipeline(family)
        if order == "sdtm_first":
            apply_SDTM(pipe, **settings)
            _add_lora(pipe, lora)
        else:
            _add_lora(pipe, lora)
            apply_SDTM(pipe, **settings)
        return pipe

    pipe = composed(MERGING)
    out = generate(pipe, family)
    assert_merged(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, expected)
    assert torch.equal(generate(composed(NOTHING), family), expected)


@pytest.mark.parametrize("order", ["sdtm_first", "fuse_first"])
def test_flux_fused_qkv_projections_with_sdtm(order):
    unfused = make_pipeline("flux")
    apply_SDTM(unfused, **MERGING)
    merged_unfused = generate(unfused, "flux")

    pipe = make_pipeline("flux")
    transformer = pipe.transformer
    if order == "sdtm_first":
        apply_SDTM(pipe, **MERGING)
        transformer.fuse_qkv_projections()
    else:
        transformer.fuse_qkv_projections()
        apply_SDTM(pipe, **MERGING)
    attentions = [block.attn for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
    assert all(attn.fused_projections for attn in attentions)
    calls = {"fused": 0, "separate": 0}

    def count(kind):
        def hook(module, args, output):
            calls[kind] += 1
        return hook

    handles = [attn.to_qkv.register_forward_hook(count("fused")) for attn in attentions]
    handles += [attn.to_q.register_forward_hook(count("separate")) for attn in attentions]
    try:
        out = generate(pipe, "flux")
    finally:
        for handle in handles:
            handle.remove()
    assert_merged(pipe)
    assert calls["fused"] == STEPS * len(attentions) and calls["separate"] == 0  # merged blocks too
    assert torch.isfinite(out).all()
    # Fused projections compute the same products, so the merged result is the unfused merged one.
    assert relative_difference(out, merged_unfused) <= 1e-5
    remove_SDTM(pipe)
    unmerged = generate(pipe, "flux")
    assert not torch.equal(out, unmerged)
    apply_SDTM(pipe, **NOTHING)
    assert torch.equal(generate(pipe, "flux"), unmerged)
