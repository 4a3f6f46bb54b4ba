"""The one dispatch point of the fused ops: picks the implementation of a backend for a device.

Backends:
    "torch":  sdtm.core.reference, pure torch, any device.
    "cpp":    the compiled CPU ops of ``csrc/`` (``torch.ops.sdtm.*``), CPU tensors.
    "triton": the Triton ops of ``sdtm_kernels/``, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
    "auto":   the fastest backend built for the tensors' device, else "torch".
"""

from __future__ import annotations

import importlib
import os
import torch

from . import reference
from .opset import OP_NAMES, OpSet

TORCH_OPS = OpSet("torch", *(getattr(reference, op) for op in OP_NAMES))


def cpp_unavailable_reason() -> str | None:
    """Why the compiled CPU ops cannot be used, or None when they can."""
    try:
        importlib.import_module("sdtm._C")
    except ImportError as error:
        return (
            f"the compiled extension sdtm._C is not built ({error}); install the package with "
            "`pip install --no-build-isolation -e .`"
        )
    return None


def triton_unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why the Triton ops cannot be used (on ``device``), or None when they can."""
    try:
        kernels = importlib.import_module("sdtm_kernels")
    except ImportError as error:
        return f"the sdtm_kernels package cannot be imported ({error})"
    reason = kernels.unavailable_reason()
    if reason is not None:
        return reason
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device is not None and device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    if device is None and not (torch.cuda.is_available() or interpreted):
        return "no CUDA device is available and TRITON_INTERPRET=1 is not set"
    return None


def _cpp_ops() -> OpSet:
    importlib.import_module("sdtm._C")
    from . import cpp_ops

    return cpp_ops.CPP_OPS


def _triton_ops() -> OpSet:
    kernels = importlib.import_module("sdtm_kernels")
    return kernels.TRITON_OPS


def check_backend(backend: str) -> None:
    """Raise a ValueError saying why ``backend`` cannot run anywhere on this machine."""
    if backend == "cpp":
        reason = cpp_unavailable_reason()
    elif backend == "triton":
        reason = triton_unavailable_reason()
    else:
        reason = None
    if reason is not None:
        raise ValueError(f"backend={backend!r} is not available: {reason}.")


def ops_for(backend: str, device: torch.device) -> OpSet:
    """The op set that runs ``backend`` on tensors of ``device``; "auto" picks the fastest built one."""
    if backend == "auto":
        if device.type == "cpu" and cpp_unavailable_reason() is None:
            return _cpp_ops()
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return _triton_ops()
        return TORCH_OPS
    if backend == "torch":
        return TORCH_OPS
    if backend == "cpp":
        reason = cpp_unavailable_reason()
        if reason is None and device.type != "cpu":
            reason = f"the compiled ops run on CPU tensors, got {device}; use backend='triton' or 'auto'"
        if reason is not None:
            raise ValueError(f"backend='cpp' is not available: {reason}.")
        return _cpp_ops()
    if backend == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"backend='triton' is not available: {reason}.")
        return _triton_ops()
    raise ValueError(f"unknown backend {backend!r}; use 'auto', 'torch', 'cpp' or 'triton'.")
