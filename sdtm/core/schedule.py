"""The SDTM schedule: how many tokens a block removes at a step, in which phase, and what is protected.

Pure functions of (config, step, layer); no tensors. Steps ``s`` run from 0 to ``num_steps - 1``, layers
``l`` from 0 to ``num_layers - 1``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from enum import Enum

from .config import SDTMConfig


class Phase(str, Enum):
    STRUCTURE = "ssm"  # merge before attention and MLP, windows ranked by similarity
    DETAIL = "idm"  # merge before the MLP only, bipartite matching into window destinations


class BlockMode(str, Enum):
    UNCHANGED = "unchanged"  # the block runs exactly as without SDTM and touches no state
    PROTECTED = "protected"  # full block, outputs stored as caches for later merged steps
    MERGED = "merged"  # a merge plan is computed and at least one sub-layer runs on fewer tokens


@dataclass(frozen=True)
class BlockAction:
    """What one block does at one step.

    ``reduce_num`` is the number of tokens the schedule asks to remove (0 unless MERGED);
    ``store_attn_cache`` / ``store_mlp_cache`` say whether the full outputs of those sub-layers must be
    kept, i.e. whether a later step of this generation may read them.
    """

    mode: BlockMode
    phase: Phase
    reduce_num: int = 0
    merge_attn: bool = False
    merge_mlp: bool = False
    store_attn_cache: bool = False
    store_mlp_cache: bool = False
    reset_merge_age: bool = False


def ratio_at_step(config: SDTMConfig, step: int, num_steps: int) -> float:
    """Cosine-decayed compression ratio: ratio + deviation at step 0, ratio - deviation at the last."""
    progress = step / (num_steps - 1) if num_steps > 1 else 0.0
    alpha = math.cos(progress * math.pi / 2)
    return (config.ratio - config.deviation) + 2.0 * config.deviation * alpha


def tokens_to_remove(num_tokens: int, ratio: float) -> int:
    """``reduce_num = int(N * ratio_s)``."""
    return int(num_tokens * ratio)


def phase_at_step(config: SDTMConfig, step: int) -> Phase:
    if config.switch_step is None:
        raise ValueError("switch_step None (the model's default) must be resolved first: "
                         "ModelAdapter.resolve_config(config, num_steps).")
    return Phase.STRUCTURE if step <= config.switch_step else Phase.DETAIL


def is_protected_step(config: SDTMConfig, step: int) -> bool:
    f = config.protect_steps_frequency
    return f is not None and f > 0 and step % f == 0


def is_protected_layer(config: SDTMConfig, layer: int, num_layers: int) -> bool:
    f = config.protect_layers_frequency
    return f is not None and f > 0 and (layer % f == 0 or layer == num_layers - 1)


def windows_to_merge(reduce_num: int, window_size: int, num_windows: int) -> int:
    """SSM: whole windows to merge, a multiple of 16 (K - 1 tokens removed per window), capped."""
    return min(((reduce_num // (window_size - 1)) // 16) * 16, num_windows)


def sources_to_merge(reduce_num: int, num_candidates: int) -> int:
    """IDM: source tokens to merge into their best destination, a multiple of 16."""
    return (min(num_candidates, reduce_num) // 16) * 16


def block_action(
    config: SDTMConfig,
    step: int,
    num_steps: int,
    layer: int,
    num_layers: int,
    num_tokens: int,
    num_windows: int | None = None,
) -> BlockAction:
    """Decide what block ``layer`` does at ``step`` for an image of ``num_tokens`` tokens, ``num_windows``
    of them complete windows (None: not known, assumed > 0). With no complete window nothing can merge
    and every block is UNCHANGED."""
    phase = phase_at_step(config, step)
    if num_windows == 0:
        return BlockAction(BlockMode.UNCHANGED, phase)
    # Caches are stored wherever a later step of the generation may read them, judged per generation
    # rather than per step (a protected step of the detail phase still stores the attention output): the
    # blocks then take few distinct forms over a generation, which keeps compiled graphs and CUDA graphs
    # few. An unread cache changes no output.
    attn_cache_useful = config.merge_attn and config.switch_step >= 1 and num_steps > 1
    mlp_cache_useful = config.merge_mlp and num_steps > 1

    if is_protected_layer(config, layer, num_layers):
        return BlockAction(BlockMode.UNCHANGED, phase, reset_merge_age=True)
    if is_protected_step(config, step):
        return BlockAction(
            BlockMode.PROTECTED,
            phase,
            store_attn_cache=attn_cache_useful,
            store_mlp_cache=mlp_cache_useful,
        )
    reduce_num = tokens_to_remove(num_tokens, ratio_at_step(config, step, num_steps))
    merge_attn = config.merge_attn and phase is Phase.STRUCTURE
    merge_mlp = config.merge_mlp
    if reduce_num <= 0 or not (merge_attn or merge_mlp):
        return BlockAction(BlockMode.UNCHANGED, phase)
    if num_windows is not None and _tokens_removed(phase, reduce_num, config.window_size, num_windows) == 0:
        return BlockAction(BlockMode.UNCHANGED, phase)  # the counts round to 0: a plan would merge nothing
    each = config.cache_each_step
    return BlockAction(
        BlockMode.MERGED,
        phase,
        reduce_num=reduce_num,
        merge_attn=merge_attn,
        merge_mlp=merge_mlp,
        store_attn_cache=each and merge_attn and attn_cache_useful,
        store_mlp_cache=each and mlp_cache_useful,
    )


@functools.lru_cache(maxsize=512)
def step_program(
    config: SDTMConfig, step: int, num_steps: int, num_layers: int, num_tokens: int, num_windows: int
) -> tuple[BlockAction, ...]:
    """Every block's action at ``step``: what one transformer call does, decided once on the host."""
    return tuple(
        block_action(config, step, num_steps, layer, num_layers, num_tokens, num_windows)
        for layer in range(num_layers)
    )


