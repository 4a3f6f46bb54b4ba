"""SDTM's part of one block call, for any model: the merge plan, the merges and the unmerges.

A model's block forward (sdtm/models/) calls ``compute_plan`` once on its normalised, modulated image
tokens, ``merge_tokens`` before each merged sub-layer and ``finish_sublayer`` after it; what to do was
decided on the host before the transformer ran (``BlockLink``, set by ``SDTMState.prepare_blocks``), so
nothing here reads a step or layer number.
"""

from __future__ import annotations

import torch

from .ops import TORCH_OPS, OpSet
from .plans import MergePlan, advance_merge_age_, merge_age_priority
from .schedule import BlockAction, Phase
from .state import BlockLink


def begin_block(link: BlockLink, hidden_states: torch.Tensor) -> BlockAction:
    """What a merging or protected block does in this call, after checking that ``hidden_states``
    [B, N, C] has the grid's N image tokens and the call's batch B."""
    grid = link.state.grid
    if hidden_states.shape[1] != grid.num_tokens:
        raise ValueError(
            f"the block got {hidden_states.shape[1]} image tokens but the latent grid is "
            f"{grid.describe()}={grid.num_tokens} tokens."
        )
    batch = link.stream.merge_age.shape[0]
    if hidden_states.shape[0] != batch:
        raise ValueError(
            f"the block got a batch of {hidden_states.shape[0]} but its transformer was called with {batch}; "
            "something between the transformer and its blocks changes the batch (a hook such as FasterCache), "
            "which SDTM's per-sample caches cannot follow."
        )
    return link.action


@torch.no_grad()
def compute_plan(link: BlockLink, metric: torch.Tensor, ops: OpSet) -> MergePlan:
    """The block's merge plan from its normalised, modulated image tokens ``metric`` [B, N, C]; advances
    the merge age T of the current call stream in place."""
    state, action, age = link.state, link.action, link.stream.merge_age
    config, grid = state.config, state.grid
    batch = metric.shape[0]
    reduce_num = link.remove.shape[0]  # a dynamic size under torch.compile, not a constant per step
    priority = merge_age_priority(age)  # all zero until a merge happens: adds nothing to the scores
    drawn = link.dst_draw
    if drawn is None and (action.phase is Phase.STRUCTURE or not link.age_exists):  # first token of each window
        drawn = torch.zeros(batch, grid.num_windows, dtype=torch.int64, device=metric.device)

    if action.phase is Phase.STRUCTURE:
        scores = ops.window_scores(
            metric, priority, grid.height, grid.width, grid.sy, grid.sx, config.a_s, grid.frames, grid.st
        )
        plan = ops.ssm_plan(scores, grid, reduce_num, drawn, config.pseudo_merge)
    else:
        src_idx, dst_idx = ops.idm_candidates(grid, age if link.age_exists else None, drawn)
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
    gate: torch.Tensor | None,
    plan: MergePlan | None,
    ops: OpSet,
    residual_is_ours: bool,
    spare: torch.Tensor | None = None,
    output_first: bool = False,
) -> torch.Tensor:
    """``residual + gate * y`` [B, N, C] (gate [B, C], or None for none), with y [B, M, C] unmerged (and blended with the sub-layer's
    cache) when ``plan`` is given; stores the full output into the cache buffer when the block's action
    says so.

    Without autograd no fresh [B, N, C] buffer is needed: the sum is written into ``residual`` itself
    when ``residual_is_ours`` (a tensor this forward made, not the block's input), else into ``spare``
    (a [B, N, C] tensor of this forward that nothing reads any more) when given. ``output_first``: the
    model adds the sub-layer's output to the residual (``y + residual``) rather than the reverse."""
    in_place = not torch.is_grad_enabled()
    cache_out = link.cache_out.get(name)
    if plan is None:
        if gate is not None:
            y = gate.unsqueeze(1) * y
        if cache_out is not None:
            cache_out.copy_(y.detach())
        if in_place and residual_is_ours and (residual.is_contiguous() or not output_first):
            return residual.add_(y)
        # The model's own operand order: the sum takes the first operand's memory layout, which later
        # kernels (and so the last bits of their results) can depend on.
        return y + residual if output_first else residual + y
    mcw = link.state.config.mcw
    cache = link.cache_in.get(name)
    if any(t is not None and t.dtype != y.dtype for t in (gate, residual, cache, cache_out)):
        # Mixed dtypes (autocast keeps some operands in float32): the torch twin promotes as the model would.
        ops, in_place = TORCH_OPS, False
    if not in_place:
        out, new_cache = ops.unmerge(y, plan.slot, plan.blend, cache, gate, residual, mcw, cache_out is not None)
        if cache_out is not None:
            cache_out.copy_(new_cache.detach())
        return out
    if residual_is_ours and residual.is_contiguous():
        out = residual
    elif (spare is not None and spare.shape == residual.shape and spare.dtype == residual.dtype
          and spare.is_contiguous()):
        out = spare
    else:
        out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    ops.unmerge_into(y, plan.slot, plan.blend, cache, gate, residual, mcw, out, cache_out)
    return out
