"""One adapter per model family (see base.ModelAdapter); ``adapter_for`` picks the one of a transformer."""

from __future__ import annotations

from ..core.families import adapter_for, register_family
from .base import CallInfo, ModelAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[ModelAdapter, ...] = tuple(register_family(a) for a in (SD3Adapter(), FluxAdapter(), PixArtAdapter()))

__all__ = ["ADAPTERS", "CallInfo", "FluxAdapter", "ModelAdapter", "PixArtAdapter", "SD3Adapter", "adapter_for"]
