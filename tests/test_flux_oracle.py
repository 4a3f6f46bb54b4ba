"""An independent oracle of SDTM's merged Flux.1 blocks.

A tiny FluxPipeline runs one generation with SDTM (torch backend, no randomness, no step protection), and
every merged block call is recorded: its inputs and outputs, the plan SDTM used, the caches it read and the
caches it stored. Each call is then recomputed from diffusers' own sub-modules (norm1 / norm1_context /
attn / norm2 / ff of the double-stream block; norm / attn / proj_mlp / act_mlp / proj_out of the
single-stream block) applied to tokens merged here by group means over the plan's slots, with every
merged token at the rotary rows of its window's first token (the destination without randomness), the
outputs unmerged, blended with the cache (``mcw * y + (1 - mcw) * cache`` on blended rows), gated and
added to the residual as the SPEC says. Nothing of sdtm/models/flux.py or sdtm/core/reference.py is used
to recompute.

Covered: the double-stream block in the structure phase (attention and MLP merged) with and without a
cache, the double-stream block in the detail phase (MLP merged, attention on all tokens), the
single-stream block in the structure phase (text + merged image through attention and the MLP branch,
the projection's image rows unmerged) with and without a cache.
"""

from __future__ import annotations

import pytest
import torch

from oracle_support import (
    ATOL, MCW, RTOL, STEPS, BlockCall, cache_row, check_blend_visible, check_plan_merges, check_stored_caches,
    destinations, merge, record_generation, unmerge,
)
from support import assert_close
from sdtm.core.schedule import Phase
from sdtm.models.flux import TinyFluxSpec, tiny_flux_pipeline, tiny_flux_prompt_embeds

SPEC = TinyFluxSpec()
HEIGHT, WIDTH = 64, 48  # a 32 x 24 token grid: 768 tokens, 192 windows of 2 x 2


def rotary_rows(rotary, slot: torch.Tensor, text_tokens: int):
    """(cos, sin) [T + M, D] of the sequence [text, merged image]: each merged token at its destination's row."""
    anchor = text_tokens + destinations(slot)
    return tuple(torch.cat([table[:text_tokens], table[anchor]]) for table in rotary)


@torch.no_grad()
def double_block_oracle(call: BlockCall, height: int, width: int, mcw: float = MCW):
    """(text output, image output) of a merged FluxTransformerBlock call, and the full sub-layer outputs."""
    block, a = call.block, call.inputs
    h, e, temb, rotary = a["hidden_states"], a["encoder_hidden_states"], a["temb"], a["image_rotary_emb"]
    norm_h, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, emb=temb)
    norm_e, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(e, emb=temb)
    assert_close(call.metric, norm_h, RTOL, ATOL, "plan metric (norm1 output)")
    text_tokens = e.shape[1]
    texts, images, full = [], [], {"attn": [], "mlp": []}
    for b in range(h.shape[0]):
        slot = call.plan.slot[b]
        blend = check_plan_merges(call, b, height, width)
        if call.merge_attn:
            image_attn, text_attn = block.attn(
                hidden_states=merge(norm_h[b], slot)[None], encoder_hidden_states=norm_e[b:b + 1],
                image_rotary_emb=rotary_rows(rotary, slot, text_tokens),
            )
            attn_out = unmerge(gate_msa[b] * image_attn[0], slot, blend, cache_row(call, "attn", b), mcw)
        else:
            image_attn, text_attn = block.attn(
                hidden_states=norm_h[b:b + 1], encoder_hidden_states=norm_e[b:b + 1], image_rotary_emb=rotary
            )
            attn_out = gate_msa[b] * image_attn[0]
        hidden = h[b] + attn_out
        norm2 = block.norm2(hidden) * (1 + scale_mlp[b]) + shift_mlp[b]
        if call.merge_mlp:
            ff = block.ff(merge(norm2, slot)[None])[0]
            mlp_out = unmerge(gate_mlp[b] * ff, slot, blend, cache_row(call, "mlp", b), mcw)
        else:
            mlp_out = gate_mlp[b] * block.ff(norm2[None])[0]
        images.append(hidden + mlp_out)
        full["attn"].append(attn_out)
        full["mlp"].append(mlp_out)
        # The text stream: diffusers' arithmetic on the attention's text output (which saw merged tokens).
        text = e[b] + c_gate_msa[b] * text_attn[0]
        norm_text = block.norm2_context(text) * (1 + c_scale_mlp[b]) + c_shift_mlp[b]
        texts.append(text + c_gate_mlp[b] * block.ff_context(norm_text[None])[0])
    return (torch.stack(texts), torch.stack(images)), {k: torch.stack(v) for k, v in full.items()}


