"""Inputs for the op microbenchmarks: SD3-shaped activations and plans; backends present here.

A module of its own (not conftest.py), so benchmarks import it by a name no other folder uses."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from sdtm.core import reference as R
from sdtm.core.ops import cpp_unavailable_reason, ops_for, triton_unavailable_reason
from sdtm.core.plans import Grid, MergePlan, idm_candidates, idm_plan, random_or_first_positions, ssm_plan


@dataclass(frozen=True)
class Shape:
    batch: int
    grid_h: int
    grid_w: int
    channels: int

    @property
    def id(self) -> str:
        return f"N{self.grid_h * self.grid_w}-{self.grid_h}x{self.grid_w}-C{self.channels}"


# SD3 at 1024x1024 and 512x512 (CFG batch 2, C=1536), and 1344x768 (84 x 48 tokens).
SHAPES = [Shape(2, 64, 64, 1536), Shape(2, 32, 32, 1536), Shape(2, 48, 84, 1536)]


def _backends() -> list:
    params = [pytest.param("torch", id="torch")]
    cpp_reason = cpp_unavailable_reason()
    params.append(pytest.param("cpp", id="cpp", marks=pytest.mark.skipif(cpp_reason is not None,
                                                                         reason=str(cpp_reason))))
    if torch.cuda.is_available():
        params.append(pytest.param("torch-cuda", id="torch-cuda"))
        reason = triton_unavailable_reason(torch.device("cuda"))
        params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(reason is not None,
                                                                                   reason=str(reason))))
    return params


BACKENDS = _backends()


def device_for(backend: str) -> torch.device:
    """"torch" and "cpp" run on the CPU; "torch-cuda" (the torch twins on the GPU) and "triton" on CUDA."""
    return torch.device("cuda") if backend in ("triton", "torch-cuda") else torch.device("cpu")


@dataclass
class Inputs:
    """Activations [B, N, C], merge-age priority, IDM candidates and a plan of each phase at ratio 0.5."""

    grid: Grid
    x: torch.Tensor
    priority: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    ssm: MergePlan
    idm: MergePlan


def make_inputs(shape: Shape, device: torch.device, dtype=torch.float32) -> Inputs:
    g = torch.Generator().manual_seed(0)
    grid = Grid(shape.grid_h, shape.grid_w, 2, 2)
    n = grid.num_tokens
    x = torch.randn(shape.batch, n, shape.channels, generator=g).to(device, dtype)
    age = torch.randint(0, 6, (shape.batch, n), generator=g).float()
    priority = (age / (age.mean(1, keepdim=True) + 1e-6)).to(device)
    position = random_or_first_positions(shape.batch, grid.num_windows, 4, True, g, device)
    scores = R.window_scores(x, priority, grid.height, grid.width, 2, 2, 0.05)
    ssm = ssm_plan(scores, grid, n // 2, position, False)
    src_idx, dst_idx = idm_candidates(grid, position)
    score, best = R.bipartite_match(x, src_idx, dst_idx, priority, 0.05)
    idm = idm_plan(grid, n // 2, src_idx, dst_idx, score, best, False)
    return Inputs(grid, x, priority, src_idx, dst_idx, ssm, idm)


_cache: dict = {}


def inputs_for(shape: Shape, backend: str) -> Inputs:
    key = (shape, backend)
    if key not in _cache:
        _cache.clear()
        _cache[key] = make_inputs(shape, device_for(backend))
    return _cache[key]


def ops(backend: str):
    return ops_for(backend.removesuffix("-cuda"), device_for(backend))


def synchronized(fn, backend: str):
    """``fn`` followed by a device synchronisation, so GPU timings measure the work."""
    if device_for(backend).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run
