"""The detail-phase plan in one launch (after sorting the sources by score): slot, blend flag, members,
offsets and independence of every token, from the chosen sources and their best destinations.

One program per sample (BLOCK_N >= N tokens). Every destination j is group j; the r best sources join
the group of their best destination; the other tokens keep their own rows, in token order. Steps:
  1. each token's code (2 * group for a destination, 2 * group + 1 for a chosen source, -1 otherwise)
     is scattered into the slot buffer, which serves as scratch, and read back per token;
  2. the merged tokens sorted by (group, destination first, token) are exactly the members of the group
     rows, in order: members[U + p] is the p-th of them (U = unmerged rows);
  3. the group rows' offsets are U + j + (chosen sources in groups before j): a histogram of the chosen
     sources' groups and its running sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdtm.core.plans import Grid, MergePlan
from sdtm.core.schedule import sources_to_merge

from ._common import check_device


@triton.jit
def _idm_plan_kernel(
    src_ptr, dst_ptr, order_ptr, best_ptr, slot_ptr, blend_ptr, members_ptr, offsets_ptr, independent_ptr,
    num_tokens, num_src, num_dst, num_chosen, num_unmerged,
    PSEUDO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    valid = n < num_tokens
    slot_row = slot_ptr + b * num_tokens
    # 1. Codes per token, through the slot buffer.
    tl.store(slot_row + n, tl.full([BLOCK_N], -1, tl.int64), mask=valid)
    tl.debug_barrier()
    j = tl.arange(0, BLOCK_D)
    has_dst = j < num_dst
    dst_tokens = tl.load(dst_ptr + b * num_dst + j, mask=has_dst, other=0)
    tl.store(slot_row + dst_tokens, 2 * j.to(tl.int64), mask=has_dst)
    i = tl.arange(0, BLOCK_R)
    chosen = i < num_chosen
    position = tl.load(order_ptr + b * num_src + i, mask=chosen, other=0)
    src_tokens = tl.load(src_ptr + b * num_src + position, mask=chosen, other=0)
    src_group = tl.load(best_ptr + b * num_src + position, mask=chosen, other=0)
    tl.store(slot_row + src_tokens, 2 * src_group + 1, mask=chosen)
    tl.debug_barrier()
    code = tl.load(slot_row + n, mask=valid, other=-1)
    tl.debug_barrier()

    merged = valid & (code >= 0)
    unmerged = valid & (code < 0)
    group = code >> 1
    is_dst = merged & ((code & 1) == 0)
    unmerged_row = tl.cumsum(unmerged.to(tl.int64), axis=0) - 1
    slot = tl.where(merged, num_unmerged + group, unmerged_row)
    out = b * num_tokens
    tl.store(slot_row + n, slot, mask=valid)
    tl.store(blend_ptr + out + n, merged, mask=valid)
    if PSEUDO:
        tl.store(independent_ptr + out + n, unmerged | is_dst, mask=valid)
    else:
        tl.store(independent_ptr + out + n, unmerged, mask=valid)

    # 2. Members: unmerged rows hold their token; group rows hold the merged tokens sorted by code, token.
    tl.store(members_ptr + out + unmerged_row, n.to(tl.int64), mask=unmerged)
    never = (num_tokens * 2 * (num_dst + 1)).to(tl.int64)  # sorts after every merged token
    key = tl.where(merged, code * num_tokens + n, never)
    ordered = tl.sort(key)
    num_merged_tokens = num_tokens - num_unmerged
    tl.store(members_ptr + out + num_unmerged + n, ordered % num_tokens, mask=n < num_merged_tokens)

    # 3. Offsets: one per unmerged row, then U + j + (chosen sources in groups before j) for j = 0..D.
    rows = num_unmerged + num_dst + 1
    offsets_row = offsets_ptr + b * rows
    tl.store(offsets_row + n, n.to(tl.int64), mask=n < num_unmerged)
    counts = tl.histogram(tl.where(chosen, src_group, num_dst).to(tl.int32), BLOCK_D)
    before = tl.cumsum(counts.to(tl.int64), axis=0) - counts.to(tl.int64)
    tl.store(offsets_row + num_unmerged + j, num_unmerged + j + before, mask=j <= num_dst)


def idm_plan(
    grid: Grid,
    reduce_num: int,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    score: torch.Tensor,
    best: torch.Tensor,
    pseudo_merge: bool,
) -> MergePlan:
    """Triton twin of ``sdtm.core.plans.idm_plan`` (same arguments, identical plan)."""
    check_device(src_idx, dst_idx, score, best)
    batch, num_src = src_idx.shape
    num_dst = dst_idx.shape[1]
    num_tokens = grid.num_tokens
    device = src_idx.device
    r = sources_to_merge(reduce_num, num_src)
    num_unmerged = num_tokens - num_dst - r
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    slot = torch.empty(batch, num_tokens, dtype=torch.int64, device=device)
    members = torch.empty_like(slot)
    offsets = torch.empty(batch, num_unmerged + num_dst + 1, dtype=torch.int64, device=device)
    blend = torch.empty(batch, num_tokens, dtype=torch.bool, device=device)
    independent = torch.empty_like(blend)
    if batch > 0 and num_tokens > 0:
        block_n = triton.next_power_of_2(num_tokens)
        _idm_plan_kernel[(batch,)](
            src_idx.contiguous(), dst_idx.contiguous(), order.contiguous(), best.contiguous(), slot, blend, members,
            offsets, independent, num_tokens, num_src, num_dst, r, num_unmerged,
            PSEUDO=bool(pseudo_merge), BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(num_dst + 1),
            BLOCK_R=triton.next_power_of_2(max(r, 1)),
            # A whole sample per program, sorted in registers: 4096 tokens over 8 warps is 16 a thread.
            num_warps=8 if block_n <= 4096 else 16,
        )
    return MergePlan(slot=slot, blend=blend, members=members, offsets=offsets, independent=independent)
