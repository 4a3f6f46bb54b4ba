"""An independent oracle of SDTM's merged SD3 / SD3.5 blocks, whole block calls (tests/test_spec_trace.py
checks the plans step by step).

A tiny SD3.5-like pipeline (dual attention in the first block, a context-pre-only last block; classifier-
free guidance: batch 2) runs one generation with SDTM (torch backend, no randomness, no step protection),
and every merged block call is recorded: its inputs and outputs, the plan SDTM used, the caches it read and
the caches it stored. Each call is then recomputed from diffusers' own sub-modules of the
``JointTransformerBlock`` (norm1, norm1_context, attn, attn2, norm2, ff, norm2_context, ff_context)
applied to tokens merged here by group means over the plan's slots, the outputs unmerged, blended with the
cache (``mcw * y + (1 - mcw) * cache`` on blended rows), gated and added to the residual as the SPEC says.
Nothing of sdtm/models/sd3.py, sdtm/core/norms.py or sdtm/core/reference.py is used to recompute.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from support import SD35_SPEC, assert_close
from sdtm.core.hooks import attached_hook
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core import engine
from sdtm.core.schedule import Phase
from sdtm.tiny import tiny_pipeline, tiny_prompt_embeds

SPEC = SD35_SPEC
MCW = 0.25
HEIGHT, WIDTH = 64, 64  # a 32 x 32 token grid: 1024 tokens, 256 windows of 2 x 2
STEPS = 5
SETTINGS = dict(backend="torch", use_rand=False, ratio=0.5, deviation=0.0, switch_step=2,
                protect_steps_frequency=0, mcw=MCW)
RTOL, ATOL = 1e-5, 1e-5


@dataclass
class BlockCall:
    block: torch.nn.Module
    step: int
    phase: Phase
    merge_attn: bool
    merge_mlp: bool
    inputs: dict
    caches: dict[str, torch.Tensor]
    merge_age: torch.Tensor | None
    plan: object = None
    metric: torch.Tensor | None = None
    outputs: tuple = ()
    stored: dict[str, torch.Tensor] = field(default_factory=dict)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def record_merged_calls(pipe, monkeypatch, run) -> list[BlockCall]:
    """Every call of a patched block during ``run()`` that computed a merge plan."""
    calls: list[BlockCall] = []
    active: list[BlockCall | None] = []
    original_plan = engine.compute_plan

    def recording_plan(link, metric, ops):
        plan = original_plan(link, metric, ops)
        call = active[-1]
        call.plan, call.metric = plan, metric.detach().clone()
        return plan

    def before(block, args, kwargs):
        link = attached_hook(block).link
        bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
        bound.apply_defaults()
        inputs = {k: _snapshot(v) for k, v in bound.arguments.items() if k != "self"}
        action = link.action
        active.append(BlockCall(
            block=block, step=link.state.step, phase=action.phase, merge_attn=action.merge_attn,
            merge_mlp=action.merge_mlp, inputs=inputs,
            caches={name: cache.clone() for name, cache in link.cache_in.items()},
            merge_age=link.stream.merge_age.clone() if link.age_exists else None,
        ))

    def after(block, args, kwargs, output):
        call = active.pop()
        if call.plan is not None:
            call.outputs = _snapshot(output)
            call.stored = {name: cache.clone() for name, cache in attached_hook(block).link.cache_out.items()}
            calls.append(call)

    monkeypatch.setattr(engine, "compute_plan", recording_plan)
    handles = []
    for link in sdtm_state(pipe).links:
        block = link.block
        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


# ----------------------------------------------------------------------------- the oracle's own pieces
def merge(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [M, C]: row m is the mean of the tokens whose slot is m."""
    membership = F.one_hot(slot, int(slot.max()) + 1).to(x.dtype)  # [N, M]
    return (membership.T @ x) / membership.sum(0)[:, None]


def unmerge(y: torch.Tensor, slot: torch.Tensor, blend: torch.Tensor, cache: torch.Tensor | None,
            mcw: float) -> torch.Tensor:
    """[M, C] -> [N, C]: each token takes its row; blended tokens mix with the cache when there is one."""
    u = y[slot]
    if cache is None:
        return u
    return torch.where(blend[:, None], mcw * u + (1 - mcw) * cache, u)


