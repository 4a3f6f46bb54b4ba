"""Apply SDTM to a diffusers pipeline or transformer (any family of sdtm/models/), and remove it again."""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import torch

from . import graphs, hooks
from .config import SDTMConfig
from .families import adapter_for
from .ops import check_backend
from .state import BlockLink, SDTMState, compute_dtype

def apply_SDTM(
    pipe: Any,
    ratio: float = 0.3,
    deviation: float = 0.2,
    switch_step: int | None = None,
    use_rand: bool = True,
    seed: int = 0,
    sx: int = 2,
    sy: int = 2,
    st: int = 1,
    a_s: float = 0.05,
    a_d: float = 0.05,
    a_p: float = 2,
    pseudo_merge: bool = False,
    mcw: float = 0.1,
    protect_steps_frequency: int | None = 3,
    protect_layers_frequency: int | None = -1,
    merge_attn: bool = True,
    merge_mlp: bool = True,
    cache_each_step: bool = True,
    backend: str = "auto",
    scheduler: Any = None,
    cuda_graphs: bool = False,
) -> Any:
    """Patch a diffusers pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``PixArtSigmaPipeline``,
    ...) or its transformer with SDTM and return it; sdtm/models/ lists the supported transformers.

    Keyword names and meanings follow the public reference implementation; see ``SDTMConfig`` for each.
    ``switch_step=None`` takes the model family's default (``ModelAdapter.structure_share``: the reference's
    20, or the first share of the steps; the README lists them).
    A transformer used on its own needs ``scheduler``: the scheduler whose timesteps it is called with,
    from which SDTM derives the step. Applying twice replaces the first patch.

    Example:
        >>> pipe = apply_SDTM(pipe, ratio=0.3)   # doctest: +SKIP
        >>> image = pipe(prompt, num_inference_steps=50).images[0]   # doctest: +SKIP
    """
    config = SDTMConfig(
        ratio=ratio,
        deviation=deviation,
        switch_step=switch_step,
        use_rand=use_rand,
        seed=seed,
        sx=sx,
        sy=sy,
        st=st,
        a_s=a_s,
        a_d=a_d,
        a_p=a_p,
        pseudo_merge=pseudo_merge,
        mcw=mcw,
        protect_steps_frequency=protect_steps_frequency,
        protect_layers_frequency=protect_layers_frequency,
        merge_attn=merge_attn,
        merge_mlp=merge_mlp,
        cache_each_step=cache_each_step,
        backend=backend,
        cuda_graphs=cuda_graphs,
    )
    return apply_sdtm(pipe, config, scheduler=scheduler)


def apply_sdtm(module: Any, config: SDTMConfig | None = None, scheduler: Any = None) -> Any:
    """Patch ``module`` (pipeline or transformer) with ``config`` (default ``SDTMConfig()``); returns it."""
    if config is None:
        config = SDTMConfig()
    if not isinstance(config, SDTMConfig):
        raise TypeError(f"config must be an SDTMConfig, got {type(config).__name__}.")
    check_backend(config.backend)
    transformers = _find_transformers(module)
    prepared = [(t, adapter_for(t)) for t in transformers]
    for transformer, adapter in prepared:  # refuse before patching anything
        adapter.blocks(transformer)
    for transformer, adapter in prepared:
        _patch(transformer, adapter, config, _timesteps_source(module, scheduler, transformer))
    return module


def _patch(transformer: torch.nn.Module, adapter: Any, config: SDTMConfig, timesteps_source: Any) -> None:
    blocks = adapter.blocks(transformer)
    remove_sdtm(transformer)
    _refuse_batch_changing_caches(transformer)
    state = SDTMState(config=config, num_layers=len(blocks), timesteps_source=timesteps_source)
    state.adapter = adapter
    transformer._sdtm_state = state
    transformer._sdtm_hook = transformer.register_forward_pre_hook(_pre_forward, with_kwargs=True)
    for layer, block in enumerate(blocks):
        link = BlockLink(state, layer, block, sublayers=adapter.sublayers(block))
        state.links.append(link)
        hooks.attach(block, hooks.SDTMBlockHook(link, adapter.forward_for(block)))
    _invalidate_registry_caches(transformer)
    if config.cuda_graphs and graphs.graph_stats(transformer) is None:
        graphs.enable_cuda_graphs(transformer)
        transformer._sdtm_enabled_graphs = True


def remove_SDTM(pipe: Any) -> Any:
    """Undo ``apply_SDTM``; the model is exactly as before (other hooks on it keep working). Harmless on an
    unpatched model."""
    return remove_sdtm(pipe)


def remove_sdtm(module: Any) -> Any:
    """Undo ``apply_sdtm`` on a pipeline or transformer; returns it."""
    for transformer in _find_transformers(module):
        _unpatch(transformer)
    return module


