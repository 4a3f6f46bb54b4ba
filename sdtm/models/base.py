"""What SDTM needs to know of a model family: its blocks, its image-token grid and step per call, its
sub-layers, and a block forward that merges. The plan, the ops, the schedule and the state are shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class CallInfo:
    """What one transformer call tells SDTM: its timestep, the image-token grid (``frames`` frames of
    rows x columns, frame-major; 1 frame for images), the batch and the device of the image tokens.
    ``timestep * timestep_scale`` is in the scheduler's units (Flux is called with a thousandth of them)."""

    timestep: torch.Tensor | float
    grid_height: int
    grid_width: int
    batch: int
    device: torch.device
    timestep_scale: float = 1.0
    frames: int = 1


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement ``call_info``.

    transformer_class: the diffusers transformer class name this adapter serves.
    block_forwards: class name of each kind of block SDTM patches (found anywhere in the transformer) ->
        the patched blocks' forward (same signature and outputs as the original).
    cfg_pairs: a batch holds conditional / unconditional pairs (classifier-free guidance in one call), so
        an odd batch turns the random destinations off (SPEC); False for guidance-distilled models.
    """

    name: str = ""
    transformer_class: str = ""
    block_forwards: dict[str, Callable[..., Any]] = {}
    cfg_pairs: bool = True
    # Default switch step (``switch_step=None``): this share of the steps runs the structure phase; None
    # keeps the reference's fixed step 20 (SD3).
    structure_share: float | None = None

    def resolve_config(self, config, num_steps: int):
        """``config`` (an SDTMConfig) with ``switch_step=None`` replaced by this family's default for
        ``num_steps`` steps: 20, or the last step of the first ``structure_share`` of the steps."""
        return config.resolved(num_steps, self.structure_share)

    def matches(self, transformer: torch.nn.Module) -> bool:
        return any(cls.__name__ == self.transformer_class for cls in type(transformer).__mro__)

    def forward_for(self, block: torch.nn.Module) -> Callable[..., Any] | None:
        """SDTM's forward for ``block``'s class (None for modules SDTM does not patch)."""
        for cls in type(block).__mro__:
            if cls.__name__ in self.block_forwards:
                return self.block_forwards[cls.__name__]
        return None

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks to patch, in module order (the order a diffusers transformer calls them); raises
        ValueError for a block variant SDTM cannot run."""
        blocks = [m for m in transformer.modules() if self.forward_for(m) is not None]
        if not blocks:
            kinds = " / ".join(self.block_forwards)
            raise ValueError(f"{type(transformer).__name__} has no {kinds} blocks.")
        for block in blocks:
            self.check_block(block)
        return blocks

    def check_block(self, block: torch.nn.Module) -> None:
        """Raise a ValueError when ``block`` is a variant the forward does not handle."""

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        """The block's sub-layers whose outputs are unmerged and cached, each with its kind: "attn" (merges
        in the structure phase) or "mlp" (merges in both phases)."""
        raise NotImplementedError

    def attention_modules(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """The block's attention modules (diffusers' attention classes among its children): a hook on one
        that returns stored outputs stops SDTM merging the block's attention."""
        from diffusers.hooks._common import _ATTENTION_CLASSES

        return [m for m in block.children() if isinstance(m, _ATTENTION_CLASSES)]

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
