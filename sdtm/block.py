"""SDTM's forward of diffusers' ``JointTransformerBlock``: where image tokens are merged and unmerged.

Image stream: norm1 -> plan -> [merge] -> attn (joint with the text tokens) -> [unmerge + blend +
gate + residual]; (SD3.5 dual attention: attn2 on norm1's second output, merged with the same plan);
[norm2 + modulation + merge] -> ff -> [unmerge + blend + gate + residual]. The text stream is diffusers'
own. In merged blocks the adaptive LayerNorms go through the backend's fused ops (sdtm/norms.py), and
without autograd the residual stream and the caches are updated in place (``_Merger.finish``).

Blocks that do not merge at a step run the original forward untouched. The body below mirrors
``JointTransformerBlock.forward`` of diffusers 0.42 operation for operation, so a protected step (full
block, caches stored) gives the unpatched result bit for bit; tests/test_pipeline.py holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from . import norms
from .ops import OpSet, ops_for
from .plans import (
    MergePlan,
    idm_candidates,
    idm_destinations,
    merge_age_priority,
    random_or_first_positions,
    update_merge_age,
)
from .schedule import BlockAction, BlockMode, Phase, block_action
from .state import SDTMState, StepRecord


@dataclass
class BlockLink:
    """What a patched block knows: the shared state and its own layer index."""

    state: SDTMState
    layer: int


@torch.no_grad()
def compute_plan(state: SDTMState, action: BlockAction, metric: torch.Tensor, ops: OpSet) -> MergePlan:
    """The block's merge plan from its normalised, modulated image tokens ``metric`` [B, N, C]; updates
    the merge age T of the current call stream."""
    config, grid, stream = state.config, state.grid, state.stream
    batch, num_tokens, _ = metric.shape
    age = stream.merge_age
    if age is not None and tuple(age.shape) != (batch, num_tokens):
        raise ValueError(
            f"the merge age has shape {tuple(age.shape)} but this call has batch {batch} and {num_tokens} "
            "tokens; batch and image size must stay fixed within a generation."
        )
    # With an odd batch, conditional and unconditional samples cannot pair up: randomness off.
    use_rand = config.use_rand and batch % 2 == 0
    generator = state.random_generator(metric.device) if use_rand else None
    priority = merge_age_priority(age)
    k, num_windows = grid.window_size, grid.num_windows

    if action.phase is Phase.STRUCTURE:
        scores = ops.window_scores(metric, priority, grid.height, grid.width, grid.sy, grid.sx, config.a_s)
        dst_position = random_or_first_positions(batch, num_windows, k, use_rand, generator, metric.device)
        plan = ops.ssm_plan(scores, grid, action.reduce_num, dst_position, config.pseudo_merge)
    else:
        fallback = None
        if age is None:
            fallback = random_or_first_positions(batch, num_windows, k, use_rand, generator, metric.device)
        dst_position = idm_destinations(grid, age, fallback)
        src_idx, dst_idx = idm_candidates(grid, dst_position)
        if num_windows > 0:
            score, best = ops.bipartite_match(metric, src_idx, dst_idx, priority, config.a_d)
        else:
            score = torch.zeros(batch, 0, device=metric.device)
            best = torch.zeros(batch, 0, dtype=torch.int64, device=metric.device)
        plan = ops.idm_plan(grid, action.reduce_num, src_idx, dst_idx, score, best, config.pseudo_merge)
    stream.merge_age = update_merge_age(age, plan)
    return plan


class _Merger:
    """Merge / unmerge of one block call with one plan; unmerge blends with and refreshes the caches."""

    def __init__(self, state: SDTMState, layer: int, plan: MergePlan | None, ops: OpSet):
        self.state, self.layer, self.plan, self.ops = state, layer, plan, ops

    def merge(self, x: torch.Tensor, active: bool) -> torch.Tensor:
        if not active:
            return x
        plan = self.plan
        return self.ops.merge(x, plan.slot, plan.members, plan.offsets, self.state.config.pseudo_merge)

    def finish(
        self, residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, name: str, merged: bool, store: bool,
        residual_is_ours: bool, spare: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``residual + gate * y`` with y unmerged (and blended) when ``merged``; stores the cache.

        Without autograd no fresh [B, N, C] buffer is needed: the sum is written into ``residual`` itself
        when ``residual_is_ours`` (a tensor this forward made, not the block's input), else into ``spare``
        (a [B, N, C] tensor of this forward that nothing reads any more) when given; a stored cache is
        refreshed in place (a cache that is not stored again stays as it is for later steps)."""
        in_place = not torch.is_grad_enabled()
        if not merged:
            y = gate.unsqueeze(1) * y
            if store:
                self.state.store_cache(name, self.layer, y)
            if in_place and residual_is_ours:
                return residual.add_(y)
            return residual + y
        plan, mcw = self.plan, self.state.config.mcw
        cache = self.state.cache(name, self.layer, residual)
        if not in_place:
            out, new_cache = self.ops.unmerge(y, plan.slot, plan.blend, cache, gate, residual, mcw, store)
            if store:
                self.state.store_cache(name, self.layer, new_cache)
            return out
        if residual_is_ours:
            out = residual
        elif spare is not None and spare.shape == residual.shape and spare.dtype == residual.dtype:
            out = spare
        else:
            out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
        cache_out = None
        if store:
            cache_out = cache if cache is not None else torch.empty(out.shape, dtype=out.dtype, device=out.device)
            self.state.store_cache(name, self.layer, cache_out)
        self.ops.unmerge_into(y, plan.slot, plan.blend, cache, gate, residual, mcw, out, cache_out)
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
    state = link.state
    if state.grid is None:
        raise RuntimeError(
            "an SDTM-patched block was called outside its transformer's forward; call the transformer."
        )
    num_tokens = hidden_states.shape[1]
    if num_tokens != state.grid.num_tokens:
        raise ValueError(
            f"the block got {num_tokens} image tokens but the latent grid is "
            f"{state.grid.height}x{state.grid.width}={state.grid.num_tokens} tokens."
        )
    action = block_action(
        state.config, state.step, state.num_steps, link.layer, state.num_layers, num_tokens, state.grid.num_windows
    )
    if action.reset_merge_age:
        state.stream.merge_age = None
    if action.mode is BlockMode.UNCHANGED:
        _record(state, link.layer, action, num_tokens, num_tokens)
        return self._sdtm_parent.forward(self, hidden_states, encoder_hidden_states, temb, joint_attention_kwargs)

    joint_attention_kwargs = joint_attention_kwargs or {}
    ops = ops_for(state.config.backend, hidden_states.device)
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

    plan = compute_plan(state, action, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    merger = _Merger(state, link.layer, plan, ops)
    merge_attn, merge_mlp = action.merge_attn, action.merge_mlp

    # Attention.
    attn_output, context_attn_output = self.attn(
        hidden_states=merger.merge(norm_hidden_states, merge_attn),
        encoder_hidden_states=norm_encoder_hidden_states,
        **joint_attention_kwargs,
    )
    # Once merged for the attention, norm1's fused output is read no more: the sum can go there.
    spare = norm_hidden_states if fused_norms and merge_attn else None
    hidden_states = merger.finish(
        hidden_states, attn_output, gate_msa, "attn", merge_attn, action.store_attn_cache, residual_is_ours=False,
        spare=spare,
    )

    if self.use_dual_attention:
        attn_output2 = self.attn2(
            hidden_states=merger.merge(norm_hidden_states2, merge_attn), **joint_attention_kwargs
        )
        hidden_states = merger.finish(
            hidden_states, attn_output2, gate_msa2, "attn2", merge_attn, action.store_attn_cache, residual_is_ours=True
        )

    if fused_norms:
        mlp_plan = plan if merge_mlp else None
        ff_input = norms.norm2_merged(
            self, hidden_states, shift_mlp, scale_mlp, mlp_plan, state.config.pseudo_merge, ops
        )
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_input = merger.merge(norm_hidden_states, merge_mlp)
    ff_output = _feed_forward(self, ff_input, merge_mlp)
    hidden_states = merger.finish(
        hidden_states, ff_output, gate_mlp, "mlp", merge_mlp, action.store_mlp_cache, residual_is_ours=True
    )

    merged_tokens = plan.num_merged if plan is not None else num_tokens
    _record(
        state,
        link.layer,
        action,
        merged_tokens if merge_attn else num_tokens,
        merged_tokens if merge_mlp else num_tokens,
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


def _record(state: SDTMState, layer: int, action: BlockAction, attn_tokens: int, mlp_tokens: int) -> None:
    state.records.append(
        StepRecord(state.step, layer, action.mode.value, action.phase.value, attn_tokens, mlp_tokens)
    )
