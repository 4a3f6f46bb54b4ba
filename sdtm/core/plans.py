"""Merge plans: which image tokens are merged into which, for both phases, in one format.

A plan maps every original token n of sample b to a row ``slot[b, n]`` of the merged sequence
(M rows: first the unmerged tokens, then one row per group), says whether the token is blended with the
cache when unmerging, and lists each row's members CSR-style (group destination first) for the
gather-style merge. ``merge`` (ops) goes from [B, N, C] to [B, M, C] with it, ``unmerge`` back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .caching import eager_cache
from .reference import window_tokens
from .schedule import sources_to_merge, windows_to_merge

PRIORITY_EPS = 1e-6


@dataclass(frozen=True)
class MergePlan:
    """One block's plan, reused by every merged sub-layer of the block.

    slot: [B, N] int64, merged row of each token.
    blend: [B, N] bool, token is a group member (dst or src) and blends with the cache on unmerge.
    members: [B, N] int64, token indices sorted by slot, each group's destination first.
    offsets: [B, M + 1] int64, row m holds members[b, offsets[b, m]:offsets[b, m + 1]].
    independent: [B, N] bool, tokens whose merge age resets to 0 (unmerged; plus dst with pseudo_merge).
    """

    slot: torch.Tensor
    blend: torch.Tensor
    members: torch.Tensor
    offsets: torch.Tensor
    independent: torch.Tensor

    @property
    def num_merged(self) -> int:
        return self.offsets.shape[1] - 1


@dataclass(frozen=True)
class Grid:
    """The image token grid and its windows: ``frames`` frames of ``height`` x ``width`` tokens,
    frame-major (images: 1 frame), windows of ``st`` frames x ``sy`` rows x ``sx`` columns
    (``reference.window_tokens`` orders them). Windows never cross a frame's borders: with st = 1 each
    frame is tiled on its own, its last rows and columns left out when they do not fill a window."""

    height: int
    width: int
    sy: int
    sx: int
    frames: int = 1
    st: int = 1

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def window_size(self) -> int:
        return self.st * self.sy * self.sx

    @property
    def num_windows(self) -> int:
        return (self.frames // self.st) * (self.height // self.sy) * (self.width // self.sx)

    def window_table(self, device) -> torch.Tensor:
        """[W, K] int64 token indices of the complete windows (``reference.window_tokens``; cached)."""
        return window_tokens(self.height, self.width, self.sy, self.sx, device, self.frames, self.st)

    def describe(self) -> str:
        """The grid as text: "HxW" for an image, "FxHxW" for a video."""
        plane = f"{self.height}x{self.width}"
        return plane if self.frames == 1 else f"{self.frames}x{plane}"

    def describe_window(self) -> str:
        """The window as text: "sy x sx" (rows x columns), with the frames first when st > 1."""
        plane = f"{self.sy}x{self.sx}"
        return plane if self.st == 1 else f"{self.st}x{plane}"


def merge_age_priority(merge_age: torch.Tensor | None) -> torch.Tensor | None:
    """``T / (mean(T) + 1e-6)`` per sample as [B, N] float32; None when no merge age exists yet."""
    if merge_age is None:
        return None
    age = merge_age.float()
    return age / (age.mean(dim=1, keepdim=True) + PRIORITY_EPS)


def update_merge_age(merge_age: torch.Tensor | None, plan: MergePlan) -> torch.Tensor:
    """T += 1, then T[independent] = 0 (T starts at 0 at the first merge of a generation)."""
    if merge_age is None:
        merge_age = torch.zeros(plan.slot.shape, dtype=torch.int32, device=plan.slot.device)
    return torch.where(plan.independent, torch.zeros_like(merge_age), merge_age + 1)


def advance_merge_age_(merge_age: torch.Tensor, plan: MergePlan) -> None:
    """``update_merge_age`` in place on an existing T [B, N] int32 (zero before the first merge)."""
    merge_age.add_(1).masked_fill_(plan.independent, 0)


@eager_cache(maxsize=64)
def _window_layout(grid: Grid, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every token: its window (-1 outside complete windows) and position inside it; plus the table.
    Cached per grid and device (read-only)."""
    table = grid.window_table(device)  # [W, K]
    window_of = torch.full((grid.num_tokens,), -1, dtype=torch.int64, device=device)
    position_of = torch.zeros(grid.num_tokens, dtype=torch.int64, device=device)
    window_of[table] = torch.arange(table.shape[0], device=device).unsqueeze(1).expand_as(table)
    position_of[table] = torch.arange(table.shape[1], device=device).expand_as(table)
    return window_of, position_of, table


