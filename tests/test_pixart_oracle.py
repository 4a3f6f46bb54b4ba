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

import pytest
import torch

from oracle_support import (
    ATOL, MCW, RTOL, STEPS, BlockCall, cache_row, check_blend_visible, check_plan_merges, check_stored_caches,
    merge, record_generation, unmerge,
)
from support import assert_close
from sdtm.core.schedule import Phase
from sdtm.models.pixart import TinyPixArtSpec, tiny_pixart_pipeline, tiny_pixart_prompt_embeds

SPEC = TinyPixArtSpec()
HEIGHT, WIDTH = 64, 64  # a 32 x 32 token grid: 1024 tokens, 256 windows of 2 x 2


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
    embeds = tiny_pixart_prompt_embeds(SPEC, batch=1)
    embeds["prompt_attention_mask"][:, -2:] = 0  # cross-attention sees a real text mask
    return record_generation(pipe, lambda: pipe(
        **embeds, negative_prompt=None, use_resolution_binning=False, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=4.5, output_type="latent",
        generator=torch.Generator().manual_seed(0)), HEIGHT, WIDTH)


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
        check_stored_caches(call, full, where)
        if cached and index == 0:  # the blend is visible: without it the oracle misses the outputs
            unblended, unblended_full = block_oracle(call, height, width, mcw=1.0)
            check_blend_visible(call, call.outputs, unblended, unblended_full)
