"""One adapter per model family (see base.ModelAdapter); ``adapter_for`` picks the one of a transformer.

A family is one module here plus its line in ``ADAPTERS`` below. The command line, the demo and the
benchmarks name no family: they iterate over the registry (``families()``, in the order of ``ADAPTERS``;
the first is the default where a command needs one) and ask each adapter."""

from __future__ import annotations

from ..core.families import adapter_for, families, register_family
from .base import CallInfo, ModelAdapter, Preset
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

ADAPTERS: tuple[ModelAdapter, ...] = tuple(register_family(a) for a in (SD3Adapter(), FluxAdapter(), PixArtAdapter(), WanAdapter()))


def family_names() -> list[str]:
    """The names of the registered families, in registration order."""
    return [adapter.name for adapter in families()]


def family(name: str) -> ModelAdapter:
    """The registered family called ``name``; a ValueError naming the families otherwise."""
    for adapter in families():
        if adapter.name == name:
            return adapter
    raise ValueError(f"the model family must be one of {', '.join(family_names())}, got {name!r}.")


def default_family() -> ModelAdapter:
    """The family a command uses when none is named: the first registered."""
    return families()[0]


def presets() -> dict[str, tuple[ModelAdapter, Preset]]:
    """Every family's presets by name (``ModelAdapter.presets``): name -> (family, preset)."""
    return {name: (adapter, preset) for adapter in families() for name, preset in adapter.presets.items()}


__all__ = ["ADAPTERS", "CallInfo", "FluxAdapter", "ModelAdapter", "PixArtAdapter", "Preset", "SD3Adapter", "WanAdapter",
           "adapter_for", "default_family", "families", "family", "family_names", "presets"]
