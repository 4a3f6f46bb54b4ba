"""The compiled CPU ops (``torch.ops.sdtm.*`` from ``csrc/``) as an OpSet, plus their fake (meta)
implementations so ``torch.compile`` can trace through them. Importing this module loads sdtm._C."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)
from .ops import OpSet


@torch.library.register_fake("sdtm::window_scores")
def _window_scores_fake(x, priority, grid_h, grid_w, sy, sx, a_s):
    return x.new_empty((x.shape[0], (grid_h // sy) * (grid_w // sx)), dtype=torch.float32)


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


CPP_OPS = OpSet(
    "cpp",
    window_scores=torch.ops.sdtm.window_scores,
    bipartite_match=torch.ops.sdtm.bipartite_match,
    merge=torch.ops.sdtm.merge,
    unmerge=torch.ops.sdtm.unmerge,
)
