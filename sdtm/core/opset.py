"""What a backend provides: the names and signatures of the fused ops (``OpSet``). A leaf module: the
dispatch point (``ops.py``), the compiled CPU ops (``cpp_ops.py``) and the Triton ops (``sdtm_kernels``)
all import it, and it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import plans

OP_NAMES = ("window_scores", "bipartite_match", "merge", "unmerge", "unmerge_into", "norm_modulate",
            "norm_modulate_merge")


def idm_candidates(
    grid: plans.Grid, merge_age: torch.Tensor | None, fallback_position: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The detail phase's candidates: each complete window's destination (``plans.idm_destinations``:
    largest merge age, or ``fallback_position`` [B, W] while ``merge_age`` is None), then the split into
    ``(src_idx [B, W * (K - 1)], dst_idx [B, W])`` of ``plans.idm_candidates``."""
    return plans.idm_candidates(grid, plans.idm_destinations(grid, merge_age, fallback_position))


@dataclass(frozen=True)
class OpSet:
    """The ops of one backend, all with the signatures of ``sdtm.core.reference`` (``unmerge_into`` is
    ``unmerge`` writing into given tensors; ``norm_modulate(_merge)`` the block's adaptive LayerNorm,
    alone or fused with merge), and the builders of the plans of each phase (signatures of
    ``sdtm.core.plans.ssm_plan`` and ``sdtm.core.plans.idm_plan``; the detail phase's candidates with the
    signature of ``idm_candidates`` above)."""

    name: str
    window_scores: Callable
    bipartite_match: Callable
    merge: Callable
    unmerge: Callable
    unmerge_into: Callable
    norm_modulate: Callable
    norm_modulate_merge: Callable
    ssm_plan: Callable = plans.ssm_plan
    idm_candidates: Callable = idm_candidates
    idm_plan: Callable = plans.idm_plan
