"""PixArt-alpha / Sigma (``PixArtTransformer2DModel``): SDTM's forward of diffusers' ``BasicTransformerBlock``
with ``norm_type="ada_norm_single"``.

Image tokens only flow through the blocks (text enters through cross-attention):
norm1 + modulation -> plan -> [merge] -> self-attention -> [unmerge + blend + gate + residual];
[merge the residual stream] -> cross-attention (image queries, text keys) -> [unmerge + blend + residual];
norm2 + modulation -> [merge] -> feed-forward -> [unmerge + blend + gate + residual].
Self- and cross-attention are attention sub-layers (merged in the structure phase), the feed-forward merges
in both phases; one plan per block, from norm1's output. Cross-attention treats each query on its own,
so a merged query is the mean of its group's queries and its output goes back to every member.

Blocks that do not merge at a step run diffusers' forward untouched (sdtm/core/hooks.py); the merged path below follows
``BasicTransformerBlock.forward`` of diffusers 0.42 for the ada_norm_single case operation for
operation, so a protected step gives the unpatched result bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from ..core import engine
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import CallInfo, ModelAdapter, argument, latent_grid


def pixart_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels: torch.LongTensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """PixArt ``BasicTransformerBlock.forward`` of a block that merges or is protected in this call
    (``link``); same arguments and output as diffusers'."""
    action = engine.begin_block(link, hidden_states)
    if attention_mask is not None:
        raise ValueError("SDTM cannot merge tokens under a self-attention mask; call without attention_mask.")

    ops = link.state.ops
    batch_size = hidden_states.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
    ).chunk(6, dim=1)
    norm_hidden_states = self.norm1(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    if cross_attention_kwargs.pop("gligen", None) is not None:
        raise ValueError("SDTM does not support GLIGEN inputs in PixArt blocks.")

    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Self-attention on (merged) image tokens; gates are [B, 1, C] here, the ops take [B, C].
    attn_output = self.attn1(
        engine.merge_tokens(norm_hidden_states, attn_plan, link, ops),
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=None,
        **cross_attention_kwargs,
    )
    hidden_states = engine.finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa[:, 0], attn_plan, ops, residual_is_ours=False,
        output_first=True,
    )

    # Cross-attention: PixArt applies no norm before it; the residual stream is the query.
    if self.attn2 is not None:
        attn_output = self.attn2(
            engine.merge_tokens(hidden_states, attn_plan, link, ops),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = engine.finish_sublayer(
            link, "cross", hidden_states, attn_output, None, attn_plan, ops, residual_is_ours=True,
            output_first=True,
        )

    norm_hidden_states = self.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
    ff_input = engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    if self._chunk_size is None:
        ff_output = self.ff(ff_input)
    elif mlp_plan is None:
        ff_output = _chunked_feed_forward(self.ff, ff_input, self._chunk_dim, self._chunk_size)
    else:  # the merged token count rarely divides the chunk size: the last chunk may be shorter
        parts = ff_input.split(self._chunk_size, dim=self._chunk_dim)
        ff_output = torch.cat([self.ff(part) for part in parts], self._chunk_dim)
    return engine.finish_sublayer(
        link, "mlp", hidden_states, ff_output, gate_mlp[:, 0], mlp_plan, ops, residual_is_ours=True,
        output_first=True,
    )


class PixArtAdapter(ModelAdapter):
    """PixArt-alpha / Sigma: blocks of image tokens only, the timestep (integer scheduler units) as the
    third argument, an NCHW latent."""

    name = "pixart"
    transformer_class = "PixArtTransformer2DModel"
    block_forwards = {"BasicTransformerBlock": pixart_block_forward}
    structure_share = 0.4  # unvalidated on real weights (README)

    def check_block(self, block: torch.nn.Module) -> None:
        if getattr(block, "norm_type", None) != "ada_norm_single" or getattr(block, "pos_embed", None) is not None:
            raise ValueError(
                "SDTM supports PixArt blocks with norm_type='ada_norm_single' and no block positional "
                f"embedding; this one has norm_type={getattr(block, 'norm_type', None)!r}."
            )

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        names = {"attn": "attn", "cross": "attn", "mlp": "mlp"}
        if block.attn2 is None:
            del names["cross"]
        return names

    def channels(self, transformer: torch.nn.Module) -> int:
        return transformer.inner_dim

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 2)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        height, width = latent_grid(transformer, hidden_states)
        return CallInfo(timestep, height, width, hidden_states.shape[0], hidden_states.device)
