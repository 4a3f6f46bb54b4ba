"""The image stream's adaptive LayerNorms of a ``JointTransformerBlock``, through the backend's
``norm_modulate`` ops: a merged block normalises and modulates its N tokens in one pass (norm1), and
normalises, modulates and merges them in one pass before the MLP (norm2), instead of diffusers' three
N-token passes and buffers each. The torch twins run diffusers' op sequence, so the torch backend gives
the same bits as the modules.
"""

from __future__ import annotations

import torch
from diffusers.models.normalization import AdaLayerNormZero, SD35AdaLayerNormZeroX

from .opset import OpSet
from .plans import MergePlan


def plain_layer_norm(norm: torch.nn.Module) -> bool:
    return type(norm) is torch.nn.LayerNorm and norm.weight is None and norm.bias is None


def fusable(block: torch.nn.Module) -> bool:
    """Whether the block's norm1 and norm2 are diffusers' adaptive LayerNorms over a plain LayerNorm
    (no affine weights, no label embedding), the case these fused ops reproduce."""
    norm1 = block.norm1
    if type(norm1) is AdaLayerNormZero:
        if norm1.emb is not None:
            return False
    elif type(norm1) is not SD35AdaLayerNormZeroX:
        return False
    return plain_layer_norm(norm1.norm) and plain_layer_norm(block.norm2)


def norm1(block: torch.nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor, ops: OpSet) -> tuple:
    """``block.norm1(hidden_states, emb=temb)``, same outputs: (norm_hidden_states, gate_msa, shift_mlp,
    scale_mlp, gate_mlp) and, with dual attention, (norm_hidden_states2, gate_msa2) after them."""
    module = block.norm1
    emb = module.linear(module.silu(temb))
    eps = module.norm.eps
    if type(module) is SD35AdaLayerNormZeroX:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate2 = emb.chunk(9, dim=1)
        normed2 = ops.norm_modulate(hidden_states, shift2, scale2, eps)
        return ops.norm_modulate(hidden_states, shift, scale, eps), gate, shift_mlp, scale_mlp, gate_mlp, normed2, gate2
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return ops.norm_modulate(hidden_states, shift, scale, eps), gate, shift_mlp, scale_mlp, gate_mlp


def norm2_merged(
    block: torch.nn.Module,
    hidden_states: torch.Tensor,
    shift_mlp: torch.Tensor,
    scale_mlp: torch.Tensor,
    plan: MergePlan | None,
    pseudo_merge: bool,
    ops: OpSet,
) -> torch.Tensor:
    """The MLP's input: ``norm2(x) * (1 + scale_mlp) + shift_mlp`` [B, N, C], merged with ``plan`` into
    [B, M, C] in the same pass when a plan is given."""
    eps = block.norm2.eps
    if plan is None:
        return ops.norm_modulate(hidden_states, shift_mlp, scale_mlp, eps)
    return ops.norm_modulate_merge(
        hidden_states, shift_mlp, scale_mlp, eps, plan.slot, plan.members, plan.offsets, pseudo_merge
    )
