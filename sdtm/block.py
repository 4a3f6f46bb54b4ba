"""SDTM's forward of diffusers' ``JointTransformerBlock``: where image tokens are merged and unmerged.

Image stream: norm1 -> plan -> [merge] -> attn (joint with the text tokens) -> [unmerge + blend +
gate + residual]; (SD3.5 dual attention: attn2 on norm1's second output, merged with the same plan);
[norm2 + modulation + merge] -> ff -> [unmerge + blend + gate + residual]. The text stream is diffusers'
own. In merged blocks the adaptive LayerNorms go through the backend's fused ops (sdtm/norms.py), and
without autograd the residual stream and the caches are updated in place (``finish_sublayer``).

What a block does at a step was decided on the host before the transformer ran (``BlockLink``, set by
``SDTMState.prepare_blocks``); the code below reads no step or layer number, so ``torch.compile`` traces
it into a few graphs for a whole generation, the token count a dynamic size.

Blocks that do not merge at a step run the original forward untouched. The body below mirrors
``JointTransformerBlock.forward`` of diffusers 0.42 operation for operation, so a protected step (full
block, caches stored) gives the unpatched result bit for bit; tests/test_pipeline.py holds it to that.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from . import norms
from .ops import OpSet
from .plans import (
    MergePlan,
    advance_merge_age_,
    idm_candidates,
    idm_destinations,
    merge_age_priority,
)
from .schedule import BlockMode, Phase
from .state import BlockLink


@torch.no_grad()
def compute_plan(link: BlockLink, metric: torch.Tensor, ops: OpSet) -> MergePlan:
    """The block's merge plan from its normalised, modulated image tokens ``metric`` [B, N, C]; advances
    the merge age T of the current call stream in place."""
    state, action, age = link.state, link.action, link.stream.merge_age
    config, grid = state.config, state.grid
    batch = metric.shape[0]
    reduce_num = link.remove.shape[0]  # a dynamic size under torch.compile, not a constant per step
    priority = merge_age_priority(age)  # all zero until a merge happens: adds nothing to the scores
    if link.dst_draw is not None:
        drawn = link.dst_draw
    else:
        drawn = torch.zeros(batch, grid.num_windows, dtype=torch.int64, device=metric.device)

    if action.phase is Phase.STRUCTURE:
        scores = ops.window_scores(metric, priority, grid.height, grid.width, grid.sy, grid.sx, config.a_s)
        plan = ops.ssm_plan(scores, grid, reduce_num, drawn, config.pseudo_merge)
    else:
        dst_position = idm_destinations(grid, age if link.age_exists else None, drawn)
        src_idx, dst_idx = idm_candidates(grid, dst_position)
        score, best = ops.bipartite_match(metric, src_idx, dst_idx, priority, config.a_d)
        plan = ops.idm_plan(grid, reduce_num, src_idx, dst_idx, score, best, config.pseudo_merge)
    advance_merge_age_(age, plan)
    return plan


def merge_tokens(x: torch.Tensor, plan: MergePlan | None, link: BlockLink, ops: OpSet) -> torch.Tensor:
    """``x`` [B, N, C] merged to [B, M, C] with ``plan``, or unchanged when there is no plan."""
    if plan is None:
        return x
    return ops.merge(x, plan.slot, plan.members, plan.offsets, link.state.config.pseudo_merge)


def finish_sublayer(
    link: BlockLink,
    name: str,
    residual: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    plan: MergePlan | None,
    ops: OpSet,
    residual_is_ours: bool,
    spare: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + gate * y`` [B, N, C], with y [B, M, C] unmerged (and blended with the sub-layer's
    cache) when ``plan`` is given; stores the full output into the cache buffer when the block's action
    says so.

    Without autograd no fresh [B, N, C] buffer is needed: the sum is written into ``residual`` itself
    when ``residual_is_ours`` (a tensor this forward made, not the block's input), else into ``spare``
    (a [B, N, C] tensor of this forward that nothing reads any more) when given."""
    in_place = not torch.is_grad_enabled()
    cache_out = link.cache_out.get(name)
    if plan is None:
        y = gate.unsqueeze(1) * y
        if cache_out is not None:
            cache_out.copy_(y.detach())
        if in_place and residual_is_ours:
            return residual.add_(y)
        return residual + y
    mcw = link.state.config.mcw
    cache = link.cache_in.get(name)
    if not in_place:
        out, new_cache = ops.unmerge(y, plan.slot, plan.blend, cache, gate, residual, mcw, cache_out is not None)
        if cache_out is not None:
            cache_out.copy_(new_cache.detach())
        return out
    if residual_is_ours:
        out = residual
    elif spare is not None and spare.shape == residual.shape and spare.dtype == residual.dtype:
        out = spare
    else:
        out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    ops.unmerge_into(y, plan.slot, plan.blend, cache, gate, residual, mcw, out, cache_out)
    return out


