"""The structure-phase plan in one launch (after the window selection): slot, blend flag, members and
independence of every token, written straight from the selected windows.

One program per sample walks all N tokens (BLOCK_N >= N) because the unmerged rows are a prefix count
over the whole sample. Each token finds its window arithmetically; the window's selection flag, group
rank and destination position are read from [B, W + 1] tensors (column W: "no complete window").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdtm.core.plans import Grid, MergePlan, _ssm_offsets
from sdtm.core.schedule import windows_to_merge

from ._common import check_device


@triton.jit
def _ssm_plan_kernel(
    selected_ptr, group_ptr, dst_ptr, slot_ptr, blend_ptr, members_ptr, independent_ptr,
    num_tokens, frame_tokens, grid_w, complete_frames, complete_h, complete_w, windows_x, windows_per_block,
    num_windows, num_unmerged,
    ST: tl.constexpr, SY: tl.constexpr, SX: tl.constexpr, PSEUDO: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.arange(0, BLOCK_N)
    valid = n < num_tokens
    frame = n // frame_tokens
    row = (n % frame_tokens) // grid_w
    col = n % grid_w
    complete = valid & (frame < complete_frames) & (row < complete_h) & (col < complete_w)
    window = tl.where(complete, (frame // ST) * windows_per_block + (row // SY) * windows_x + col // SX, num_windows)
    base = b * (num_windows + 1)
    merged = (tl.load(selected_ptr + base + window, mask=valid, other=0) != 0) & valid
    group = tl.load(group_ptr + base + window, mask=valid, other=0)
    dst = tl.load(dst_ptr + base + window, mask=valid, other=0)
    position = (frame % ST) * SY * SX + (row % SY) * SX + col % SX
    unmerged = valid & ~merged
    unmerged_row = tl.cumsum(unmerged.to(tl.int64), axis=0) - 1
    is_dst = merged & (position == dst)
    place = tl.where(is_dst, 0, position + (position < dst).to(tl.int64))
    slot = tl.where(merged, num_unmerged + group, unmerged_row)
    member_index = tl.where(merged, num_unmerged + ST * SY * SX * group + place, unmerged_row)
    out = b * num_tokens
    tl.store(slot_ptr + out + n, slot, mask=valid)
    tl.store(blend_ptr + out + n, merged, mask=valid)
    if PSEUDO:
        tl.store(independent_ptr + out + n, unmerged | is_dst, mask=valid)
    else:
        tl.store(independent_ptr + out + n, unmerged, mask=valid)
    tl.store(members_ptr + out + member_index, n.to(tl.int64), mask=valid)


def ssm_plan(
    window_scores: torch.Tensor, grid: Grid, reduce_num: int, dst_position: torch.Tensor, pseudo_merge: bool
) -> MergePlan:
    """Triton twin of ``sdtm.core.plans.ssm_plan`` (same arguments, identical plan)."""
    check_device(window_scores, dst_position)
    batch, num_windows = window_scores.shape
    device = window_scores.device
    k = grid.window_size
    n_win = windows_to_merge(reduce_num, k, num_windows)
    num_unmerged = grid.num_tokens - n_win * k
    order = torch.sort(window_scores, dim=1, descending=True, stable=True).indices
    selected = torch.zeros(batch, num_windows + 1, dtype=torch.int64, device=device)
    selected.scatter_(1, order[:, :n_win], 1)
    group = selected.cumsum(dim=1) - 1
    dst = torch.cat([dst_position, dst_position.new_zeros(batch, 1)], dim=1)
    slot = torch.empty(batch, grid.num_tokens, dtype=torch.int64, device=device)
    members = torch.empty_like(slot)
    blend = torch.empty(batch, grid.num_tokens, dtype=torch.bool, device=device)
    independent = torch.empty_like(blend)
    block_n = triton.next_power_of_2(grid.num_tokens)
    _ssm_plan_kernel[(batch,)](
        selected, group, dst.contiguous(), slot, blend, members, independent,
        grid.num_tokens, grid.height * grid.width, grid.width, grid.frames // grid.st * grid.st,
        grid.height // grid.sy * grid.sy, grid.width // grid.sx * grid.sx, grid.width // grid.sx,
        (grid.height // grid.sy) * (grid.width // grid.sx), num_windows, num_unmerged,
        ST=grid.st, SY=grid.sy, SX=grid.sx, PSEUDO=bool(pseudo_merge), BLOCK_N=block_n,
        # A whole sample per program: 4096 tokens over 8 warps is 16 values a thread per array.
        num_warps=8 if block_n <= 4096 else 16,
    )
    offsets = _ssm_offsets(num_unmerged, n_win, k, device).expand(batch, -1)
    return MergePlan(slot=slot, blend=blend, members=members, offsets=offsets, independent=independent)
