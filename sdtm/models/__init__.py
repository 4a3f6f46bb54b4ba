"""One adapter per model family (see base.ModelAdapter); ``adapter_for`` picks the one of a transformer."""

from __future__ import annotations

import torch

from .base import CallInfo, ModelAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter

ADAPTERS: tuple[ModelAdapter, ...] = (SD3Adapter(), FluxAdapter(), PixArtAdapter())

__all__ = ["ADAPTERS", "CallInfo", "FluxAdapter", "ModelAdapter", "PixArtAdapter", "SD3Adapter", "adapter_for"]


def adapter_for(transformer: torch.nn.Module) -> ModelAdapter:
    """The adapter serving ``transformer``'s class; a ValueError naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    supported = ", ".join(a.transformer_class for a in ADAPTERS)
    raise ValueError(f"SDTM supports diffusers' {supported}; got {type(transformer).__name__}.")
