"""The compiled CPU ops (``torch.ops.sdtm.*`` from ``csrc/``) as an OpSet, plus their fake (meta)
implementations so ``torch.compile`` can trace through them. Importing this module loads sdtm._C."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers the ops)
from .opset import OpSet
from .plans import Grid, MergePlan
from .schedule import sources_to_merge, windows_to_merge


@torch.library.register_fake("sdtm::window_scores")
def _window_scores_fake(x, priority, grid_h, grid_w, sy, sx, a_s, frames=1, st=1):
    return x.new_empty((x.shape[0], Grid(grid_h, grid_w, sy, sx, frames, st).num_windows), dtype=torch.float32)


@torch.library.register_fake("sdtm::bipartite_match")
def _bipartite_match_fake(x, src_idx, dst_idx, priority, a_d):
    shape = (x.shape[0], src_idx.shape[1])
    return x.new_empty(shape, dtype=torch.float32), src_idx.new_empty(shape)


@torch.library.register_fake("sdtm::merge")
def _merge_fake(x, slot, members, offsets, pseudo_merge):
    return x.new_empty((x.shape[0], offsets.shape[1] - 1, x.shape[2]))


@torch.library.register_fake("sdtm::unmerge")
def _unmerge_fake(y, slot, blend, cache, gate, residual, mcw, store_cache):
    full = (slot.shape[0], slot.shape[1], y.shape[2])
    return y.new_empty(full), y.new_empty(full if store_cache else (0,))


@torch.library.register_fake("sdtm::unmerge_into")
def _unmerge_into_fake(y, slot, blend, cache, gate, residual, mcw, out, cache_out):
    return None


@torch.library.register_fake("sdtm::norm_modulate")
def _norm_modulate_fake(x, shift, scale, eps):
    return torch.empty_like(x)


@torch.library.register_fake("sdtm::norm_modulate_merge")
def _norm_modulate_merge_fake(x, shift, scale, eps, slot, members, offsets, pseudo_merge):
    return x.new_empty((x.shape[0], offsets.shape[1] - 1, x.shape[2]))


@torch.library.register_fake("sdtm::ssm_plan")
def _ssm_plan_fake(window_scores, dst_position, grid_h, grid_w, sy, sx, n_win, pseudo_merge, frames=1, st=1):
    grid = Grid(grid_h, grid_w, sy, sx, frames, st)
    batch, tokens = window_scores.shape[0], grid.num_tokens
    index = window_scores.new_empty((batch, tokens), dtype=torch.int64)
    flag = window_scores.new_empty((batch, tokens), dtype=torch.bool)
    offsets = window_scores.new_empty((batch, tokens - n_win * (grid.window_size - 1) + 1), dtype=torch.int64)
    return index, flag, torch.empty_like(index), offsets, torch.empty_like(flag)


def _ssm_plan(window_scores: torch.Tensor, grid: Grid, reduce_num: int, dst_position: torch.Tensor,
              pseudo_merge: bool) -> MergePlan:
    """``sdtm.core.plans.ssm_plan`` as one compiled op (same arguments, identical plan)."""
    n_win = windows_to_merge(reduce_num, grid.window_size, window_scores.shape[1])
    slot, blend, members, offsets, independent = torch.ops.sdtm.ssm_plan(
        window_scores, dst_position, grid.height, grid.width, grid.sy, grid.sx, n_win, pseudo_merge, grid.frames,
        grid.st,
    )
    return MergePlan(slot=slot, blend=blend, members=members, offsets=offsets, independent=independent)


@torch.library.register_fake("sdtm::idm_candidates")
def _idm_candidates_fake(merge_age, dst_position, grid_h, grid_w, sy, sx, frames=1, st=1):
    like = merge_age if merge_age is not None else dst_position
    grid = Grid(grid_h, grid_w, sy, sx, frames, st)
    windows = grid.num_windows
    src_idx = like.new_empty((like.shape[0], windows * (grid.window_size - 1)), dtype=torch.int64)
    return src_idx, like.new_empty((like.shape[0], windows), dtype=torch.int64)


@torch.library.register_fake("sdtm::idm_plan")
def _idm_plan_fake(score, best, src_idx, dst_idx, num_tokens, r, pseudo_merge):
    batch = score.shape[0]
    index = score.new_empty((batch, num_tokens), dtype=torch.int64)
    flag = score.new_empty((batch, num_tokens), dtype=torch.bool)
    offsets = score.new_empty((batch, num_tokens - r + 1), dtype=torch.int64)
    return index, flag, torch.empty_like(index), offsets, torch.empty_like(flag)


def _idm_candidates(grid: Grid, merge_age: torch.Tensor | None,
                    fallback_position: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdtm.core.plans.idm_destinations`` then ``idm_candidates`` as one compiled op (same arguments as
    ``sdtm.core.opset.idm_candidates``, identical indices)."""
    return torch.ops.sdtm.idm_candidates(
        merge_age, fallback_position, grid.height, grid.width, grid.sy, grid.sx, grid.frames, grid.st
    )


def _idm_plan(grid: Grid, reduce_num: int, src_idx: torch.Tensor, dst_idx: torch.Tensor, score: torch.Tensor,
              best: torch.Tensor, pseudo_merge: bool) -> MergePlan:
    """``sdtm.core.plans.idm_plan`` as one compiled op (same arguments, identical plan)."""
    r = sources_to_merge(reduce_num, src_idx.shape[1])
    slot, blend, members, offsets, independent = torch.ops.sdtm.idm_plan(
        score, best, src_idx, dst_idx, grid.num_tokens, r, pseudo_merge
    )
    return MergePlan(slot=slot, blend=blend, members=members, offsets=offsets, independent=independent)


def _unmerge(y, slot, blend, cache, gate, residual, mcw, store_cache):
    """``torch.ops.sdtm.unmerge``; without a residual the new cache equals the output, so it is computed
    once and returned twice, as the torch twin returns it."""
    if residual is None and store_cache:
        out, _ = torch.ops.sdtm.unmerge(y, slot, blend, cache, gate, None, mcw, False)
        return out, out
    return torch.ops.sdtm.unmerge(y, slot, blend, cache, gate, residual, mcw, store_cache)


CPP_OPS = OpSet(
    "cpp",
    window_scores=torch.ops.sdtm.window_scores,
    bipartite_match=torch.ops.sdtm.bipartite_match,
    merge=torch.ops.sdtm.merge,
    unmerge=_unmerge,
    unmerge_into=torch.ops.sdtm.unmerge_into,
    norm_modulate=torch.ops.sdtm.norm_modulate,
    norm_modulate_merge=torch.ops.sdtm.norm_modulate_merge,
    ssm_plan=_ssm_plan,
    idm_candidates=_idm_candidates,
    idm_plan=_idm_plan,
)
