"""Tiny SD3 / SD3.5-style models built from config with random weights (no downloads).

Used by the demo, the tests and the benchmarks. Text encoders are None: prompt embeddings are passed
directly (``tiny_prompt_embeds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny SD3 transformer. ``dual_attention`` makes it SD3.5-medium-like (attn2 in the
    first blocks, RMS qk-norm). ``sample_size`` is the latent side length the positional table covers."""

    num_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 16
    in_channels: int = 4
    patch_size: int = 2
    sample_size: int = 64
    dual_attention: bool = False
    text_tokens: int = 7

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


def tiny_transformer(spec: TinySpec = TinySpec(), seed: int = 0, dtype=torch.float32):
    """An ``SD3Transformer2DModel`` with random weights (seeded), in eval mode."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    dual_layers = tuple(range(max(1, spec.num_layers // 2))) if spec.dual_attention else ()
    model = SD3Transformer2DModel(
        sample_size=spec.sample_size,
        patch_size=spec.patch_size,
        in_channels=spec.in_channels,
        num_layers=spec.num_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.joint_attention_dim,
        caption_projection_dim=spec.channels,
        pooled_projection_dim=spec.pooled_projection_dim,
        out_channels=spec.in_channels,
        pos_embed_max_size=spec.sample_size // spec.patch_size,
        dual_attention_layers=dual_layers,
        qk_norm="rms_norm" if spec.dual_attention else None,
    )
    return model.to(dtype).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, dtype=torch.float32):
    """A one-level ``AutoencoderKL`` (no down-sampling: image side = latent side) with SD3's factors."""
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


def tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0, dtype=torch.float32):
    """A ``StableDiffusion3Pipeline`` with a tiny transformer and VAE, no text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=tiny_transformer(spec, seed, dtype),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(spec.in_channels, seed, dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_prompt_embeds(spec: TinySpec, batch: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments with random prompt and negative prompt embeddings for ``batch`` images."""
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "prompt_embeds": draw(batch, spec.text_tokens, spec.joint_attention_dim),
        "pooled_prompt_embeds": draw(batch, spec.pooled_projection_dim),
        "negative_prompt_embeds": draw(batch, spec.text_tokens, spec.joint_attention_dim),
        "negative_pooled_prompt_embeds": draw(batch, spec.pooled_projection_dim),
    }


@dataclass(frozen=True)
class TinyPixArtSpec:
    """Shape of a tiny PixArt-Sigma transformer (learned sigma: twice the latent channels out)."""

    num_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    caption_channels: int = 32
    in_channels: int = 4
    patch_size: int = 2
    sample_size: int = 32
    text_tokens: int = 7

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


def tiny_pixart_pipeline(spec: TinyPixArtSpec = TinyPixArtSpec(), seed: int = 0, dtype=torch.float32):
    """A ``PixArtSigmaPipeline`` with a tiny transformer and VAE, no text encoder. Call it with
    ``tiny_pixart_prompt_embeds``, ``use_resolution_binning=False`` and ``negative_prompt=None``."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        in_channels=spec.in_channels,
        out_channels=2 * spec.in_channels,
        num_layers=spec.num_layers,
        norm_num_groups=1,
        cross_attention_dim=spec.channels,
        sample_size=spec.sample_size,
        patch_size=spec.patch_size,
        caption_channels=spec.caption_channels,
        use_additional_conditions=False,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(spec.in_channels, seed, dtype),
        transformer=transformer.to(dtype).eval(),
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_prompt_embeds(spec: TinyPixArtSpec, batch: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments with random prompt and negative prompt embeddings (and all-ones masks)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, spec.text_tokens, spec.caption_channels)
    mask = torch.ones(batch, spec.text_tokens, dtype=torch.long)
    return {
        "prompt_embeds": torch.randn(*shape, generator=generator).to(dtype),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(*shape, generator=generator).to(dtype),
        "negative_prompt_attention_mask": mask.clone(),
    }


@dataclass(frozen=True)
class TinyFluxSpec:
    """Shape of a tiny Flux.1 transformer: ``num_layers`` double-stream and ``num_single_layers``
    single-stream blocks; tokens are 2x2 patches of a ``latent_channels``-channel latent (packed by the
    pipeline); the rotary axes split ``head_dim``. ``guidance``: guidance-distilled (Flux.1-dev style)."""

    num_layers: int = 1
    num_single_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 16
    latent_channels: int = 4
    guidance: bool = True
    text_tokens: int = 7

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


def tiny_flux_pipeline(spec: TinyFluxSpec = TinyFluxSpec(), seed: int = 0, dtype=torch.float32):
    """A ``FluxPipeline`` with a tiny transformer and VAE (no down-sampling: an image of side s has an
    (s/2) x (s/2) token grid), no text encoders. Call it with ``tiny_flux_prompt_embeds``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.joint_attention_dim,
        pooled_projection_dim=spec.pooled_projection_dim,
        guidance_embeds=spec.guidance,
        axes_dims_rope=spec.axes_dims_rope,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(spec.latent_channels, seed, dtype),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer.to(dtype).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_prompt_embeds(spec: TinyFluxSpec, batch: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments with random prompt embeddings (T5-like sequence and pooled CLIP-like vector)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(batch, spec.text_tokens, spec.joint_attention_dim, generator=generator).to(dtype),
        "pooled_prompt_embeds": torch.randn(batch, spec.pooled_projection_dim, generator=generator).to(dtype),
    }
