"""The registry of model families: each adapter (sdtm/models/) registers itself here, and the core finds
a transformer's adapter here, so the core imports no model."""

from __future__ import annotations

from typing import Any

import torch

_ADAPTERS: list[Any] = []


def register_family(adapter: Any) -> Any:
    """Add ``adapter`` (a ``sdtm.models.base.ModelAdapter``) to the registry; returns it."""
    if all(a.name != adapter.name for a in _ADAPTERS):
        _ADAPTERS.append(adapter)
    return adapter


def families() -> tuple[Any, ...]:
    """Every registered adapter, in registration order."""
    return tuple(_ADAPTERS)


def adapter_for(transformer: torch.nn.Module) -> Any:
    """The adapter serving ``transformer``'s class; a ValueError naming the supported classes otherwise."""
    for adapter in _ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    supported = ", ".join(a.transformer_class for a in _ADAPTERS)
    raise ValueError(f"SDTM supports diffusers' {supported}; got {type(transformer).__name__}.")
