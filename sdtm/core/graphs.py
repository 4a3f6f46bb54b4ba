"""CUDA-graph replay of a transformer's calls: each distinct call is captured once and replayed after.

    >>> from sdtm.core.graphs import enable_cuda_graphs, disable_cuda_graphs
    >>> enable_cuda_graphs(pipe.transformer)      # doctest: +SKIP  (or apply_SDTM(pipe, cuda_graphs=True))

A call's signature is what its kernels depend on: the shapes, dtypes and devices of its tensor
arguments, its other arguments by value and, with SDTM applied, every block's action at that step (mode,
phase, the merged token count) and the addresses of the tensors SDTM reads and writes (merge age, caches,
random destinations; allocated once, see sdtm/core/state.py). The first call of a signature runs eagerly (its
result is returned) and is then captured; later calls copy their tensor arguments into the captured
graph's static inputs, replay it and return copies of its outputs. Every graph allocates from one
shared memory pool.

SDTM's host work (finding the step, deciding each block's action, drawing the random destinations into
their buffer) runs in the transformer's pre-hook, before the graph, so a graph never holds a step number
or a random draw. With SDTM's defaults a 50-step generation captures about one graph per merged step
(each has its own token count) plus one for the protected steps: about 35 graphs, captured during the
first generation, which therefore takes about twice as long; later generations with the same settings
replay only. Calls with autograd enabled run eagerly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

GRAPHS_ATTRIBUTE = "_sdtm_graphs"


def enable_cuda_graphs(module: torch.nn.Module, capture: Any = None) -> torch.nn.Module:
    """Replay ``module``'s calls as CUDA graphs (see the module docstring); returns ``module``.

    Works with and without SDTM applied, before or after ``apply_SDTM``. Capture against the module's
    parameters as they are: after moving or re-creating them, disable and enable again. ``capture``
    replaces the CUDA capture (an object with ``check(tensors)`` and ``capture(run, example_outputs)``,
    as ``CudaGraphCapture``); the tests use one that runs on the CPU."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"enable_cuda_graphs expects a torch.nn.Module, got {type(module).__name__}.")
    if getattr(module, GRAPHS_ATTRIBUTE, None) is None:
        runner = GraphedCalls(module, capture)
        setattr(module, GRAPHS_ATTRIBUTE, runner)
        module.forward = runner
    return module


def disable_cuda_graphs(module: torch.nn.Module) -> torch.nn.Module:
    """Undo ``enable_cuda_graphs`` and free the captured graphs; harmless when not enabled."""
    runner = getattr(module, GRAPHS_ATTRIBUTE, None)
    if runner is not None:
        runner.clear()
        delattr(module, GRAPHS_ATTRIBUTE)
        if module.__dict__.get("forward") is runner:
            del module.forward
    return module


def graph_stats(module: torch.nn.Module) -> dict[str, int] | None:
    """Counts of a module with graphs enabled: ``graphs`` held, ``captures``, ``replays``, ``eager``
    calls (autograd on, or a signature that could not be captured); None when not enabled."""
    runner = getattr(module, GRAPHS_ATTRIBUTE, None)
    return None if runner is None else runner.stats()


class CudaGraphCapture:
    """Captures a callable into a ``torch.cuda.CUDAGraph`` in a pool shared by every graph it makes."""

    def __init__(self):
        self.pool = None

    def check(self, tensors: list[torch.Tensor]) -> None:
        devices = {t.device.type for t in tensors}
        if devices != {"cuda"}:
            raise ValueError(
                f"CUDA graphs need the transformer's inputs on a CUDA device, got {sorted(devices)}; move the "
                "pipeline to the GPU or leave cuda_graphs off."
            )

    def capture(self, run: Callable[[], Any], example_outputs: Any) -> tuple[Callable[[], None], Any]:
        """Record ``run`` (already run once eagerly, so kernels are compiled and tuned; that run's outputs
        are ``example_outputs``); returns the replay function and the outputs, which live in the graph's
        memory."""
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = run()
        if self.pool is None:
            self.pool = graph.pool()
        return graph.replay, outputs