@torch.no_grad()
def single_block_oracle(call: BlockCall, height: int, width: int, mcw: float = MCW):
    """(text output, image output) of a merged FluxSingleTransformerBlock call, and the block's full image
    output before the residual ("parallel")."""
    block, a = call.block, call.inputs
    h, e, temb, rotary = a["hidden_states"], a["encoder_hidden_states"], a["temb"], a["image_rotary_emb"]
    text_tokens = e.shape[1]
    norm_all, gate = block.norm(torch.cat([e, h], dim=1), emb=temb)
    norm_text, norm_image = norm_all[:, :text_tokens], norm_all[:, text_tokens:]
    assert_close(call.metric, norm_image, RTOL, ATOL, "plan metric (norm output, image rows)")
    assert call.merge_attn
    texts, images, full = [], [], []
    for b in range(h.shape[0]):
        slot = call.plan.slot[b]
        blend = check_plan_merges(call, b, height, width)
        sequence = torch.cat([norm_text[b], merge(norm_image[b], slot)])[None]  # [1, T + M, C]
        attn = block.attn(hidden_states=sequence, image_rotary_emb=rotary_rows(rotary, slot, text_tokens))
        mlp = block.act_mlp(block.proj_mlp(sequence))
        projected = gate[b] * block.proj_out(torch.cat([attn, mlp], dim=2))[0]
        texts.append(e[b] + projected[:text_tokens])
        out = unmerge(projected[text_tokens:], slot, blend, cache_row(call, "parallel", b), mcw)
        images.append(h[b] + out)
        full.append(out)
    return (torch.stack(texts), torch.stack(images)), {"parallel": torch.stack(full)}


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def recorded():
    pipe = tiny_flux_pipeline(SPEC)
    embeds = tiny_flux_prompt_embeds(SPEC, batch=2)
    return record_generation(pipe, lambda: pipe(
        **embeds, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.5,
        output_type="latent", generator=torch.Generator().manual_seed(0)), HEIGHT, WIDTH)


def _kind(call: BlockCall) -> str:
    return "single" if type(call.block).__name__ == "FluxSingleTransformerBlock" else "double"


CASES = {
    "double-structure-no-cache": ("double", Phase.STRUCTURE, False),
    "double-structure-cache": ("double", Phase.STRUCTURE, True),
    "double-detail-cache": ("double", Phase.DETAIL, True),
    "single-structure-no-cache": ("single", Phase.STRUCTURE, False),
    "single-structure-cache": ("single", Phase.STRUCTURE, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_merged_block_equals_diffusers_modules_on_merged_tokens(recorded, case):
    kind, phase, cached = CASES[case]
    calls = [c for c in recorded if _kind(c) == kind and c.phase is phase and bool(c.caches) == cached]
    assert calls, f"no merged {case} call happened"
    height, width = HEIGHT // 2, WIDTH // 2
    oracle = double_block_oracle if kind == "double" else single_block_oracle
    for index, call in enumerate(calls):
        if kind == "double":
            assert call.merge_attn == (phase is Phase.STRUCTURE) and call.merge_mlp
        (text, image), full = oracle(call, height, width)
        got_text, got_image = call.outputs
        where = f"{case}, step {call.step}"
        assert_close(got_image, image, RTOL, ATOL, f"image output ({where})")
        assert_close(got_text, text, RTOL, ATOL, f"text output ({where})")
        check_stored_caches(call, full, where)
        if cached and index == 0:  # the blend is visible: without it the oracle misses the outputs
            (_, unblended), unblended_full = oracle(call, height, width, mcw=1.0)
            check_blend_visible(call, got_image, unblended, unblended_full)