def _assemble(
    num_unmerged: int,
    unmerged: torch.Tensor,
    group_of: torch.Tensor,
    num_groups: int,
    is_dst: torch.Tensor,
    pseudo_merge: bool,
) -> MergePlan:
    """Build a plan from per-token facts.

    num_unmerged: how many tokens of each sample keep their own row (the same for every sample).
    unmerged: [B, N] bool, tokens that keep their own row. group_of: [B, N] int64, group of merged
    tokens (0..num_groups-1, any value for unmerged ones). is_dst: [B, N] bool, group destinations.
    """
    batch = unmerged.shape[0]
    device = unmerged.device
    first_group_row = num_unmerged
    unmerged_row = unmerged.long().cumsum(dim=1) - 1
    slot = torch.where(unmerged, unmerged_row, first_group_row + group_of)
    num_merged = first_group_row + num_groups

    # CSR: sort tokens by row with each group's destination first (stable keeps token order otherwise).
    key = slot * 2 + (~is_dst).long()
    members = torch.sort(key, dim=1, stable=True).indices
    counts = torch.zeros(batch, num_merged, dtype=torch.int64, device=device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    offsets = torch.cat([counts.new_zeros(batch, 1), counts.cumsum(dim=1)], dim=1)

    blend = ~unmerged
    independent = unmerged | is_dst if pseudo_merge else unmerged
    return MergePlan(slot=slot, blend=blend, members=members, offsets=offsets, independent=independent)


def random_or_first_positions(
    batch: int, num_windows: int, window_size: int, use_rand: bool, generator, device
) -> torch.Tensor:
    """Destination position inside each window: uniform per sample and window, or 0. [B, W] int64.
    The draw happens on the generator's device."""
    if use_rand:
        drawn = torch.randint(
            window_size, (batch, num_windows), generator=generator, device=generator.device
        )
        return drawn.to(device)
    return torch.zeros(batch, num_windows, dtype=torch.int64, device=device)


def ssm_plan(
    window_scores: torch.Tensor,
    grid: Grid,
    reduce_num: int,
    dst_position: torch.Tensor,
    pseudo_merge: bool,
) -> MergePlan:
    """Structure phase: merge whole windows, best scores first.

    window_scores: [B, W] (see ops.window_scores). dst_position: [B, W] int64 destination position in
    each window. Merges ``windows_to_merge(reduce_num, K, W)`` windows into one row each.
    """
    batch, num_windows = window_scores.shape
    device = window_scores.device
    window_of, position_of, _ = _window_layout(grid, device)
    n_win = windows_to_merge(reduce_num, grid.window_size, num_windows)

    k = grid.window_size
    num_unmerged = grid.num_tokens - n_win * k

    # Selected windows; column W stands for "no complete window" (border tokens) and is never selected.
    order = torch.sort(window_scores, dim=1, descending=True, stable=True).indices
    selected = torch.zeros(batch, num_windows + 1, dtype=torch.int64, device=device)
    selected.scatter_(1, order[:, :n_win], 1)
    token_window = _border_as_last_window(window_of, num_windows).expand(batch, -1)  # [B, N]
    merged = selected.gather(1, token_window).bool()
    unmerged = ~merged
    # Rows: unmerged tokens first in token order, then one group per selected window in window order.
    group = (selected.cumsum(dim=1) - 1).gather(1, token_window)
    unmerged_row = unmerged.cumsum(dim=1) - 1
    slot = torch.where(merged, group + num_unmerged, unmerged_row)

    # Members without sorting: a group's K tokens sit at U + K * group, destination first, then the
    # sources in position order (which is token order inside a window).
    dst = torch.cat([dst_position, dst_position.new_zeros(batch, 1)], dim=1).gather(1, token_window)
    is_dst = merged & (position_of == dst)
    place = torch.where(is_dst, 0, position_of + (position_of < dst).long())
    member_index = torch.where(merged, num_unmerged + k * group + place, unmerged_row)
    members = torch.empty_like(slot).scatter_(1, member_index, _token_ids(grid.num_tokens, device).expand(batch, -1))
    offsets = _ssm_offsets(num_unmerged, n_win, k, device).expand(batch, -1)
    independent = unmerged | is_dst if pseudo_merge else unmerged
    return MergePlan(slot=slot, blend=merged, members=members, offsets=offsets, independent=independent)


@eager_cache(maxsize=64)
def _border_as_last_window(window_of: torch.Tensor, num_windows: int) -> torch.Tensor:
    return torch.where(window_of >= 0, window_of, num_windows)


@eager_cache(maxsize=16)
def _token_ids(num_tokens: int, device) -> torch.Tensor:
    return torch.arange(num_tokens, device=device)


@eager_cache(maxsize=256)
def _ssm_offsets(num_unmerged: int, num_groups: int, window_size: int, device) -> torch.Tensor:
    """[1, M + 1] row pointers of an SSM plan: one token per unmerged row, K per group."""
    unmerged = torch.arange(num_unmerged, device=device)
    groups = num_unmerged + window_size * torch.arange(num_groups + 1, device=device)
    return torch.cat([unmerged, groups]).unsqueeze(0)


def idm_destinations(
    grid: Grid, merge_age: torch.Tensor | None, fallback_position: torch.Tensor
) -> torch.Tensor:
    """Destination position of each complete window in the detail phase, [B, W] int64: the token with the
    largest merge age (first on ties), or ``fallback_position`` while no merge age exists."""
    if merge_age is None:
        return fallback_position
    table = grid.window_table(merge_age.device)
    return merge_age[:, table].argmax(dim=-1)


def idm_candidates(grid: Grid, dst_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split complete windows into destinations and source candidates.

    Returns src_idx [B, W * (K - 1)] (window order, then position order) and dst_idx [B, W] token indices.
    """
    table = grid.window_table(dst_position.device)  # [W, K]
    batch = dst_position.shape[0]
    tokens = table.expand(batch, -1, -1)  # [B, W, K]
    dst_idx = tokens.gather(2, dst_position.unsqueeze(-1)).squeeze(-1)
    positions = torch.arange(grid.window_size, device=table.device)
    # Stable sort on "is the destination" puts the K - 1 sources first, in position order.
    is_dst = (positions == dst_position.unsqueeze(-1)).to(torch.uint8)  # [B, W, K]
    src_position = torch.sort(is_dst, dim=-1, stable=True).indices[..., :-1]
    src_idx = tokens.gather(2, src_position).reshape(batch, -1)
    return src_idx, dst_idx


def idm_plan(
    grid: Grid,
    reduce_num: int,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    score: torch.Tensor,
    best: torch.Tensor,
    pseudo_merge: bool,
) -> MergePlan:
    """Detail phase: the ``r`` best-scoring sources merge into their best destination; every destination
    is a group (even one with no source).

    src_idx: [B, A], dst_idx: [B, D] token indices; score, best: [B, A] from ops.bipartite_match.
    """
    batch, num_src = src_idx.shape
    num_dst = dst_idx.shape[1]
    device = src_idx.device
    r = sources_to_merge(reduce_num, num_src)
    order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]  # positions in A

    n = grid.num_tokens
    unmerged = torch.ones(batch, n, dtype=torch.bool, device=device)
    group_of = torch.zeros(batch, n, dtype=torch.int64, device=device)
    is_dst = torch.zeros(batch, n, dtype=torch.bool, device=device)
    # Destinations: group j is the j-th destination.
    unmerged.scatter_(1, dst_idx, False)
    is_dst.scatter_(1, dst_idx, True)
    group_of.scatter_(1, dst_idx, torch.arange(num_dst, device=device).expand(batch, -1))
    # Chosen sources join their best destination's group.
    chosen_tokens = src_idx.gather(1, order)
    unmerged.scatter_(1, chosen_tokens, False)
    group_of.scatter_(1, chosen_tokens, best.gather(1, order))
    return _assemble(n - num_dst - r, unmerged, group_of, num_dst, is_dst, pseudo_merge)
