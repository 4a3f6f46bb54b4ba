"""Shared machinery of the block oracles (tests/test_sd3_oracle.py, tests/test_flux_oracle.py,
tests/test_pixart_oracle.py).

One generation runs with SDTM (torch backend, no randomness, no step protection), and every merged block
call is recorded: its inputs and outputs, the plan SDTM used (through a wrapped
``sdtm.core.engine.compute_plan``), the caches it read and the caches it stored. The oracles recompute each
call from diffusers' own sub-modules with the pieces here: tokens merged by group means over the plan's
slots, outputs unmerged and blended with the cache (``mcw * y + (1 - mcw) * cache`` on blended rows), and
checks that the plan merges and blends the 2 x 2 windows the SPEC says. Nothing of sdtm/models or
sdtm/core/reference.py is used to recompute.

A module of its own (not conftest.py), imported like tests/support.py.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from support import assert_close
from sdtm import apply_SDTM, remove_SDTM, sdtm_state
from sdtm.core import engine
from sdtm.core.hooks import attached_hook
from sdtm.core.schedule import Phase

MCW = 0.25
STEPS = 5
SETTINGS = dict(backend="torch", use_rand=False, ratio=0.5, deviation=0.0, switch_step=2,
                protect_steps_frequency=0, mcw=MCW)
RTOL, ATOL = 1e-5, 1e-5


@dataclass
class BlockCall:
    block: torch.nn.Module
    step: int
    phase: Phase
    merge_attn: bool
    merge_mlp: bool
    inputs: dict
    caches: dict[str, torch.Tensor]
    merge_age: torch.Tensor | None
    plan: object = None
    metric: torch.Tensor | None = None
    outputs: tuple = ()
    stored: dict[str, torch.Tensor] = field(default_factory=dict)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    return value


def record_merged_calls(pipe, monkeypatch, run) -> list[BlockCall]:
    """Every call of a patched block during ``run()`` that computed a merge plan."""
    calls: list[BlockCall] = []
    active: list[BlockCall | None] = []
    original_plan = engine.compute_plan

    def recording_plan(link, metric, ops):
        plan = original_plan(link, metric, ops)
        call = active[-1]
        call.plan, call.metric = plan, metric.detach().clone()
        return plan

    def before(block, args, kwargs):
        link = attached_hook(block).link
        bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
        bound.apply_defaults()
        inputs = {k: _snapshot(v) for k, v in bound.arguments.items() if k != "self"}
        action = link.action
        active.append(BlockCall(
            block=block, step=link.state.step, phase=action.phase, merge_attn=action.merge_attn,
            merge_mlp=action.merge_mlp, inputs=inputs,
            caches={name: cache.clone() for name, cache in link.cache_in.items()},
            merge_age=link.stream.merge_age.clone() if link.age_exists else None,
        ))

    def after(block, args, kwargs, output):
        call = active.pop()
        if call.plan is not None:
            call.outputs = _snapshot(output)
            call.stored = {name: cache.clone() for name, cache in attached_hook(block).link.cache_out.items()}
            calls.append(call)

    monkeypatch.setattr(engine, "compute_plan", recording_plan)
    handles = []
    for link in sdtm_state(pipe).links:
        block = link.block
        handles.append(block.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(block.register_forward_hook(after, with_kwargs=True))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def record_generation(pipe, generate: Callable[[], object], height: int, width: int) -> list[BlockCall]:
    """The merged block calls of one ``generate()`` of ``pipe`` with SDTM applied with SETTINGS (removed
    afterwards), checking that SDTM saw the (height / 2) x (width / 2) token grid."""
    apply_SDTM(pipe, **SETTINGS)
    monkeypatch = pytest.MonkeyPatch()
    try:
        calls = record_merged_calls(pipe, monkeypatch, generate)
        grid = sdtm_state(pipe).grid
    finally:
        monkeypatch.undo()
        remove_SDTM(pipe)
    assert (grid.height, grid.width) == (height // 2, width // 2)
    return calls


# ----------------------------------------------------------------------------- the oracle's own pieces
def merge(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [M, C]: row m is the mean of the tokens whose slot is m."""
    membership = F.one_hot(slot, int(slot.max()) + 1).to(x.dtype)  # [N, M]
    return (membership.T @ x) / membership.sum(0)[:, None]


