"""A named step cache on a transformer, on a deterministic schedule, with a count of what it computed.

Step caches reuse or predict the output of blocks at some denoising steps instead of computing them. Most
decide from the data (a threshold on how much the first block's output changed), which on random weights
skips arbitrary steps; here each runs on a fixed steps mask instead, computing about ``COMPUTE_SHARE`` of
the steps: the first ``warm-up`` steps, then every other step (``steps_mask``). Names (``CACHES``):

- ``none``: no cache; the blocks are still counted.
- ``fbcache``: diffusers' FirstBlockCache. The first block runs at every step; the others run at the mask's
  steps and are replaced by the stored residual of the last computed step elsewhere (its threshold is set
  per step: below any change at computed steps, above any at cached ones). Through ``enable_cache`` on a
  ``CacheMixin`` transformer. A family that cannot take it says why (``ModelAdapter.cache_refusals``).
- ``taylorseer``: diffusers' TaylorSeerCache on the blocks (``cache_interval`` 2 after the warm-up steps,
  first-order Taylor factors in float32): a block not computed returns its predicted output. Where the
  last block's outputs cannot be recorded (``ModelAdapter.taylorseer_skips_last_block``), every block but
  the last, which runs at every step.
- ``cache-dit``: cache-dit's DBCache with the static steps mask and ``Fn_compute_blocks=1`` (the first block
  runs at every step, the others at the mask's steps), applied to the transformer alone (no pipeline class
  is patched). An optional extra: ``pip install -e .[cache]``.

Transformers that are not diffusers ``CacheMixin`` models get the cache through its ``apply_*`` function,
and a transformer called outside a pipeline (``sdtm bench``) gets no cache context from anyone: a forward pre-hook on the transformer starts
each generation itself (a new ``scheduler.timesteps`` tensor: diffusers' caches reset with
``reset_stateful_hooks`` and given the context ``"cond"`` where none is set, cache-dit's context refreshed)
and sets the step's FirstBlockCache threshold. ``StepCache.disable`` removes every hook it added and what
cache-dit leaves on the transformer.

What was computed is counted outside the caches: a torch forward pre-hook on one sub-module of each block
that every real forward of the block calls (diffusers' and SDTM's merging ones alike), so it fires only
when the block really runs, not when a cache hook returns a stored or predicted output in its place.
``StepCache.report()`` describes the last generation: block calls computed out of all, and the steps at
which every block was computed.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch

CACHES = ("none", "fbcache", "taylorseer", "cache-dit")
COMPUTE_SHARE = 0.7  # the share of the steps a cache's mask computes
CACHE_DIT_MISSING = "cache-dit is not installed: pip install -e .[cache]"


def warmup_steps(steps: int, share: float = COMPUTE_SHARE) -> int:
    """The steps computed before caching starts (at least 1): the mask then computes every other step, and
    the warm-up is chosen so that about ``share`` of ``steps`` are computed."""
    target = round(share * steps)
    return min(range(1, steps + 1), key=lambda b: (abs(b + (steps - b) // 2 - target), b))


def steps_mask(steps: int, share: float = COMPUTE_SHARE) -> list[int]:
    """1 for each step computed, 0 for each step cached: steps ``0 .. b-1`` (``b = warmup_steps``), then
    ``b + 1, b + 3, ...`` (TaylorSeer's ``cache_interval=2, disable_cache_before_step=b``)."""
    b = warmup_steps(steps, share)
    return [1 if s < b or (s - b - 1) % 2 == 0 else 0 for s in range(steps)]


def runs_on(name: str) -> list[str]:
    """The registered families cache ``name`` runs on (``ModelAdapter.cache_refusals``)."""
    from ..models import families

    return [adapter.name for adapter in families() if name not in adapter.cache_refusals]


def check_cache(name: str, family: str) -> None:
    """Raise a one-line ValueError unless cache ``name`` runs on model ``family`` (a registered family's
    name) here: an unknown name, a family it cannot run on, or cache-dit missing."""
    from ..models import family as family_named

    if name not in CACHES:
        raise ValueError(f"--cache must be one of {', '.join(CACHES)}, got {name!r}.")
    reason = family_named(family).cache_refusals.get(name)
    if reason is not None:
        others = sorted(c for c in CACHES if c not in ("none", name) and c not in family_named(family).cache_refusals)
        raise ValueError(f"--cache {name} does not run on {family}: {reason}; use --cache {' or '.join(others)} "
                         f"({name} runs on {' and '.join(runs_on(name))}).")
    if name == "cache-dit":
        import_cache_dit()


def import_cache_dit():
    """The ``cache_dit`` module with its log lines (written to stdout) cut to errors; a one-line ValueError
    naming the extra when it is not installed."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    try:
        import cache_dit
    except ImportError:
        raise ValueError(CACHE_DIT_MISSING) from None
    for handler in logging.getLogger("CACHE_DIT").handlers:
        handler.setLevel(max(handler.level, logging.ERROR))
    return cache_dit


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in the order the transformer calls them (every kind, in module order)."""
    from ..models import adapter_for

    return adapter_for(transformer).blocks(transformer)


def _witness(block: torch.nn.Module, witnesses: tuple[str, ...]) -> torch.nn.Module:
    """The first of ``witnesses`` (``ModelAdapter.cache_witnesses``) that ``block`` has: a sub-module every
    real forward of the block calls (diffusers' and SDTM's)."""
    for name in witnesses:
        module = getattr(block, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"cannot count the calls of a {type(block).__name__}: it has none of {', '.join(witnesses)}.")


def _state_managers(transformer: torch.nn.Module) -> list:
    """The StateManagers of the stateful diffusers hooks under ``transformer`` (where the cache context is)."""
    from diffusers.hooks.hooks import StateManager

    managers = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            if hook._is_stateful:
                managers += [value for value in vars(hook).values() if isinstance(value, StateManager)]
    return managers


def _invalidate_registry_caches(transformer: torch.nn.Module) -> None:
    """diffusers' registries cache the registries below them; blocks gained or lost hooks."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


class StepCache:
    """Cache ``name`` applied to ``transformer`` for generations of ``steps`` steps driven by ``scheduler``
    (see the module's description). ``disable()`` undoes everything; ``report()`` describes the last
    generation."""

    def __init__(self, name: str, transformer: torch.nn.Module, steps: int, scheduler: Any):
        from ..models import adapter_for

        self.adapter = adapter_for(transformer)
        self.family = self.adapter.name
        check_cache(name, self.family)
        if scheduler is None or not hasattr(scheduler, "timesteps"):
            raise ValueError("a step cache needs the scheduler that drives the transformer.")
        self.name, self.transformer, self.steps, self.scheduler = name, transformer, steps, scheduler
        self.mask = [1] * steps if name == "none" else steps_mask(steps)
        self.warmup = steps if name == "none" else warmup_steps(steps)
        self.blocks = transformer_blocks(transformer)
        # Modules that had a diffusers hook registry before: the others lose the empty one left at the end.
        self._had_registry = {id(m) for m in (transformer, *self.blocks) if hasattr(m, "_diffusers_hook")}
        self._leader = None  # FirstBlockCache's hook on the first block
        self._managers: list = []  # the diffusers cache's StateManagers (fbcache, taylorseer)
        self._cache_dit = None  # (cache_dit, what enable_cache was given, its config, attributes before)
        self._timesteps = None
        self._ran: list[list[bool]] = []  # per call of the last generation: which blocks ran
        self._call_steps: list[int] = []  # the step of each call
        self.generations = 0
        self.enabled = True
        self._handles = [transformer.register_forward_pre_hook(self._before_call, with_kwargs=True)]
        self._handles += [_witness(block, self.adapter.cache_witnesses).register_forward_pre_hook(self._ran_hook(i))
                          for i, block in enumerate(self.blocks)]
        try:
            self._enable()
        except BaseException:
            self.enabled = False
            self._remove_handles()
            raise

    # --- applying and removing ---------------------------------------------------------------------------

    def _enable(self) -> None:
        from diffusers.models.cache_utils import CacheMixin

        transformer = self.transformer
        if self.name == "fbcache":
            from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, apply_first_block_cache

            config = FirstBlockCacheConfig(threshold=float("-inf"))
            if isinstance(transformer, CacheMixin):
                transformer.enable_cache(config)
            else:
                apply_first_block_cache(transformer, config)
            self._leader = HookRegistry.check_if_exists_or_initialize(self.blocks[0]).hooks["fbc_leader_block_hook"]
        elif self.name == "taylorseer":
            from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

            config = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=self.warmup, max_order=1,
                                           taylor_factors_dtype=torch.float32,
                                           cache_identifiers=self._taylorseer_blocks())
            if isinstance(transformer, CacheMixin):
                transformer.enable_cache(config)
            else:
                apply_taylorseer_cache(transformer, config)
        elif self.name == "cache-dit":
            self._enable_cache_dit()
        if self.name in ("fbcache", "taylorseer"):
            _invalidate_registry_caches(transformer)
            self._managers = _state_managers(transformer)

    def _taylorseer_blocks(self) -> list[str]:
        """TaylorSeer's module patterns: every block (or every block but the last, where the family says
        so: ``taylorseer_skips_last_block``)."""
        if not self.adapter.taylorseer_skips_last_block:
            return [r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+"]
        count = len(self.transformer.transformer_blocks)
        if count < 2:
            raise ValueError(f"--cache taylorseer on {self.adapter.title} caches every block but the last (its "
                             "outputs cannot be recorded); this transformer has one block.")
        return [rf"transformer_blocks\.(?:{'|'.join(str(i) for i in range(count - 1))})"]

    def _enable_cache_dit(self) -> None:
        cache_dit = import_cache_dit()
        from cache_dit import DBCacheConfig
        from cache_dit.caching.block_adapters import BlockAdapterRegister

        transformer = self.transformer
        config = DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, warmup_interval=1, max_cached_steps=-1,
            max_continuous_cached_steps=-1, num_inference_steps=self.steps, enable_separate_cfg=False,
            steps_computation_mask=list(self.mask), steps_computation_policy="static")
        if BlockAdapterRegister.is_supported(transformer):  # cache-dit's own adapter of the class
            target = transformer
        else:  # the family's (e.g. the one cache-dit registers for its pipeline, on the transformer alone)
            target = self.adapter.cache_dit_target(transformer)
        before = {key: transformer.__dict__[key] for key in ("forward", "_is_patched") if key in transformer.__dict__}
        cache_dit.enable_cache(target, cache_config=copy.deepcopy(config))
        self._cache_dit = (cache_dit, target, config, before)

    def disable(self) -> None:
        """Remove the cache and the counting hooks; the transformer runs as before (idempotent)."""
        transformer = self.transformer
        if not self.enabled:
            return
        self.enabled = False
        if self.name in ("fbcache", "taylorseer"):
            from diffusers.hooks import HookRegistry
            from diffusers.models.cache_utils import CacheMixin

            if isinstance(transformer, CacheMixin):
                if transformer.is_cache_enabled:
                    transformer.disable_cache()
            else:
                names = (("fbc_leader_block_hook", "fbc_block_hook") if self.name == "fbcache"
                         else ("taylorseer_cache",))
                registry = HookRegistry.check_if_exists_or_initialize(transformer)
                for hook in names:
                    registry.remove_hook(hook, recurse=True)
            self._drop_empty_registries()
            _invalidate_registry_caches(transformer)
        elif self.name == "cache-dit":
            cache_dit, target, _, before = self._cache_dit
            cache_dit.disable_cache(target)
            for key in ("forward", "_is_patched"):  # what disable_cache leaves behind
                left = transformer.__dict__.get(key)
                if key == "forward" and getattr(left, "__self__", None) is not transformer:
                    continue  # not cache-dit's: someone else's forward since
                if key in before:
                    transformer.__dict__[key] = before[key]
                else:
                    transformer.__dict__.pop(key, None)
            self._cache_dit = None
        self._leader, self._managers = None, []
        self._remove_handles()

    def _drop_empty_registries(self) -> None:
        """Remove the hook registries diffusers leaves empty on modules that had none before (and the
        ``forward`` attribute it set back, the class's own)."""
        for module in (self.transformer, *self.blocks):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or registry.hooks or id(module) in self._had_registry:
                continue
            del module._diffusers_hook
            forward = module.__dict__.get("forward")
            if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
                del module.forward

    def _remove_handles(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- per call -----------------------------------------------------------------------------------------

    def _ran_hook(self, index: int):
        def hook(module, args):
            if self._ran:
                self._ran[-1][index] = True
        return hook

    def _before_call(self, module, args, kwargs) -> None:
        timesteps = self.scheduler.timesteps
        if timesteps is not self._timesteps:
            self._start_generation(timesteps)
        step = self.scheduler.step_index or 0  # None before the generation's first scheduler step
        self._call_steps.append(step)
        self._ran.append([False] * len(self.blocks))
        if self._leader is not None:  # FirstBlockCache: compute or reuse the other blocks per the mask
            computed = step >= len(self.mask) or self.mask[step]
            self._leader.threshold = float("-inf") if computed else float("inf")
        if self._managers and self._managers[0]._context is None:  # no pipeline set one
            from diffusers.hooks.hooks import CacheContext

            for manager in self._managers:
                manager.set_context(CacheContext("cond"))

    def _start_generation(self, timesteps) -> None:
        if timesteps is not None and len(timesteps) != self.steps and self.name != "none":
            raise ValueError(f"the {self.name} cache was set up for {self.steps} steps; this generation has "
                             f"{len(timesteps)}: set it up again for that many steps.")
        self._timesteps = timesteps
        self._ran, self._call_steps = [], []
        self.generations += 1
        if self._managers:
            context = self._managers[0]._context  # a pipeline's own (e.g. "cond"), kept
            for manager in self._managers:
                manager.reset()  # what reset_stateful_hooks does to each of these hooks
                manager.set_context(context)
        elif self.name == "cache-dit":
            cache_dit, _, config, _ = self._cache_dit
            cache_dit.refresh_context(self.transformer, cache_config=copy.deepcopy(config))

    # --- reporting ----------------------------------------------------------------------------------------

    def schedule(self) -> dict:
        """The deterministic schedule: the steps mask, how many steps it computes, and in words."""
        text = {
            "none": "no cache: every step computed",
            "fbcache": (f"FirstBlockCache: first block every step, the others at the mask's steps (steps 0-"
                        f"{self.warmup - 1}, then every other step)"),
            "taylorseer": (f"TaylorSeerCache on the blocks"
                           f"{' but the last' if self.adapter.taylorseer_skips_last_block else ''}: "
                           f"cache_interval 2, disable_cache_before_step {self.warmup}"),
            "cache-dit": (f"cache-dit DBCache: static steps mask, Fn_compute_blocks 1, Bn_compute_blocks 0 (steps 0-"
                          f"{self.warmup - 1}, then every other step)"),
        }[self.name]
        return {"steps": self.steps, "mask": list(self.mask), "computed_steps": sum(self.mask), "description": text}

    def report(self) -> dict:
        """What the last generation computed: transformer calls, block calls computed out of all, and the
        steps at which every block of every call was computed."""
        per_step: dict[int, list[bool]] = {}
        for step, ran in zip(self._call_steps, self._ran):
            per_step.setdefault(step, []).extend(ran)
        computed = sum(sum(ran) for ran in self._ran)
        total = len(self._ran) * len(self.blocks)
        full = [step for step, ran in sorted(per_step.items()) if all(ran)]
        return {"cache": self.name, "schedule": self.schedule(), "calls": len(self._ran), "blocks": len(self.blocks),
                "block_calls": total, "computed_block_calls": computed,
                "computed_block_share": computed / total if total else None,
                "steps": len(per_step), "steps_all_blocks_computed": full, "computed_steps": len(full)}


def apply_cache(name: str, target: Any, steps: int, scheduler: Any = None) -> StepCache:
    """Cache ``name`` on a pipeline (its transformer and scheduler) or on a transformer driven by
    ``scheduler``, for generations of ``steps`` steps; returns the StepCache (``disable()`` removes it)."""
    transformer = getattr(target, "transformer", target)
    scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    return StepCache(name, transformer, steps, scheduler)


def sdtm_record_counts(transformer: torch.nn.Module) -> dict[str, int] | None:
    """SDTM's records of the last generation by mode (merged, protected, unchanged, skipped); None
    without SDTM."""
    from ..core.patch import sdtm_state

    state = sdtm_state(transformer)
    if state is None:
        return None
    counts = {mode: 0 for mode in ("merged", "protected", "unchanged", "skipped")}
    for record in state.records:
        counts[record.mode] = counts.get(record.mode, 0) + 1
    return counts
