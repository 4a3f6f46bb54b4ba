"""Helpers shared by the Triton launchers."""

from __future__ import annotations

import os

import torch

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        raise ValueError(
            f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}."
        )


def check_float(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, C], got shape {tuple(x.shape)}.")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}.")


def pick(tuned, plain):
    """The autotuned kernel on a GPU; the plain kernel (fixed meta-parameters) under the interpreter,
    where timing configurations would only cost time."""
    return plain if interpreting() else tuned
