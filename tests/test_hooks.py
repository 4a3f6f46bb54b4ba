"""SDTM's block hook in diffusers' HookRegistry: innermost whatever the order, removable from anywhere in
the chain, other hooks untouched, blocks keep their class, copies call their own hooks, pickling refused
with the way out."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from support import generate
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core.hooks import SDTM_HOOK

MERGING = dict(ratio=0.5, deviation=0.0, switch_step=3)


class Counting(ModelHook):
    """Counts the calls that reach it; with ``skip_every`` it returns the block's input instead of calling
    on (a stand-in for a cache that skips a block), otherwise it calls the rest of the chain."""

    def __init__(self, skip_every: int = 0):
        super().__init__()
        self.calls = self.skipped = 0
        self.skip_every = skip_every

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        if self.skip_every and self.calls % self.skip_every == 0:
            self.skipped += 1
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            return (None if module.context_pre_only else context), hidden
        return self.fn_ref.original_forward(*args, **kwargs)


class Tagging(ModelHook):
    """Only pre/post processing (as offloading and casting hooks): counts its pre_forward calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def _register(pipe, hook_factory, name):
    hooks = []
    for block in pipe.transformer.transformer_blocks:
        hook = hook_factory()
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, name)
        hooks.append(hook)
    return hooks


def _remove(pipe, name):
    for block in pipe.transformer.transformer_blocks:
        block._diffusers_hook.remove_hook(name, recurse=False)


@pytest.mark.parametrize("order", ["hook_first", "sdtm_first"])
def test_sdtm_is_innermost_in_either_order_and_other_hooks_still_run(sd3_pipe, order):
    merged_alone = None
    apply_SDTM(sd3_pipe, **MERGING)
    merged_alone = generate(sd3_pipe)
    remove_SDTM(sd3_pipe)
    if order == "hook_first":
        tags, counts = _register(sd3_pipe, Tagging, "tag"), _register(sd3_pipe, Counting, "count")
        apply_SDTM(sd3_pipe, **MERGING)
    else:
        apply_SDTM(sd3_pipe, **MERGING)
        tags, counts = _register(sd3_pipe, Tagging, "tag"), _register(sd3_pipe, Counting, "count")
    try:
        for block in sd3_pipe.transformer.transformer_blocks:
            assert block._diffusers_hook._hook_order[0] == SDTM_HOOK
        out = generate(sd3_pipe)
        calls = 8 * 1  # steps x calls per step (CFG in one batch)
        assert all(h.calls == calls for h in tags + counts)
        assert any(r.mode == "merged" for r in sdtm_state(sd3_pipe).records)
        assert torch.equal(out, merged_alone)  # the outer hooks change nothing; SDTM ran below them
    finally:
        remove_SDTM(sd3_pipe)
        _remove(sd3_pipe, "count")
        _remove(sd3_pipe, "tag")


def test_removing_either_side_leaves_the_other_working(sd3_pipe):
    unpatched = generate(sd3_pipe)
    apply_SDTM(sd3_pipe, **MERGING)
    merged = generate(sd3_pipe)
    counts = _register(sd3_pipe, Counting, "count")
    remove_SDTM(sd3_pipe)  # SDTM below the other hook: unlinked, the other hook calls the block directly
    assert torch.equal(generate(sd3_pipe), unpatched) and all(h.calls == 8 for h in counts)
    apply_SDTM(sd3_pipe, **MERGING)  # spliced in below the existing hook again
    assert torch.equal(generate(sd3_pipe), merged) and all(h.calls == 16 for h in counts)
    _remove(sd3_pipe, "count")  # the other hook goes: SDTM alone
    assert torch.equal(generate(sd3_pipe), merged)
    remove_SDTM(sd3_pipe)
    for block in sd3_pipe.transformer.transformer_blocks:
        assert "forward" not in vars(block)  # diffusers' remove_hook pins the bound forward; SDTM does not add one
    assert torch.equal(generate(sd3_pipe), unpatched)


def test_a_skipping_hook_is_recorded_and_leaves_state_as_if_not_called(sd3_pipe):
    apply_SDTM(sd3_pipe, **MERGING)
    counts = _register(sd3_pipe, lambda: Counting(skip_every=2), "skipper")
    try:
        generate(sd3_pipe)
        state = sdtm_state(sd3_pipe)
        skipped = [r for r in state.records if r.mode == "skipped"]
        assert len(skipped) == sum(h.skipped for h in counts) > 0
        assert all(r.attn_tokens == r.mlp_tokens == 0 for r in skipped)
        assert all(r.step % 2 == 1 for r in skipped)  # every second call of each block
        assert any(r.mode == "merged" for r in state.records)
        assert state.skipped_blocks == len(skipped)
    finally:
        remove_SDTM(sd3_pipe)
        _remove(sd3_pipe, "skipper")


def test_deep_copy_calls_its_own_blocks(sd3_pipe):
    apply_SDTM(sd3_pipe, **MERGING)
    expected = generate(sd3_pipe)
    twin = copy.deepcopy(sd3_pipe)
    remove_SDTM(sd3_pipe)  # the original's hooks gone: the copy keeps its own
    assert torch.equal(generate(twin), expected)
    assert sdtm_state(twin).records and sdtm_state(sd3_pipe) is None


def test_pickling_a_patched_model_names_the_way_out(sd3_pipe):
    apply_SDTM(sd3_pipe, **MERGING)
    with pytest.raises(pickle.PicklingError, match=r"remove_SDTM"):
        torch.save(sd3_pipe.transformer, io.BytesIO())
    remove_SDTM(sd3_pipe)
    torch.save(sd3_pipe.transformer, io.BytesIO())