def _unpatch(transformer: torch.nn.Module) -> None:
    hook = getattr(transformer, "_sdtm_hook", None)
    if hook is not None:
        hook.remove()
        del transformer._sdtm_hook
    if hasattr(transformer, "_sdtm_state"):
        del transformer._sdtm_state
    if transformer.__dict__.pop("_sdtm_enabled_graphs", False):
        graphs.disable_cuda_graphs(transformer)
    elif (runner := getattr(transformer, graphs.GRAPHS_ATTRIBUTE, None)) is not None:
        runner.clear()  # graphs captured with SDTM's blocks are of no use without them
    for submodule in transformer.modules():
        hooks.detach(submodule)
    _invalidate_registry_caches(transformer)


def sdtm_state(module: Any) -> SDTMState | None:
    """The SDTM state of a patched pipeline or transformer (None if unpatched): current step, caches,
    merge age and per-block token counts of the last generation (``records``)."""
    return getattr(_find_transformer(module), "_sdtm_state", None)


def _find_transformers(module: Any) -> list[torch.nn.Module]:
    """The transformer of a pipeline (and its second expert ``transformer_2``, in two-expert pipelines: each
    denoises its own range of steps), or the transformer given."""
    transformers = [_find_transformer(module)]
    second = None if isinstance(module, torch.nn.Module) else getattr(module, "transformer_2", None)
    if isinstance(second, torch.nn.Module) and second is not transformers[0]:
        transformers.append(second)
    return transformers


def _find_transformer(module: Any) -> torch.nn.Module:
    if not isinstance(module, torch.nn.Module) and getattr(module, "transformer", 0) is None:
        raise ValueError(
            f"the {type(module).__name__} has no transformer (its .transformer is None); SDTM patches the "
            "transformer, so load the pipeline with one."
        )
    transformer = getattr(module, "transformer", None) if not isinstance(module, torch.nn.Module) else module
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(
            "expected a diffusers pipeline (anything with a .transformer module) or its transformer "
            f"(e.g. SD3Transformer2DModel), got {type(module).__name__}."
        )
    return transformer


def _timesteps_source(module: Any, scheduler: Any, transformer: torch.nn.Module) -> Callable[[], torch.Tensor | None] | None:
    if scheduler is not None:
        if not hasattr(scheduler, "timesteps"):
            raise TypeError(f"scheduler must have a .timesteps attribute, got {type(scheduler).__name__}.")
        return SchedulerTimesteps(scheduler)
    if isinstance(module, torch.nn.Module) or not hasattr(module, "scheduler"):
        return None
    return PipelineTimesteps(module, transformer)


