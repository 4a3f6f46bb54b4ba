"""Shared test helpers: tiny pipelines, generation shortcuts, closeness checks that compare like with like.

A module of its own (not conftest.py), so tests import it by a name no other folder uses."""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be set before
# anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from sdtm.core.ops import cpp_unavailable_reason, triton_unavailable_reason  # noqa: E402
from sdtm.models.flux import TinyFluxSpec, tiny_flux_pipeline, tiny_flux_prompt_embeds  # noqa: E402
from sdtm.models.pixart import TinyPixArtSpec, tiny_pixart_pipeline, tiny_pixart_prompt_embeds  # noqa: E402
from sdtm.models.sd3 import TinySpec, tiny_pipeline, tiny_prompt_embeds  # noqa: E402

diffusers_logging.set_verbosity_error()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

requires_cpp = pytest.mark.skipif(cpp_unavailable_reason() is not None, reason=str(cpp_unavailable_reason()))
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_triton = pytest.mark.skipif(
    triton_unavailable_reason(TRITON_DEVICE) is not None, reason=str(triton_unavailable_reason(TRITON_DEVICE))
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_same_layout(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    """Assert that ``actual`` has the shape and dtype of ``expected`` (nothing broadcast, nothing cast)."""
    label = name or "tensor"
    if actual.shape != expected.shape:
        raise AssertionError(f"{label}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{label}: dtype {actual.dtype}, expected {expected.dtype}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0, name: str = ""):
    """Element-wise closeness of two tensors of the same shape and dtype (checked first: no broadcasting),
    reporting the relative RMS error and the first mismatches."""
    assert_same_layout(actual, expected, name)
    actual_f, expected_f = actual.double(), expected.double()
    rms = (actual_f - expected_f).pow(2).mean().sqrt() / expected_f.pow(2).mean().sqrt().clamp_min(1e-30)
    bad = ~torch.isclose(actual_f, expected_f, rtol=rtol, atol=atol)
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        details = [(w, actual_f[tuple(w)].item(), expected_f[tuple(w)].item()) for w in where]
        raise AssertionError(
            f"{name} mismatch: {int(bad.sum())} of {bad.numel()} elements, relative RMS {rms:.3e}, "
            f"first (index, actual, expected): {details}"
        )


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| of two tensors of the same shape (checked: no broadcasting), in float64."""
    if a.shape != b.shape:
        raise AssertionError(f"relative_difference: shape {tuple(a.shape)} against {tuple(b.shape)}")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SD3_SPEC = TinySpec()
SD35_SPEC = TinySpec(num_layers=3, dual_attention=True)


def generate(pipe, spec: TinySpec = SD3_SPEC, batch: int = 1, height: int = 32, width: int = 32, seed: int = 0,
             guidance_scale: float = 3.0, dtype=torch.float32, **kwargs) -> torch.Tensor:
    """Latents of one tiny generation (deterministic for a seed)."""
    kwargs.setdefault("num_inference_steps", 8)
    embeds = {k: v.to(pipe.transformer.device) for k, v in tiny_prompt_embeds(spec, batch, dtype=dtype).items()}
    return pipe(
        **embeds,
        height=height,
        width=width,
        guidance_scale=guidance_scale,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


class FamilyPipeline(NamedTuple):
    """A tiny pipeline of one family: a maker of a fresh pipeline, the call's prompt keywords for
    ``(batch, dtype)`` and the family's guidance scale."""

    make: Callable
    embeds: Callable
    guidance: float


def _pixart_embeds(batch: int = 1, dtype=torch.float32) -> dict:
    # PixArt's pipeline needs no negative prompt text and no resolution binning for the tiny sizes.
    return dict(tiny_pixart_prompt_embeds(TinyPixArtSpec(), batch, dtype=dtype), negative_prompt=None,
                use_resolution_binning=False)


FAMILY_PIPELINES = {
    "sd3": FamilyPipeline(lambda: tiny_pipeline(TinySpec()),
                          lambda batch=1, dtype=torch.float32: tiny_prompt_embeds(TinySpec(), batch, dtype=dtype), 3.0),
    "flux": FamilyPipeline(lambda: tiny_flux_pipeline(TinyFluxSpec()),
                           lambda batch=1, dtype=torch.float32: tiny_flux_prompt_embeds(TinyFluxSpec(), batch,
                                                                                        dtype=dtype), 3.5),
    "pixart": FamilyPipeline(lambda: tiny_pixart_pipeline(TinyPixArtSpec()), _pixart_embeds, 4.5),
}


def make_pipeline(family: str):
    """A fresh tiny pipeline of ``family`` (a key of FAMILY_PIPELINES)."""
    return FAMILY_PIPELINES[family].make()


def run_pipeline(pipe, family: str, height: int = 32, width: int = 32, steps: int = 8, seed: int = 0,
                 dtype=torch.float32, batch: int = 1, **kwargs) -> torch.Tensor:
    """Latents of one generation of ``pipe`` (of ``family``) from fresh prompt embeddings and fixed noise."""
    entry = FAMILY_PIPELINES[family]
    return pipe(**entry.embeds(batch, dtype), height=height, width=width, num_inference_steps=steps,
                guidance_scale=entry.guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def op_inputs(shape, dtype, device="cpu", seed=0):
    """Tokens, merge-age priority and grid for op tests. shape = (B, grid_h, grid_w, C, sy, sx)."""
    from sdtm.core.plans import Grid

    b, h, w, c, sy, sx = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, c, generator=g).to(dtype)
    age = torch.randint(0, 5, (b, h * w), generator=g, dtype=torch.int32)
    prio = age.float() / (age.float().mean(1, keepdim=True) + 1e-6)
    return Grid(h, w, sy, sx), x.to(device), prio.to(device), g


@pytest.fixture()
def fresh_dynamo():
    """Dynamo reset and its counters cleared around a test; a frame that needs more variants than the
    recompile limit fails instead of silently falling back to eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
    counters.clear()
