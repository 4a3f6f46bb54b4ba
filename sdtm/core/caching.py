"""Memoisation of small host-built tensors that stays out of ``torch.compile``'s way.

``functools.lru_cache`` is opaque to dynamo (a graph break). ``eager_cache`` caches in eager code and, while
dynamo traces, calls the function itself, so its few index ops become part of the compiled graph.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def eager_cache(maxsize: int) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` in eager mode (values always made outside inference mode); a plain
    call while torch.compile traces."""

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            if torch.is_inference_mode_enabled():
                # A tensor made under inference mode could not be used by later calls outside it.
                with torch.inference_mode(False), torch.no_grad():
                    return cached(*args)
            return cached(*args)

        call.cache_clear = cached.cache_clear
        return call

    return wrap
