import math

import pytest

from sdtm import SDTMConfig
from sdtm.core.schedule import (
    BlockMode,
    Phase,
    block_action,
    is_protected_layer,
    is_protected_step,
    phase_at_step,
    ratio_at_step,
    sources_to_merge,
    tokens_to_remove,
    windows_to_merge,
)


def test_cosine_ratio_schedule_by_hand():
    c = SDTMConfig()  # ratio 0.3, deviation 0.2
    assert ratio_at_step(c, 0, 50) == pytest.approx(0.5)
    assert ratio_at_step(c, 49, 50) == pytest.approx(0.1)
    assert ratio_at_step(c, 2, 4) == pytest.approx(0.1 + 0.4 * math.cos(math.pi / 3))  # 0.3
    assert ratio_at_step(c, 0, 1) == pytest.approx(0.5)  # S == 1: progress 0


def test_tokens_and_group_counts():
    assert tokens_to_remove(4096, 0.5) == 2048
    assert tokens_to_remove(4096, 0.1) == 409
    assert tokens_to_remove(10, 0.05) == 0
    # K = 4: reduce_num // 3 // 16 * 16, i.e. the reference's reduce_num // 48 * 16
    assert windows_to_merge(2048, 4, 1024) == 672 == 2048 // 48 * 16
    assert windows_to_merge(47, 4, 1024) == 0
    assert windows_to_merge(4096, 4, 1024) == 1024  # capped at the complete windows
    assert windows_to_merge(100, 9, 50) == 0  # K = 9: 100 // 8 = 12 -> 0
    assert windows_to_merge(200, 9, 50) == 16
    assert sources_to_merge(409, 3072) == 400
    assert sources_to_merge(5000, 100) == 96


def test_phases_and_protection():
    c = SDTMConfig(switch_step=20, protect_steps_frequency=3, protect_layers_frequency=4)
    assert phase_at_step(c, 20) is Phase.STRUCTURE and phase_at_step(c, 21) is Phase.DETAIL
    assert [s for s in range(10) if is_protected_step(c, s)] == [0, 3, 6, 9]
    assert [layer for layer in range(10) if is_protected_layer(c, layer, 10)] == [0, 4, 8, 9]
    off = SDTMConfig(protect_steps_frequency=None, protect_layers_frequency=0)
    assert not any(is_protected_step(off, s) for s in range(10))
    assert not any(is_protected_layer(off, layer, 10) for layer in range(10))


def test_block_action_modes():
    c = SDTMConfig(switch_step=2, protect_steps_frequency=3)
    protected = block_action(c, 3, 10, 0, 4, 1024)
    # Protected steps store both caches whatever the phase (one block form per mode, see block_action).
    assert protected.mode is BlockMode.PROTECTED and protected.store_mlp_cache and protected.store_attn_cache
    ssm = block_action(c, 1, 10, 0, 4, 1024)
    assert (ssm.mode, ssm.phase, ssm.merge_attn, ssm.merge_mlp) == (BlockMode.MERGED, Phase.STRUCTURE, True, True)
    assert ssm.reduce_num == int(1024 * ratio_at_step(c, 1, 10))
    # The attention cache written at step 1 is read at step 2 (a structure step): stored.
    assert ssm.store_attn_cache and ssm.store_mlp_cache
    idm = block_action(c, 4, 10, 0, 4, 1024)
    assert (idm.phase, idm.merge_attn, idm.merge_mlp, idm.store_attn_cache) == (Phase.DETAIL, False, True, False)
    last = block_action(c, 10, 11, 0, 4, 1024)  # the last step stores too: one form for every IDM step
    assert (last.mode, last.store_attn_cache, last.store_mlp_cache) == (BlockMode.MERGED, False, True)
    never = block_action(SDTMConfig(switch_step=0, protect_steps_frequency=3), 3, 10, 0, 4, 1024)
    assert not never.store_attn_cache  # attention never merges after step 0: its cache is never read
    zero = block_action(SDTMConfig(ratio=0.0, deviation=0.0, protect_steps_frequency=-1), 1, 10, 0, 4, 1024)
    assert zero.mode is BlockMode.UNCHANGED
    no_mlp = block_action(SDTMConfig(merge_mlp=False, switch_step=0), 1, 10, 0, 4, 1024)
    assert no_mlp.mode is BlockMode.UNCHANGED  # detail phase merges only the MLP, which is switched off
    layer = block_action(SDTMConfig(protect_layers_frequency=2), 1, 10, 3, 4, 1024)
    assert layer.mode is BlockMode.UNCHANGED and layer.reset_merge_age
    no_each = block_action(SDTMConfig(cache_each_step=False), 1, 10, 1, 4, 1024)
    assert no_each.mode is BlockMode.MERGED and not (no_each.store_attn_cache or no_each.store_mlp_cache)