def action_for_sublayers(action: BlockAction, kinds: frozenset[str], merge_attention: bool = True) -> BlockAction:
    """``action`` for a block whose sub-layers are of ``kinds`` ("attn" merges in the structure phase,
    "mlp" in both): a MERGED action that merges none of them (the detail phase in a block without an
    "mlp" sub-layer, e.g. Flux's single-stream blocks) leaves the block UNCHANGED. ``merge_attention``
    False: the block's attention-kind sub-layers never merge (and store no cache for merged steps)."""
    if not merge_attention and kinds - {"mlp"}:
        if action.mode is BlockMode.UNCHANGED:
            return action
        action = dataclasses.replace(action, merge_attn=False, store_attn_cache=False)
        if not (action.merge_mlp and "mlp" in kinds) and action.mode is BlockMode.MERGED:
            return BlockAction(BlockMode.UNCHANGED, action.phase)
        if action.mode is BlockMode.PROTECTED and not (action.store_mlp_cache and "mlp" in kinds):
            return BlockAction(BlockMode.UNCHANGED, action.phase)
        return action
    if action.mode is not BlockMode.MERGED:
        return action
    if (action.merge_attn and kinds - {"mlp"}) or (action.merge_mlp and "mlp" in kinds):
        return action
    return BlockAction(BlockMode.UNCHANGED, action.phase)


def _tokens_removed(phase: Phase, reduce_num: int, window_size: int, num_windows: int) -> int:
    """Tokens a plan of ``phase`` removes when asked for ``reduce_num``: SSM K - 1 per merged window,
    IDM one per merged source."""
    if phase is Phase.STRUCTURE:
        return windows_to_merge(reduce_num, window_size, num_windows) * (window_size - 1)
    return sources_to_merge(reduce_num, num_windows * (window_size - 1))


def merged_tokens(action: BlockAction, num_tokens: int, window_size: int, num_windows: int) -> int:
    """Image tokens a MERGED block's merged sub-layers see (``num_tokens`` for other blocks)."""
    if action.mode is not BlockMode.MERGED:
        return num_tokens
    return num_tokens - _tokens_removed(action.phase, action.reduce_num, window_size, num_windows)
