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

import pytest
import torch

from oracle_support import (
    ATOL, MCW, RTOL, STEPS, BlockCall, cache_row, check_blend_visible, check_plan_merges, check_stored_caches,
    merge, record_generation, unmerge,
)
from support import SD35_SPEC, assert_close
from sdtm.core.schedule import Phase
from sdtm.models.sd3 import tiny_pipeline, tiny_prompt_embeds

SPEC = SD35_SPEC
HEIGHT, WIDTH = 64, 64  # a 32 x 32 token grid: 1024 tokens, 256 windows of 2 x 2


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
    embeds = tiny_prompt_embeds(SPEC, batch=1)
    return record_generation(pipe, lambda: pipe(
        **embeds, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.0,
        output_type="latent", generator=torch.Generator().manual_seed(0)), HEIGHT, WIDTH)


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
        check_stored_caches(call, full, where)
        if cached and index == 0:  # the blend is visible: without it the oracle misses the outputs
            (_, unblended), unblended_full = block_oracle(call, height, width, mcw=1.0)
            check_blend_visible(call, got_image, unblended, unblended_full)
