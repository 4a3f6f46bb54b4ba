"""The Triton ops as an OpSet, and their registration as the CUDA kernels of the ``sdtm`` ops."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from sdtm.ops import OpSet

from . import bipartite_match, merge, unmerge, window_scores  # noqa: F401  (define the sdtm_triton ops)

TRITON_OPS = OpSet(
    "triton",
    window_scores=torch.ops.sdtm_triton.window_scores,
    bipartite_match=torch.ops.sdtm_triton.bipartite_match,
    merge=torch.ops.sdtm_triton.merge,
    unmerge=torch.ops.sdtm_triton.unmerge,
)


def _register_cuda_kernels() -> None:
    """Make ``torch.ops.sdtm.<op>`` (schemas from csrc/) dispatch CUDA tensors to the Triton ops."""
    if importlib.util.find_spec("sdtm._C") is None:
        return
    importlib.import_module("sdtm._C")
    for name in ("window_scores", "bipartite_match", "merge", "unmerge"):
        torch.library.register_kernel(f"sdtm::{name}", "cuda", getattr(torch.ops.sdtm_triton, name))


_register_cuda_kernels()
