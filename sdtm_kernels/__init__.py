"""Triton kernels of the four SDTM ops (GPU), registered as torch custom ops.

Each op is a ``torch.library.triton_op`` in the ``sdtm_triton`` namespace (``torch.compile`` sees into
them) and, when the compiled extension is loaded, also the CUDA implementation of the ``sdtm`` op of the
same name. They run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util


def unavailable_reason() -> str | None:
    """Why the Triton ops cannot be used at all, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def __getattr__(name: str):
    if name == "TRITON_OPS":
        from .registry import TRITON_OPS

        return TRITON_OPS
    raise AttributeError(name)