@dataclass
class _Captured:
    static_inputs: list[torch.Tensor]
    replay: Callable[[], None]
    outputs: Any


class GraphedCalls:
    """The graphed ``forward`` of one module (installed as its ``forward`` attribute)."""

    def __init__(self, module: torch.nn.Module, capture: Any = None):
        self.module = module
        self.capturer = capture if capture is not None else CudaGraphCapture()
        self.graphs: dict[tuple, _Captured | None] = {}
        self.captures = self.replays = self.eager = 0
        self._warned = False

    def __call__(self, *args, **kwargs):
        forward = type(self.module).forward
        if torch.is_grad_enabled():
            self.eager += 1
            return forward(self.module, *args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        self.capturer.check(tensors)
        key = (_signature(leaves, spec), _sdtm_signature(self.module))
        if key in self.graphs:
            entry = self.graphs[key]
            if entry is None:  # could not be captured: stays eager
                self.eager += 1
                return forward(self.module, *args, **kwargs)
            for static, tensor in zip(entry.static_inputs, tensors):
                static.copy_(tensor)
            entry.replay()
            self.replays += 1
            state = getattr(self.module, "_sdtm_state", None)
            if state is not None:
                state.replayed()  # the blocks ran inside the graph, not through their Python hooks
            return _cloned(entry.outputs)
        return self._first_call(key, leaves, spec, forward)

    def _first_call(self, key: tuple, leaves: list, spec, forward):
        """Run the call eagerly on static copies of its inputs (the result returned), then capture it."""
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static_leaves, spec)

        def run():
            return forward(self.module, *static_args, **static_kwargs)

        result = _cloned(run())
        try:
            replay, outputs = self.capturer.capture(run, result)
        except Exception as error:  # an op that cannot be captured: this signature runs eagerly
            self.graphs[key] = None
            if not self._warned:
                self._warned = True
                warnings.warn(f"SDTM: a transformer call could not be captured as a CUDA graph and runs eagerly "
                              f"({type(error).__name__}: {error}).", stacklevel=3)
            self.eager += 1
            return result
        static_inputs = [leaf for leaf in static_leaves if isinstance(leaf, torch.Tensor)]
        self.graphs[key] = _Captured(static_inputs, replay, outputs)
        self.captures += 1
        return result

    def clear(self) -> None:
        self.graphs.clear()

    def stats(self) -> dict[str, int]:
        return {"graphs": sum(g is not None for g in self.graphs.values()), "captures": self.captures,
                "replays": self.replays, "eager": self.eager}

    def __deepcopy__(self, memo: dict) -> "GraphedCalls":
        """A copy of the module gets its own, empty set of graphs (graphs cannot be copied)."""
        module = memo.get(id(self.module))
        if module is None:
            raise RuntimeError("a module's graphed forward can only be copied along with its module.")
        return GraphedCalls(module, type(self.capturer)())


def _signature(leaves: list, spec) -> tuple:
    """Shapes, strides, dtypes and devices of the tensor arguments; other arguments by value."""
    parts = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            parts.append(("tensor", tuple(leaf.shape), leaf.stride(), leaf.dtype, str(leaf.device)))
        else:
            try:
                hash(leaf)
                parts.append(("value", leaf))
            except TypeError:
                parts.append(("object", repr(leaf)))
    return str(spec), tuple(parts)


def _sdtm_signature(module: torch.nn.Module) -> tuple:
    state = getattr(module, "_sdtm_state", None)
    return () if state is None else state.graph_signature()


def _cloned(outputs: Any) -> Any:
    """``outputs`` with every tensor copied (graph outputs are overwritten by the next replay)."""
    if hasattr(outputs, "to_tuple") and hasattr(outputs, "keys"):  # diffusers' BaseOutput
        return type(outputs)(**{k: _cloned(v) for k, v in outputs.items()})
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, outputs)
