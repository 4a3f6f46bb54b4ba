"""An independent oracle of SDTM's merged PixArt blocks.

A tiny PixArtSigmaPipeline (classifier-free guidance: batch 2 in the transformer; the prompt's last text
tokens masked out) runs one generation with SDTM (torch backend, no randomness, no step protection), and
every merged block call is recorded: its inputs and outputs, the plan SDTM used, the caches it read and the
caches it stored. Each call is then recomputed from diffusers' own sub-modules of the
``BasicTransformerBlock`` (norm1, attn1, attn2, norm2, ff, scale_shift_table) applied to tokens merged here
by group means over the plan's slots, the outputs unmerged, blended with the cache
(``mcw * y + (1 - mcw) * cache`` on blended rows), gated and added to the residual as the SPEC says.
Nothing of sdtm/models/pixart.py or sdtm/core/reference.py is used to recompute.

Covered: the structure phase with and without a cache (self-attention on merged tokens; cross-attention
with merged image queries against all text tokens under the text mask; the MLP on merged tokens) and the
detail phase (both attentions on all tokens, the MLP merged) with a cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from support import assert_close
from sdtm.core.hooks import attached_hook
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core import engine
from sdtm.core.schedule import Phase
from sdtm.tiny import TinyPixArtSpec, tiny_pixart_pipeline, tiny_pixart_prompt_embeds

SPEC = TinyPixArtSpec()
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
    """The output of a merged PixArt block call, and the full outputs of its sub-layers."""
    block, a = call.block, call.inputs
    h, text, text_mask, timestep = (a["hidden_states"], a["encoder_hidden_states"], a["encoder_attention_mask"],
                                    a["timestep"])
    assert a["attention_mask"] is None and not block.only_cross_attention
    batch = h.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)
    ).chunk(6, dim=1)  # [B, 1, C] each
    norm1 = block.norm1(h) * (1 + scale_msa) + shift_msa
    assert_close(call.metric, norm1, RTOL, ATOL, "plan metric (norm1 output)")
    outputs, full = [], {"attn": [], "cross": [], "mlp": []}
    for b in range(batch):
        slot = call.plan.slot[b]
        blend = check_plan_merges(call, b, height, width)
        mask = None if text_mask is None else text_mask[b:b + 1]
        if call.merge_attn:
            attn = block.attn1(merge(norm1[b], slot)[None], encoder_hidden_states=None, attention_mask=None)[0]
            attn_out = unmerge(gate_msa[b] * attn, slot, blend, cache_row(call, "attn", b), mcw)
        else:
            attn_out = gate_msa[b] * block.attn1(norm1[b:b + 1], encoder_hidden_states=None, attention_mask=None)[0]
        hidden = attn_out + h[b]
        # Cross-attention: the residual stream is the query (PixArt applies no norm here).
        if call.merge_attn:
            cross = block.attn2(merge(hidden, slot)[None], encoder_hidden_states=text[b:b + 1],
                                attention_mask=mask)[0]
            cross_out = unmerge(cross, slot, blend, cache_row(call, "cross", b), mcw)
        else:
            cross_out = block.attn2(hidden[None], encoder_hidden_states=text[b:b + 1], attention_mask=mask)[0]
        hidden = cross_out + hidden
        norm2 = block.norm2(hidden) * (1 + scale_mlp[b]) + shift_mlp[b]
        if call.merge_mlp:
            ff = block.ff(merge(norm2, slot)[None])[0]
            mlp_out = unmerge(gate_mlp[b] * ff, slot, blend, cache_row(call, "mlp", b), mcw)
        else:
            mlp_out = gate_mlp[b] * block.ff(norm2[None])[0]
        outputs.append(mlp_out + hidden)
        for name, value in (("attn", attn_out), ("cross", cross_out), ("mlp", mlp_out)):
            full[name].append(value)
    return torch.stack(outputs), {k: torch.stack(v) for k, v in full.items()}


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def recorded():
    pipe = tiny_pixart_pipeline(SPEC)
    apply_SDTM(pipe, **SETTINGS)
    embeds = tiny_pixart_prompt_embeds(SPEC, batch=1)
    embeds["prompt_attention_mask"][:, -2:] = 0  # cross-attention sees a real text mask
    monkeypatch = pytest.MonkeyPatch()
    try:
        calls = record_merged_calls(pipe, monkeypatch, lambda: pipe(
            **embeds, negative_prompt=None, use_resolution_binning=False, height=HEIGHT, width=WIDTH,
            num_inference_steps=STEPS, guidance_scale=4.5, output_type="latent",
            generator=torch.Generator().manual_seed(0)))
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
    height, width = HEIGHT // 2, WIDTH // 2
    for index, call in enumerate(calls):
        assert call.merge_attn == (phase is Phase.STRUCTURE) and call.merge_mlp
        mask = call.inputs["encoder_attention_mask"]
        assert mask is not None and bool((mask < 0).any())  # the bias of the masked text tokens
        if cached:
            expected_caches = {"attn", "cross", "mlp"} if phase is Phase.STRUCTURE else {"mlp"}
            assert set(call.caches) == expected_caches
        expected, full = block_oracle(call, height, width)
        where = f"{case}, step {call.step}"
        assert_close(call.outputs, expected, RTOL, ATOL, f"block output ({where})")
        assert call.stored, "a merged call stores its outputs (cache_each_step)"
        for name, stored in call.stored.items():
            assert_close(stored, full[name], RTOL, ATOL, f"stored {name} cache ({where})")
        if cached and index == 0:  # the blend is visible: without it the oracle misses the outputs
            unblended, unblended_full = block_oracle(call, height, width, mcw=1.0)
            assert not torch.allclose(call.outputs, unblended, rtol=1e-3, atol=1e-4)
            for name in call.caches:
                assert not torch.allclose(call.stored[name], unblended_full[name], rtol=1e-3, atol=1e-4)
