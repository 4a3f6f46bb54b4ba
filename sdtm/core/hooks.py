"""SDTM on a block as a diffusers hook: one ``ModelHook`` named ``SDTM_HOOK`` in the block's ``HookRegistry``,
always the innermost of the chain, whatever was registered before or after it.

Why innermost: every other hook of a block (a step cache, group offloading, layerwise casting) then wraps
SDTM, so a cache that skips the block skips SDTM with it, one that computes the block reaches SDTM, and an
offloading hook has moved the weights before SDTM runs. The block's class, name and ``forward`` method stay
diffusers' own, so diffusers' block registry, regional compilation (``compile_repeated_blocks``) and
``save_pretrained`` see the model they know.

diffusers' ``HookRegistry.register_hook`` always puts a new hook outermost (it wraps ``module.forward`` as it
is at that moment) and has no way to insert below existing hooks, so ``attach`` links SDTM's hook in at the
bottom of the chain itself, with the registry's own bookkeeping (``hooks``, ``_hook_order``, ``_fn_refs``),
so diffusers can still list, reset and remove it by name. ``detach`` unlinks it from wherever it sits now
and leaves every other hook working (``HookRegistry.remove_hook`` would drop the ``new_forward`` of the hook
above an inner one).

The chain is built from bound methods and partials, no closures, so a deep copy of a patched module calls
its own copy's hook and blocks.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import HookFunctionReference

SDTM_HOOK = "sdtm"


class SDTMBlockHook(ModelHook):
    """Runs a block the way its ``BlockLink`` says at this call: the rest of the chain (the block's own
    forward) when SDTM leaves it unchanged, else the family's merging forward ``forward(link, block, *args,
    **kwargs)``, which calls the block's sub-modules (and their hooks) itself.

    ``link.ran`` tells the transformer's pre-hook of the next call whether the block ran in this one (a
    step cache may skip it; see ``SDTMState.settle``)."""

    _is_stateful = False

    def __init__(self, link: Any, forward: Callable[..., Any]):
        super().__init__()
        self.link = link
        self.forward = forward

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        link = self.link
        link.ran = True
        if link.runs_unchanged():
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.forward(link, module, *args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise pickle.PicklingError(
            "this module has SDTM applied (a hook on each block, tied to the pipeline's state); call "
            "remove_SDTM(pipe) before torch.save / pickle, and apply_SDTM again after loading."
        )

    def __deepcopy__(self, memo: dict) -> "SDTMBlockHook":
        import copy

        copied = SDTMBlockHook.__new__(SDTMBlockHook)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied


class _ChainStep:
    """One hook's place in a registry chain: ``pre_forward``, then the next forward, then ``post_forward``
    (what diffusers' registry builds as a closure, here an object a deep copy can follow)."""

    def __init__(self, fn_ref: HookFunctionReference):
        self.fn_ref = fn_ref

    def __call__(self, module: torch.nn.Module, *args, **kwargs):
        args, kwargs = self.fn_ref.pre_forward(module, *args, **kwargs)
        output = self.fn_ref.forward(*args, **kwargs)
        return self.fn_ref.post_forward(module, output)


def attach(block: torch.nn.Module, hook: SDTMBlockHook) -> None:
    """Register ``hook`` as ``SDTM_HOOK`` at the bottom of ``block``'s hook chain (first to see the block's
    own forward, last to be called)."""
    registry = HookRegistry.check_if_exists_or_initialize(block)
    if SDTM_HOOK in registry.hooks:
        raise ValueError(f"the block already has a hook named {SDTM_HOOK!r}; remove_SDTM first.")
    block = hook.initialize_hook(block)
    if registry._fn_refs:  # below the first hook: whatever it called is what SDTM calls now
        first = registry._fn_refs[0]
        base = first.original_forward if first.original_forward is not None else first.forward
    else:
        base = block.forward
    fn_ref = HookFunctionReference()
    fn_ref.pre_forward, fn_ref.post_forward = hook.pre_forward, hook.post_forward
    fn_ref.original_forward = base
    fn_ref.forward = functools.partial(hook.new_forward, block)
    # Wrapped from the block's own forward, so ``inspect.signature`` shows the real signature.
    chained = functools.update_wrapper(functools.partial(_ChainStep(fn_ref), block), base)
    if registry._fn_refs:
        _point_at(registry._fn_refs[0], chained)
    else:
        block.forward = chained
    hook.fn_ref = fn_ref
    registry.hooks = {SDTM_HOOK: hook, **registry.hooks}  # first in the dict: pickling meets it first
    registry._hook_order.insert(0, SDTM_HOOK)
    registry._fn_refs.insert(0, fn_ref)


def detach(block: torch.nn.Module) -> None:
    """Unlink ``SDTM_HOOK`` from ``block``'s chain, wherever it sits, and leave the other hooks as they are.
    Without other hooks the block is as before: no registry and no ``forward`` attribute of SDTM's."""
    registry = getattr(block, "_diffusers_hook", None)
    if registry is None or SDTM_HOOK not in registry.hooks:
        return
    index = registry._hook_order.index(SDTM_HOOK)
    below = registry._fn_refs[index].original_forward
    if index == len(registry._fn_refs) - 1:
        if _is_own_forward(block, below):
            block.__dict__.pop("forward", None)
        else:
            block.forward = below
    else:
        _point_at(registry._fn_refs[index + 1], below)
    registry.hooks.pop(SDTM_HOOK).deinitalize_hook(block)
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)
    if not registry.hooks and "forward" not in block.__dict__:
        del block._diffusers_hook


def attached_hook(block: torch.nn.Module) -> SDTMBlockHook | None:
    registry = getattr(block, "_diffusers_hook", None)
    return None if registry is None else registry.hooks.get(SDTM_HOOK)


def foreign_hooks(module: torch.nn.Module) -> list[str]:
    """Names of the diffusers hooks on ``module`` other than SDTM's."""
    registry = getattr(module, "_diffusers_hook", None)
    return [] if registry is None else [name for name in registry._hook_order if name != SDTM_HOOK]


def replaces_output(module: torch.nn.Module) -> bool:
    """Whether a hook on ``module`` other than SDTM's may return something other than the module's own
    computation (it defines ``new_forward``: a cache returning a stored output); hooks that only touch
    inputs and weights (layerwise casting, offloading) do not."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return False
    return any(hasattr(hook, "new_forward") for name, hook in registry.hooks.items() if name != SDTM_HOOK)


def _point_at(fn_ref: HookFunctionReference, forward: Callable) -> None:
    """Make the hook of ``fn_ref`` call ``forward`` as the next step of the chain."""
    if fn_ref.original_forward is not None:  # a hook with new_forward calls original_forward
        fn_ref.original_forward = forward
    else:
        fn_ref.forward = forward


def _is_own_forward(block: torch.nn.Module, forward: Callable) -> bool:
    return getattr(forward, "__self__", None) is block and getattr(forward, "__func__", None) is type(block).forward