def _feed_forward(block, x: torch.Tensor, merged: bool) -> torch.Tensor:
    if block._chunk_size is None:
        return block.ff(x)
    if not merged:
        return _chunked_feed_forward(block.ff, x, block._chunk_dim, block._chunk_size)
    # The merged token count rarely divides the chunk size: the last chunk may be shorter.
    return torch.cat([block.ff(part) for part in x.split(block._chunk_size, dim=block._chunk_dim)], block._chunk_dim)


def sdtm_block_forward(
    self,
    hidden_states: torch.FloatTensor,
    encoder_hidden_states: torch.FloatTensor,
    temb: torch.FloatTensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    """Forward of a patched ``JointTransformerBlock``; same signature and outputs as diffusers'."""
    link: BlockLink = self._sdtm
    action = link.action
    if action is None:
        raise RuntimeError(
            "an SDTM-patched block was called outside its transformer's forward; call the transformer."
        )
    grid = link.state.grid
    if hidden_states.shape[1] != grid.num_tokens:
        raise ValueError(
            f"the block got {hidden_states.shape[1]} image tokens but the latent grid is "
            f"{grid.height}x{grid.width}={grid.num_tokens} tokens."
        )
    if action.mode is BlockMode.UNCHANGED:
        if action.reset_merge_age:  # a protected layer: the next merge starts T afresh
            link.stream.merge_age.zero_()
        return self._sdtm_parent.forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)

    joint_attention_kwargs = joint_attention_kwargs or {}
    ops = link.state.ops
    # Merged blocks normalise through the fused ops; protected blocks run diffusers' modules (bit for bit).
    fused_norms = action.mode is BlockMode.MERGED and norms.fusable(self)
    norm1_outputs = norms.norm1(self, hidden_states, temb, ops) if fused_norms else self.norm1(hidden_states, emb=temb)
    if self.use_dual_attention:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = norm1_outputs
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1_outputs

    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )

    plan = compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Attention.
    attn_output, context_attn_output = self.attn(
        hidden_states=merge_tokens(norm_hidden_states, attn_plan, link, ops),
        encoder_hidden_states=norm_encoder_hidden_states,
        **joint_attention_kwargs,
    )
    # Once merged for the attention, norm1's fused output is read no more: the sum can go there.
    spare = norm_hidden_states if fused_norms and attn_plan is not None else None
    hidden_states = finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa, attn_plan, ops, residual_is_ours=False, spare=spare
    )

    if self.use_dual_attention:
        attn_output2 = self.attn2(
            hidden_states=merge_tokens(norm_hidden_states2, attn_plan, link, ops), **joint_attention_kwargs
        )
        hidden_states = finish_sublayer(
            link, "attn2", hidden_states, attn_output2, gate_msa2, attn_plan, ops, residual_is_ours=True
        )

    if fused_norms:
        ff_input = norms.norm2_merged(
            self, hidden_states, shift_mlp, scale_mlp, mlp_plan, link.state.config.pseudo_merge, ops
        )
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_input = merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    ff_output = _feed_forward(self, ff_input, mlp_plan is not None)
    hidden_states = finish_sublayer(
        link, "mlp", hidden_states, ff_output, gate_mlp, mlp_plan, ops, residual_is_ours=True
    )

    # Process attention outputs for the `encoder_hidden_states` (diffusers' text stream, unchanged).
    if self.context_pre_only:
        encoder_hidden_states = None
    else:
        context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
        encoder_hidden_states = encoder_hidden_states + context_attn_output

        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        if self._chunk_size is not None:
            context_ff_output = _chunked_feed_forward(
                self.ff_context, norm_encoder_hidden_states, self._chunk_dim, self._chunk_size
            )
        else:
            context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output

    return encoder_hidden_states, hidden_states