def destinations(slot: torch.Tensor) -> torch.Tensor:
    """[M] the first token (lowest index) of each merged row: a window's destination without randomness."""
    rows = int(slot.max()) + 1
    tokens = torch.arange(slot.shape[0])
    return torch.full((rows,), slot.shape[0], dtype=torch.int64).scatter_reduce(0, slot, tokens, "amin")


def window_of(height: int, width: int) -> torch.Tensor:
    """[N] the complete 2 x 2 window of each token, -1 for border tokens."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    index = (rows // 2) * (width // 2) + cols // 2
    complete = (rows < height // 2 * 2) & (cols < width // 2 * 2)
    return torch.where(complete, index, -1).flatten()


def expected_blend(call: BlockCall, sample: int, height: int, width: int) -> torch.Tensor:
    """[N] bool, the tokens the SPEC blends: SSM, the tokens of merged windows (groups of all 4 tokens of
    one window); IDM, every window destination (largest merge age, first on ties; the first token
    before any) and every source merged into one."""
    slot = call.plan.slot[sample]
    sizes = torch.bincount(slot)
    grouped = sizes[slot] > 1
    windows = window_of(height, width)
    if call.phase is Phase.STRUCTURE:  # whole windows: every group's tokens share one complete window
        assert set(sizes.tolist()) <= {1, 4}
        lowest = windows.new_full(sizes.shape, 1 << 30).scatter_reduce(0, slot, windows, "amin")
        highest = windows.new_full(sizes.shape, -2).scatter_reduce(0, slot, windows, "amax")
        assert bool((lowest == highest)[sizes == 4].all()) and bool((lowest[sizes == 4] >= 0).all())
        return grouped
    border = int((windows < 0).sum())
    table = torch.sort(windows, stable=True).indices[border:].view(-1, 4)  # [W, 4] tokens, row-major
    if call.merge_age is None:
        dst = table[:, 0]
    else:
        dst = table.gather(1, call.merge_age[sample][table].argmax(1, keepdim=True)).squeeze(1)
    is_dst = torch.zeros_like(grouped)
    is_dst[dst] = True
    return grouped | is_dst


def cache_row(call: BlockCall, name: str, sample: int) -> torch.Tensor | None:
    """The cache the call read for sub-layer ``name``, one sample's rows [N, C], or None for none."""
    cache = call.caches.get(name)
    return None if cache is None else cache[sample]


def check_plan_merges(call: BlockCall, sample: int, height: int, width: int) -> torch.Tensor:
    """Check that the call's plan really merges and blends the tokens the SPEC says; returns its blend row."""
    slot, blend = call.plan.slot[sample], call.plan.blend[sample]
    assert call.plan.num_merged < slot.shape[0] - 16, "the plan merges (almost) nothing"
    assert torch.equal(blend, expected_blend(call, sample, height, width))
    if call.phase is Phase.STRUCTURE:  # the plan's members list each group's destination first
        first = call.plan.members[sample].gather(0, call.plan.offsets[sample, :-1])
        assert torch.equal(first, destinations(slot))
    return blend