class SchedulerTimesteps:
    """The ``timesteps`` of a scheduler given to apply. A deep copy of the patched transformer reads the
    deep copy of that scheduler (as any attribute of a deep-copied object)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def __call__(self) -> torch.Tensor | None:
        return getattr(self.scheduler, "timesteps", None)

    def scheduler_step(self) -> int | None:
        return _scheduler_step(self.scheduler)


class PipelineTimesteps:
    """The ``timesteps`` of the scheduler of the pipeline calling the transformer: the innermost pipeline
    ``__call__`` on the stack whose transformer this is (another pipeline sharing the transformer, e.g.
    made with ``from_pipe``, uses its own scheduler), else the pipeline SDTM was applied to (a transformer
    called directly in a loop of the user's). Pipelines are held by weak reference: the transformer does
    not keep one alive, and ``pipe.scheduler`` may be replaced.

    Deep-copying the pipeline gives the copy a source that reads the copy's scheduler; deep-copying the
    transformer alone gives a source that refuses at the first call, because the copy has no pipeline."""

    def __init__(self, pipe: Any, transformer: torch.nn.Module | None = None):
        self._pipe = weakref.ref(pipe)
        self._transformer = weakref.ref(transformer) if transformer is not None else None
        self._active = self._pipe  # the pipeline of the current call, found by ``__call__``

    def __call__(self) -> torch.Tensor | None:
        pipe = self._calling_pipeline() or self._pipe()
        if pipe is None:
            raise RuntimeError("the pipeline SDTM was applied to no longer exists; apply it again.")
        self._active = weakref.ref(pipe)
        return getattr(pipe.scheduler, "timesteps", None)

    def _calling_pipeline(self) -> Any:
        if self._transformer is None:
            pipe = self._pipe()
            if pipe is None:
                return None
            self._transformer = weakref.ref(_find_transformer(pipe))
        transformer = self._transformer()
        frame = sys._getframe(1)
        for _ in range(64):  # pipeline -> transformer call -> hooks -> here: a few frames in practice
            if frame is None:
                return None
            if frame.f_code.co_name == "__call__":
                candidate = frame.f_locals.get("self")
                if getattr(candidate, "scheduler", None) is not None and any(
                    getattr(getattr(candidate, name, None), "_orig_mod", getattr(candidate, name, None)) is transformer
                    for name in ("transformer", "transformer_2")
                ):
                    return candidate
            frame = frame.f_back
        return None

    def current_timestep(self) -> torch.Tensor | None:
        """The timestep the calling pipeline's denoising loop is at (diffusers pipelines keep it in
        ``_current_timestep``, an element of the scheduler's timesteps), or None outside the loop."""
        pipe = self._active()
        current = getattr(pipe, "_current_timestep", None) if pipe is not None else None
        return current if isinstance(current, torch.Tensor) else None

    def scheduler_step(self) -> int | None:
        pipe = self._active()
        return _scheduler_step(pipe.scheduler) if pipe is not None else None

    def __deepcopy__(self, memo: dict) -> Callable[[], torch.Tensor | None]:
        copied_pipe = memo.get(id(self._pipe()))
        if copied_pipe is None:
            return _copied_without_pipeline
        transformer = self._transformer() if self._transformer is not None else None
        return PipelineTimesteps(copied_pipe, memo.get(id(transformer)))


def _scheduler_step(scheduler: Any) -> int | None:
    """The step a scheduler will take next (its ``step_index``, or ``begin_index`` before its first step),
    for schedulers that count their steps; None otherwise."""
    try:
        index = getattr(scheduler, "step_index", None)
        if index is None:
            index = getattr(scheduler, "begin_index", None)
            index = 0 if index is None and hasattr(scheduler, "step_index") else index
    except Exception:  # a scheduler whose properties need state it does not have yet
        return None
    return index if isinstance(index, int) else None


def _copied_without_pipeline() -> torch.Tensor | None:
    raise RuntimeError(
        "this SDTM-patched transformer was deep-copied without the pipeline SDTM was applied to, so it cannot "
        "see the denoising schedule; apply SDTM to the copy (apply_SDTM(new_pipe) or "
        "apply_SDTM(transformer, scheduler=scheduler))."
    )


@torch.compiler.disable
def _pre_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """The transformer's forward pre-hook: locate the step of this call and decide every block's work
    in the module's own state (read from the module, so a deep copy uses its own copy of the state).
    Host-side bookkeeping: never traced by torch.compile."""
    state: SDTMState = module._sdtm_state
    if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False):
        raise ValueError(
            "SDTM cannot run under gradient checkpointing: recomputing a block in the backward pass would "
            "repeat SDTM's in-place merge-age and cache updates and give wrong gradients. Call "
            "transformer.disable_gradient_checkpointing(), or remove_SDTM(...) for training."
        )
    _refuse_batch_changing_caches(module)  # also when enabled after SDTM
    adapter = state.adapter
    call = adapter.call_info(module, args, kwargs)
    # SDTM's persistent buffers (merge age, caches, draws) must be normal tensors even when the first call
    # runs under torch.inference_mode(), or later calls outside it could not update them in place.
    autograd = torch.is_grad_enabled()  # (inference_mode(False) turns grad mode on)
    with torch.inference_mode(False), torch.no_grad():
        if state.settle() and graphs.graph_stats(module) is not None:
            raise RuntimeError(
                "a step cache skipped blocks of a transformer replayed as CUDA graphs; a graph holds the "
                "blocks that ran when it was captured, so it would replay them. Use CUDA graphs or the step "
                "cache, not both (apply_SDTM(..., cuda_graphs=False))."
            )
        state.begin_call(call.timestep, call.grid_height, call.grid_width, call.timestep_scale, call.frames)
        dtype = compute_dtype(state.links[0].block, call.device)
        state.prepare_blocks(call.batch, adapter.channels(module), dtype, call.device, autograd)
    return None


def _invalidate_registry_caches(transformer: torch.nn.Module) -> None:
    """diffusers' registries cache the registries below them; blocks gained or lost one."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()


def _refuse_batch_changing_caches(transformer: torch.nn.Module) -> None:
    """FasterCache computes the unconditional half of a CFG batch only now and then (the transformer's
    batch changes between steps); SDTM's caches and merge age are per sample and cannot follow."""
    for name in hooks.foreign_hooks(transformer):
        if "faster_cache" in name:
            raise ValueError(
                "SDTM cannot run with FasterCache: FasterCache changes the transformer's batch between steps "
                "(it skips the unconditional branch), which SDTM's per-sample caches cannot follow. Use "
                "FirstBlockCache, MagCache, TaylorSeer or PyramidAttentionBroadcast with SDTM, or remove one."
            )