def unmerge(y: torch.Tensor, slot: torch.Tensor, blend: torch.Tensor, cache: torch.Tensor | None,
            mcw: float) -> torch.Tensor:
    """[M, C] -> [N, C]: each token takes its row; blended tokens mix with the cache when there is one."""
    u = y[slot]
    if cache is None:
        return u
    return torch.where(blend[:, None], mcw * u + (1 - mcw) * cache, u)


def destinations(slot: torch.Tensor) -> torch.Tensor:
    """[M] the first token (lowest index) of each merged row: a window's destination without randomness."""
    rows = int(slot.max()) + 1
    tokens = torch.arange(slot.shape[0])
    return torch.full((rows,), slot.shape[0], dtype=torch.int64).scatter_reduce(0, slot, tokens, "amin")


def window_of(height: int, width: int) -> torch.Tensor:
    """[N] the complete 2 x 2 window of each token, -1 for border tokens."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    index = (rows // 2) * (width // 2) + cols // 2
    complete = (rows < height // 2 * 2) & (cols < width // 2 * 2)
    return torch.where(complete, index, -1).flatten()


def expected_blend(call: BlockCall, sample: int, height: int, width: int) -> torch.Tensor:
    """[N] bool, the tokens the SPEC blends: SSM, the tokens of merged windows (groups of all 4 tokens of
    one window); IDM, every window destination (largest merge age, first on ties; the first token
    before any) and every source merged into one."""
    slot = call.plan.slot[sample]
    sizes = torch.bincount(slot)
    grouped = sizes[slot] > 1
    windows = window_of(height, width)
    if call.phase is Phase.STRUCTURE:  # whole windows: every group's tokens share one complete window
        assert set(sizes.tolist()) <= {1, 4}
        lowest = windows.new_full(sizes.shape, 1 << 30).scatter_reduce(0, slot, windows, "amin")
        highest = windows.new_full(sizes.shape, -2).scatter_reduce(0, slot, windows, "amax")
        assert bool((lowest == highest)[sizes == 4].all()) and bool((lowest[sizes == 4] >= 0).all())
        return grouped
    border = int((windows < 0).sum())
    table = torch.sort(windows, stable=True).indices[border:].view(-1, 4)  # [W, 4] tokens, row-major
    if call.merge_age is None:
        dst = table[:, 0]
    else:
        dst = table.gather(1, call.merge_age[sample][table].argmax(1, keepdim=True)).squeeze(1)
    is_dst = torch.zeros_like(grouped)
    is_dst[dst] = True
    return grouped | is_dst


def cache_row(call: BlockCall, name: str, sample: int) -> torch.Tensor | None:
    """The cache the call read for sub-layer ``name``, one sample's rows [N, C], or None for none."""
    cache = call.caches.get(name)
    return None if cache is None else cache[sample]


def check_plan_merges(call: BlockCall, sample: int, height: int, width: int) -> torch.Tensor:
    """Check that the call's plan really merges and blends the tokens the SPEC says; returns its blend row."""
    slot, blend = call.plan.slot[sample], call.plan.blend[sample]
    assert call.plan.num_merged < slot.shape[0] - 16, "the plan merges (almost) nothing"
    assert torch.equal(blend, expected_blend(call, sample, height, width))
    if call.phase is Phase.STRUCTURE:  # the plan's members list each group's destination first
        first = call.plan.members[sample].gather(0, call.plan.offsets[sample, :-1])
        assert torch.equal(first, destinations(slot))
    return blend


# ----------------------------------------------------------------------------- checks of a recorded call
def check_stored_caches(call: BlockCall, full: dict[str, torch.Tensor], where: str) -> None:
    """The caches the call stored are the oracle's full sub-layer outputs."""
    assert call.stored, "a merged call stores its outputs (cache_each_step)"
    for name, stored in call.stored.items():
        assert_close(stored, full[name], RTOL, ATOL, f"stored {name} cache ({where})")


def check_blend_visible(call: BlockCall, got: torch.Tensor, unblended: torch.Tensor,
                        unblended_full: dict[str, torch.Tensor]) -> None:
    """Without the blend (the oracle at mcw = 1) the oracle misses the call's output and stored caches."""
    assert not torch.allclose(got, unblended, rtol=1e-3, atol=1e-4)
    for name in call.caches:
        assert not torch.allclose(call.stored[name], unblended_full[name], rtol=1e-3, atol=1e-4)
