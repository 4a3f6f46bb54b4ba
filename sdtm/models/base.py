"""What SDTM needs to know of a model family: its blocks, its image-token grid and step per call, its
sub-layers, and a block forward that merges. The plan, the ops, the schedule and the state are shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class CallInfo:
    """What one transformer call tells SDTM: its timestep (in the scheduler's units), the image-token grid
    (rows x columns), the batch and the device of the image tokens."""

    timestep: torch.Tensor | float
    grid_height: int
    grid_width: int
    batch: int
    device: torch.device


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement ``call_info``.

    transformer_class: the diffusers transformer class name this adapter serves.
    block_class: the class name of the blocks SDTM patches (found anywhere in the transformer).
    block_forward: the patched blocks' forward (same signature and outputs as the original).
    """

    name: str = ""
    transformer_class: str = ""
    block_class: str = ""
    block_forward: Callable[..., Any]

    def matches(self, transformer: torch.nn.Module) -> bool:
        return any(cls.__name__ == self.transformer_class for cls in type(transformer).__mro__)

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks to patch, in call order; raises ValueError for a block variant SDTM cannot run."""
        blocks = [m for m in transformer.modules() if any(c.__name__ == self.block_class for c in type(m).__mro__)]
        if not blocks:
            raise ValueError(f"{type(transformer).__name__} has no {self.block_class} blocks.")
        for block in blocks:
            self.check_block(block)
        return blocks

    def check_block(self, block: torch.nn.Module) -> None:
        """Raise a ValueError when ``block`` is a variant the forward does not handle."""

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        """The block's sub-layers whose outputs are unmerged and cached, each with its kind: "attn" (merges
        in the structure phase) or "mlp" (merges in both phases)."""
        raise NotImplementedError

    def channels(self, transformer: torch.nn.Module) -> int:
        """Width of the image tokens the blocks see."""
        config = transformer.config
        return config.num_attention_heads * config.attention_head_dim

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        raise NotImplementedError


def argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A call's argument given by keyword or by position (None when absent)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def latent_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """Token grid of an NCHW latent cut into ``config.patch_size`` patches."""
    patch = transformer.config.patch_size
    return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
