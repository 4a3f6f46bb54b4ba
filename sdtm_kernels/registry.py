"""The Triton ops as an OpSet, and their registration as the CUDA kernels of the ``sdtm`` ops."""

from __future__ import annotations

import importlib
import importlib.util

import torch

from sdtm.core.opset import OP_NAMES, OpSet

from .bipartite_match import bipartite_match
from .idm_plan import idm_plan
from .merge import merge
from .norm_modulate import norm_modulate, norm_modulate_merge
from .ssm_plan import ssm_plan
from .unmerge import unmerge, unmerge_into
from .window_scores import window_scores

# Plain launchers: the same kernels as torch.ops.sdtm_triton.*, minus the custom-op dispatch per call.
TRITON_OPS = OpSet("triton", window_scores=window_scores, bipartite_match=bipartite_match, merge=merge,
                   unmerge=unmerge, unmerge_into=unmerge_into, norm_modulate=norm_modulate,
                   norm_modulate_merge=norm_modulate_merge, ssm_plan=ssm_plan,
                   idm_plan=idm_plan)


def _register_cuda_kernels() -> None:
    """Make ``torch.ops.sdtm.<op>`` (schemas from csrc/) dispatch CUDA tensors to the Triton ops."""
    if importlib.util.find_spec("sdtm._C") is None:
        return
    importlib.import_module("sdtm._C")
    for name in OP_NAMES:
        torch.library.register_kernel(f"sdtm::{name}", "cuda", getattr(torch.ops.sdtm_triton, name))


_register_cuda_kernels()
