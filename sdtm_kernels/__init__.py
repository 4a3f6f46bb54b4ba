"""Triton kernels of the SDTM ops (GPU). Not written yet: ``unavailable_reason`` says so."""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """Why the Triton ops cannot be used, or None when they can."""
    return "the Triton kernels are not part of this release yet"