@torch.no_grad()
def block_oracle(call: BlockCall, height: int, width: int, mcw: float = MCW):
    """(text output or None, image output) of a merged JointTransformerBlock call, and the full outputs of
    its merged sub-layers."""
    block, a = call.block, call.inputs
    h, e, temb = a["hidden_states"], a["encoder_hidden_states"], a["temb"]
    if block.use_dual_attention:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_h2, gate_msa2 = block.norm1(h, emb=temb)
    else:
        norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, emb=temb)
    if block.context_pre_only:
        norm_e = block.norm1_context(e, temb)
    else:
        norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(e, emb=temb)
    assert_close(call.metric, norm_h, RTOL, ATOL, "plan metric (norm1 output)")
    texts, images, full = [], [], {"attn": [], "attn2": [], "mlp": []}
    for b in range(h.shape[0]):
        slot = call.plan.slot[b]
        blend = check_plan_merges(call, b, height, width)
        if call.merge_attn:
            image_attn, text_attn = block.attn(hidden_states=merge(norm_h[b], slot)[None],
                                               encoder_hidden_states=norm_e[b:b + 1])
            attn_out = unmerge(gate_msa[b] * image_attn[0], slot, blend, cache_row(call, "attn", b), mcw)
        else:
            image_attn, text_attn = block.attn(hidden_states=norm_h[b:b + 1], encoder_hidden_states=norm_e[b:b + 1])
            attn_out = gate_msa[b] * image_attn[0]
        hidden = h[b] + attn_out
        full["attn"].append(attn_out)
        if block.use_dual_attention:  # the second attention, merged with the block's one plan
            if call.merge_attn:
                attn2 = block.attn2(hidden_states=merge(norm_h2[b], slot)[None])[0]
                attn2_out = unmerge(gate_msa2[b] * attn2, slot, blend, cache_row(call, "attn2", b), mcw)
            else:
                attn2_out = gate_msa2[b] * block.attn2(hidden_states=norm_h2[b:b + 1])[0]
            hidden = hidden + attn2_out
            full["attn2"].append(attn2_out)
        norm2 = block.norm2(hidden) * (1 + scale_mlp[b]) + shift_mlp[b]
        if call.merge_mlp:
            ff = block.ff(merge(norm2, slot)[None])[0]
            mlp_out = unmerge(gate_mlp[b] * ff, slot, blend, cache_row(call, "mlp", b), mcw)
        else:
            mlp_out = gate_mlp[b] * block.ff(norm2[None])[0]
        images.append(hidden + mlp_out)
        full["mlp"].append(mlp_out)
        if not block.context_pre_only:  # diffusers' text stream on the attention's text output
            text = e[b] + c_gate_msa[b] * text_attn[0]
            norm_text = block.norm2_context(text) * (1 + c_scale_mlp[b]) + c_shift_mlp[b]
            texts.append(text + c_gate_mlp[b] * block.ff_context(norm_text[None])[0])
    text_out = None if block.context_pre_only else torch.stack(texts)
    return (text_out, torch.stack(images)), {k: torch.stack(v) for k, v in full.items() if v}


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def recorded():
    pipe = tiny_pipeline(SPEC)
    apply_SDTM(pipe, **SETTINGS)
    embeds = tiny_prompt_embeds(SPEC, batch=1)
    monkeypatch = pytest.MonkeyPatch()
    try:
        calls = record_merged_calls(pipe, monkeypatch, lambda: pipe(
            **embeds, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.0,
            output_type="latent", generator=torch.Generator().manual_seed(0)))
        grid = sdtm_state(pipe).grid
    finally:
        monkeypatch.undo()
        remove_SDTM(pipe)
    assert (grid.height, grid.width) == (HEIGHT // 2, WIDTH // 2)
    return calls


CASES = {
    "structure-no-cache": (Phase.STRUCTURE, False),
    "structure-cache": (Phase.STRUCTURE, True),
    "detail-cache": (Phase.DETAIL, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_block_equals_diffusers_modules_on_merged_tokens(recorded, case):
    phase, cached = CASES[case]
    calls = [c for c in recorded if c.phase is phase and bool(c.caches) == cached]
    assert calls, f"no merged {case} call happened"
    assert any(c.block.use_dual_attention for c in calls) and any(c.block.context_pre_only for c in calls)
    height, width = HEIGHT // 2, WIDTH // 2
    for index, call in enumerate(calls):
        assert call.merge_attn == (phase is Phase.STRUCTURE) and call.merge_mlp
        (text, image), full = block_oracle(call, height, width)
        got_text, got_image = call.outputs
        where = f"{case}, step {call.step}"
        assert_close(got_image, image, RTOL, ATOL, f"image output ({where})")
        if text is None:
            assert got_text is None
        else:
            assert_close(got_text, text, RTOL, ATOL, f"text output ({where})")
        assert call.stored, "a merged call stores its outputs (cache_each_step)"
        for name, stored in call.stored.items():
            assert_close(stored, full[name], RTOL, ATOL, f"stored {name} cache ({where})")
        if cached and index == 0:  # the blend is visible: without it the oracle misses the outputs
            (_, unblended), unblended_full = block_oracle(call, height, width, mcw=1.0)
            assert not torch.allclose(got_image, unblended, rtol=1e-3, atol=1e-4)
            for name in call.caches:
                assert not torch.allclose(call.stored[name], unblended_full[name], rtol=1e-3, atol=1e-4)
