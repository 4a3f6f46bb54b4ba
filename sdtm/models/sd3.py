"""SD3 / SD3.5 (``SD3Transformer2DModel``): SDTM's forward of diffusers' ``JointTransformerBlock``.

Image stream: norm1 -> plan -> [merge] -> attn (joint with the text tokens) -> [unmerge + blend +
gate + residual]; (SD3.5 dual attention: attn2 on norm1's second output, merged with the same plan);
[norm2 + modulation + merge] -> ff -> [unmerge + blend + gate + residual]. The text stream is diffusers'
own. In merged blocks the adaptive LayerNorms go through the backend's fused ops (sdtm/core/norms.py), and
without autograd the residual stream and the caches are updated in place (``engine.finish_sublayer``).

What a block does at a step was decided on the host before the transformer ran (``BlockLink``, set by
``SDTMState.prepare_blocks``); the code below reads no step or layer number, so ``torch.compile`` traces
it into a few graphs for a whole generation, the token count a dynamic size.

Blocks that do not merge at a step run diffusers' forward untouched (sdtm/core/hooks.py). The body below mirrors
``JointTransformerBlock.forward`` of diffusers 0.42 operation for operation, so a protected step (full
block, caches stored) gives the unpatched result bit for bit; tests/test_pipeline.py holds it to that.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from ..core import engine, norms
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import CallInfo, ModelAdapter, argument, latent_grid


def _feed_forward(block, x: torch.Tensor, merged: bool) -> torch.Tensor:
    if block._chunk_size is None:
        return block.ff(x)
    if not merged:
        return _chunked_feed_forward(block.ff, x, block._chunk_dim, block._chunk_size)
    # The merged token count rarely divides the chunk size: the last chunk may be shorter.
    return torch.cat([block.ff(part) for part in x.split(block._chunk_size, dim=block._chunk_dim)], block._chunk_dim)


def sd3_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.FloatTensor,
    encoder_hidden_states: torch.FloatTensor,
    temb: torch.FloatTensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    """``JointTransformerBlock.forward`` of a block that merges or is protected in this call (``link``);
    same arguments and outputs as diffusers'."""
    action = engine.begin_block(link, hidden_states)
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

    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Attention.
    attn_output, context_attn_output = self.attn(
        hidden_states=engine.merge_tokens(norm_hidden_states, attn_plan, link, ops),
        encoder_hidden_states=norm_encoder_hidden_states,
        **joint_attention_kwargs,
    )
    # Once merged for the attention, norm1's fused output is read no more: the sum can go there.
    spare = norm_hidden_states if fused_norms and attn_plan is not None else None
    hidden_states = engine.finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa, attn_plan, ops, residual_is_ours=False, spare=spare
    )

    if self.use_dual_attention:
        attn_output2 = self.attn2(
            hidden_states=engine.merge_tokens(norm_hidden_states2, attn_plan, link, ops), **joint_attention_kwargs
        )
        hidden_states = engine.finish_sublayer(
            link, "attn2", hidden_states, attn_output2, gate_msa2, attn_plan, ops, residual_is_ours=True
        )

    if fused_norms:
        ff_input = norms.norm2_merged(
            self, hidden_states, shift_mlp, scale_mlp, mlp_plan, link.state.config.pseudo_merge, ops
        )
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_input = engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    ff_output = _feed_forward(self, ff_input, mlp_plan is not None)
    hidden_states = engine.finish_sublayer(
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


class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5: joint blocks (image and text streams), the timestep in the scheduler's units, an NCHW
    latent. Attention (and SD3.5's second attention) merge in the structure phase, the MLP in both."""

    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    block_forwards = {"JointTransformerBlock": sd3_block_forward}

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        names = {"attn": "attn", "attn2": "attn", "mlp": "mlp"}
        if not getattr(block, "use_dual_attention", False):
            del names["attn2"]
        return names

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 3)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        height, width = latent_grid(transformer, hidden_states)
        return CallInfo(timestep, height, width, hidden_states.shape[0], hidden_states.device)
