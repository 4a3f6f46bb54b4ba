"""PixArt-alpha / Sigma (``PixArtTransformer2DModel``): SDTM's forward of diffusers' ``BasicTransformerBlock``
with ``norm_type="ada_norm_single"``.

Image tokens only flow through the blocks (text enters through cross-attention):
norm1 + modulation -> plan -> [merge] -> self-attention -> [unmerge + blend + gate + residual];
[merge the residual stream] -> cross-attention (image queries, text keys) -> [unmerge + blend + residual];
norm2 + modulation -> [merge] -> feed-forward -> [unmerge + blend + gate + residual].
Self- and cross-attention are attention sub-layers (merged in the structure phase), the feed-forward merges
in both phases; one plan per block, from norm1's output. Cross-attention treats each query on its own,
so a merged query is the mean of its group's queries and its output goes back to every member.

Blocks that do not merge at a step run diffusers' forward untouched (sdtm/core/hooks.py); the merged path below follows
``BasicTransformerBlock.forward`` of diffusers 0.42 for the ada_norm_single case operation for
operation, so a protected step gives the unpatched result bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from ..core import engine
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import (CallInfo, DenoisingInputs, ModelAdapter, Preset, SizeRule, argument, cast_module, latent_grid,
                   meta_tensor)


def pixart_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    timestep: torch.LongTensor | None = None,
    cross_attention_kwargs: dict[str, Any] | None = None,
    class_labels: torch.LongTensor | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """PixArt ``BasicTransformerBlock.forward`` of a block that merges or is protected in this call
    (``link``); same arguments and output as diffusers'."""
    action = engine.begin_block(link, hidden_states)
    if attention_mask is not None:
        raise ValueError("SDTM cannot merge tokens under a self-attention mask; call without attention_mask.")

    ops = link.state.ops
    batch_size = hidden_states.shape[0]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.scale_shift_table[None] + timestep.reshape(batch_size, 6, -1)
    ).chunk(6, dim=1)
    norm_hidden_states = self.norm1(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_msa) + shift_msa

    cross_attention_kwargs = cross_attention_kwargs.copy() if cross_attention_kwargs is not None else {}
    if cross_attention_kwargs.pop("gligen", None) is not None:
        raise ValueError("SDTM does not support GLIGEN inputs in PixArt blocks.")

    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Self-attention on (merged) image tokens; gates are [B, 1, C] here, the ops take [B, C].
    attn_output = self.attn1(
        engine.merge_tokens(norm_hidden_states, attn_plan, link, ops),
        encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
        attention_mask=None,
        **cross_attention_kwargs,
    )
    hidden_states = engine.finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa[:, 0], attn_plan, ops, residual_is_ours=False,
        output_first=True,
    )

    # Cross-attention: PixArt applies no norm before it; the residual stream is the query.
    if self.attn2 is not None:
        attn_output = self.attn2(
            engine.merge_tokens(hidden_states, attn_plan, link, ops),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = engine.finish_sublayer(
            link, "cross", hidden_states, attn_output, None, attn_plan, ops, residual_is_ours=True,
            output_first=True,
        )

    norm_hidden_states = self.norm2(hidden_states)
    norm_hidden_states = norm_hidden_states * (1 + scale_mlp) + shift_mlp
    ff_input = engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    if self._chunk_size is None:
        ff_output = self.ff(ff_input)
    elif mlp_plan is None:
        ff_output = _chunked_feed_forward(self.ff, ff_input, self._chunk_dim, self._chunk_size)
    else:  # the merged token count rarely divides the chunk size: the last chunk may be shorter
        parts = ff_input.split(self._chunk_size, dim=self._chunk_dim)
        ff_output = torch.cat([self.ff(part) for part in parts], self._chunk_dim)
    return engine.finish_sublayer(
        link, "mlp", hidden_states, ff_output, gate_mlp[:, 0], mlp_plan, ops, residual_is_ours=True,
        output_first=True,
    )


# --------------------------------------------------------------------------------------- shapes and tiny models
SIGMA_TEXT_TOKENS = 300  # PixArt-Sigma's T5 sequence length
ALPHA_TEXT_TOKENS = 120  # PixArt-alpha's T5 sequence length
# PixArt-XL-2 at 1024 pixels: 28 blocks of width 16 x 72 = 1152, T5-XXL captions (4096 wide).
_PIXART_COMMON = dict(_class_name="PixArtTransformer2DModel", sample_size=128, patch_size=2, in_channels=4,
                      out_channels=8, num_layers=28, num_attention_heads=16, attention_head_dim=72,
                      cross_attention_dim=1152, caption_channels=4096, activation_fn="gelu-approximate",
                      attention_bias=True, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                      norm_elementwise_affine=False, norm_eps=1e-6)
# The activations diffusers' FeedForward builds.
_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu")


def _additional_conditions(config: dict) -> bool:
    """Whether the model embeds resolution and aspect ratio (diffusers: unset means sample_size == 128)."""
    value = config.get("use_additional_conditions")
    return config.get("sample_size", 128) == 128 if value is None else bool(value)


def _text_width(model) -> int:
    """Width of the text tokens the blocks' cross-attention reads (after the caption projection)."""
    if model.caption_projection is not None:
        return model.inner_dim
    return model.config.cross_attention_dim or model.inner_dim


def pixart_shaped_transformer(num_layers: int = 2, heads: int = 8, sample_size: int = 128, seed: int = 0,
                              device="cpu", dtype=torch.float32):
    """PixArt-Sigma's widths (head width 72, 4 latent channels with learned sigma: 8 out, patch 2, T5
    captions 4096 wide, no resolution conditioning), fewer blocks and C = heads * 72, random weights.
    ``sample_size`` (latent side of the default sin-cos table) is no limit: other sizes get their own."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=heads * 72, caption_channels=4096, sample_size=sample_size, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=max(1, sample_size // 64),
    )
    return cast_module(model, device, dtype)


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

    from ..tiny import tiny_vae

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


class PixArtAdapter(ModelAdapter):
    """PixArt-alpha / Sigma: blocks of image tokens only, the timestep (integer scheduler units) as the
    third argument, an NCHW latent."""

    name = "pixart"
    transformer_class = "PixArtTransformer2DModel"
    block_forwards = {"BasicTransformerBlock": pixart_block_forward}
    structure_share = 0.4  # unvalidated on real weights (README)
    title = "PixArt"

    def check_block(self, block: torch.nn.Module) -> None:
        if getattr(block, "norm_type", None) != "ada_norm_single" or getattr(block, "pos_embed", None) is not None:
            raise ValueError(
                "SDTM supports PixArt blocks with norm_type='ada_norm_single' and no block positional "
                f"embedding; this one has norm_type={getattr(block, 'norm_type', None)!r}."
            )

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        names = {"attn": "attn", "cross": "attn", "mlp": "mlp"}
        if block.attn2 is None:
            del names["cross"]
        return names

    def channels(self, transformer: torch.nn.Module) -> int:
        return transformer.inner_dim

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 2)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        height, width = latent_grid(transformer, hidden_states)
        return CallInfo(timestep, height, width, hidden_states.shape[0], hidden_states.device)


    # ---- what the command line, the demo and the benchmarks need (sdtm.models.base.ModelAdapter) -------------

    # sdtm macs: the attention side holds the self-attention and the cross-attention (image queries and
    # outputs, and the text keys and values, which do not depend on the image token count).
    presets = {
        # PixArt-Sigma-XL-2-1024-MS: no resolution / aspect-ratio conditioning, 300 text tokens.
        "pixart-sigma": Preset(dict(_PIXART_COMMON, interpolation_scale=2, use_additional_conditions=False),
                               steps=20, batch=2, dtype="float16",
                               gpu_check="tiny PixArt-Sigma-shaped (2 blocks, C=144)", h100_step_seconds=0.06),
        # PixArt-XL-2-1024-MS (alpha): resolution and aspect-ratio conditioning, 120 text tokens.
        "pixart-alpha": Preset(dict(_PIXART_COMMON, interpolation_scale=2, use_additional_conditions=True),
                               steps=20, batch=2, dtype="float16"),
    }
    # Older PixArt folders name the transformer Transformer2DModel (norm_type ada_norm_single); diffusers
    # loads it as a PixArtTransformer2DModel.
    config_classes = ("PixArtTransformer2DModel", "Transformer2DModel")
    config_signature_keys = ("norm_type", "caption_channels", "cross_attention_dim")
    config_int_keys = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                       "num_attention_heads", "out_channels", "cross_attention_dim", "caption_channels",
                       "num_embeds_ada_norm", "norm_num_groups")
    # out_channels: null follows in_channels; cross_attention_dim: null leaves out the cross-attention;
    # caption_channels: null takes text tokens already cross_attention_dim wide.
    config_nullable_int_keys = ("out_channels", "cross_attention_dim", "caption_channels")
    config_other_keys = ("interpolation_scale", "use_additional_conditions", "norm_type", "activation_fn",
                         "attention_bias", "upcast_attention", "norm_elementwise_affine", "norm_eps", "dropout",
                         "attention_type")

    def owns_config(self, config: dict) -> bool:
        if config.get("_class_name") == "Transformer2DModel":
            return config.get("norm_type") == "ada_norm_single"
        return super().owns_config(config)

    def check_config(self, config: dict, path: str) -> None:
        if "norm_type" in config and config["norm_type"] != "ada_norm_single":
            raise ValueError(f"{path}: norm_type must be \"ada_norm_single\" (PixArt's), got {config['norm_type']!r}.")
        value = config.get("interpolation_scale")
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"{path}: interpolation_scale must be a positive number or null, got {value!r}.")
        value = config.get("use_additional_conditions")
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{path}: use_additional_conditions must be true, false or null, got {value!r}.")
        if "activation_fn" in config and config["activation_fn"] not in _ACTIVATIONS:
            raise ValueError(f"{path}: activation_fn must be one of {', '.join(_ACTIVATIONS)} (diffusers' feed-forward "
                             f"activations), got {config['activation_fn']!r}.")
        heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
        width = heads * head_dim
        cross_dim = config.get("cross_attention_dim", 1152)
        if config.get("caption_channels") is not None and cross_dim is not None and cross_dim != width:
            raise ValueError(f"{path}: cross_attention_dim ({cross_dim}) must equal num_attention_heads x "
                             f"attention_head_dim ({heads} x {head_dim} = {width}), the width the caption "
                             "projection gives the text tokens.")
        if _additional_conditions(config) and width % 3:
            raise ValueError(f"{path}: with resolution and aspect-ratio conditioning (use_additional_conditions, "
                             f"or sample_size 128 without it) the width ({heads} x {head_dim} = {width}) must be a "
                             "multiple of 3.")

    def text_tokens(self, config: dict) -> int:
        """PixArt-alpha's 120 T5 tokens for a model conditioned on resolution and aspect ratio (alpha at 1024
        pixels), PixArt-Sigma's 300 otherwise."""
        return ALPHA_TEXT_TOKENS if _additional_conditions(config) else SIGMA_TEXT_TOKENS

    def meta_inputs(self, model, batch, grid_h, grid_w, text_tokens, frames=1) -> dict:
        c = model.config
        latent_h, latent_w = grid_h * c.patch_size, grid_w * c.patch_size
        caption = c.caption_channels if model.caption_projection is not None else _text_width(model)
        conditions = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            conditions = {"resolution": meta_tensor(batch, 2), "aspect_ratio": meta_tensor(batch, 1)}
        return dict(hidden_states=meta_tensor(batch, c.in_channels, latent_h, latent_w), timestep=meta_tensor(batch),
                    encoder_hidden_states=meta_tensor(batch, text_tokens, caption), added_cond_kwargs=conditions)

    def block_inputs(self, model, block, batch, tokens, text_tokens, make=meta_tensor) -> dict:
        c = model.inner_dim
        return dict(hidden_states=make(batch, tokens, c),
                    encoder_hidden_states=make(batch, text_tokens, _text_width(model)),
                    timestep=make(batch, 6 * c))  # adaln_single's output: six modulations per block

    def block_shape(self, block) -> tuple:
        return (block.attn2 is None, block.only_cross_attention)

    # sdtm generate: classifier-free guidance with an empty negative prompt; generated at exactly the size
    # asked for (diffusers' aspect-ratio binning off: the size checked, recorded and merged over is the one the
    # transformer sees) and the prompt goes to T5 as written (caption cleaning off, so the images do not
    # depend on whether the optional bs4 / ftfy packages are installed).
    pipeline_classes = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    text_components = ("tokenizer", "text_encoder")
    default_guidance = 4.5
    pixel_multiple = 8  # the pipeline's check_inputs, whatever the VAE

    def generate_call_kwargs(self, guidance: float | None, frames: int = 1) -> dict:
        return {**super().generate_call_kwargs(guidance), "use_resolution_binning": False, "clean_caption": False}

    # sdtm demo: the sin-cos positional table is computed for any size; 48 latent pixels a side by default
    demo_title = "tiny PixArt-Sigma pipeline"
    demo_spec = TinyPixArtSpec(num_layers=4, heads=4, head_dim=64, caption_channels=64, sample_size=48,
                               text_tokens=16)

    def tiny_pipeline(self, spec=None, seed=0, dtype=torch.float32):
        return tiny_pixart_pipeline(spec or TinyPixArtSpec(), seed, dtype)

    def tiny_call_kwargs(self, spec, batch=1, seed=0, dtype=torch.float32) -> dict:
        # The embeddings are given, so no negative prompt text; the tiny model's sample size has no
        # aspect-ratio bins, and the demo generates at exactly its size anyway.
        return {**tiny_pixart_prompt_embeds(spec, batch, seed, dtype), "guidance_scale": 4.5,
                "negative_prompt": None, "use_resolution_binning": False}

    def tiny_size_rule(self, spec) -> SizeRule:
        return SizeRule(8, "PixArtSigmaPipeline takes sides divisible by 8 only")

    # sdtm bench e2e, the GPU check
    bench_title = "PixArt-Sigma-shaped transformer"
    bench_help = "PixArt-Sigma-shaped (C=576, 2 blocks, 300 text tokens, batch 2)"
    bench_text_tokens = SIGMA_TEXT_TOKENS
    bench_layers, bench_heads, bench_head_dim = 2, 8, 72

    def bench_transformer(self, num_layers=None, heads=None, sample_size=128, seed=0, device="cpu",
                          dtype=torch.float32):
        return pixart_shaped_transformer(self.bench_layers if num_layers is None else num_layers,
                                         self.bench_heads if heads is None else heads, sample_size, seed, device,
                                         dtype)

    def tiny_bench_transformer(self, latent, seed=0, device="cpu", dtype=torch.float32):
        return pixart_shaped_transformer(2, 2, latent, seed, device, dtype)

    def denoising_inputs(self, transformer, latent_h, latent_w, batch, text_tokens, generator,
                         frames=1) -> DenoisingInputs:
        """[batch, 4, h, w] latents, the text tokens with an all-ones mask, no resolution conditions,
        DPM-Solver++ (the first half of the learned-sigma output is the noise prediction)."""
        from diffusers import DPMSolverMultistepScheduler

        device, dtype, config = transformer.device, transformer.dtype, transformer.config

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(device, dtype)

        scheduler = DPMSolverMultistepScheduler()
        latents = draw(batch, config.in_channels, latent_h, latent_w)
        context = draw(batch, text_tokens, config.caption_channels)
        extra = {"encoder_attention_mask": torch.ones(batch, text_tokens, device=device),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

        def set_timesteps(steps: int) -> torch.Tensor:
            scheduler.set_timesteps(steps, device=latents.device)
            return scheduler.timesteps

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                              return_dict=False, **extra)[0]
            return out.chunk(2, dim=1)[0] if out.shape[1] == 2 * x.shape[1] else out

        return DenoisingInputs(scheduler, latents, set_timesteps, predict)

    # step caches: cache-dit has its own adapter
    cache_witnesses = ("attn1",)
