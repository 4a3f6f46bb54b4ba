"""Tiny models built from config with random weights (no downloads), for the demo, the tests and the
benchmarks: the family-neutral parts. Each family's tiny transformer, pipeline and prompt embeddings live in
its adapter module (``sdtm.models.<family>``: ``ModelAdapter.tiny_pipeline`` / ``tiny_call_kwargs``)."""

from __future__ import annotations

from typing import Any

import torch


def tiny_vae(latent_channels: int = 4, seed: int = 0, dtype=torch.float32):
    """A one-level ``AutoencoderKL`` (no down-sampling: image side = latent side) with the shift and scaling
    factors of a released 16-channel VAE (0.0609, 1.5035)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return vae.to(dtype).eval()


def tiny_family_pipeline(family: str, spec: Any = None, seed: int = 0, dtype=torch.float32) -> Any:
    """The tiny pipeline of the registered family ``family`` (``spec`` None: the family's smallest); call it
    with ``sdtm.models.family(family).tiny_call_kwargs(spec)``."""
    from .models import family as family_named

    return family_named(family).tiny_pipeline(spec, seed, dtype)
