"""SD3 / SD3.5 (``SD3Transformer2DModel``): SDTM's forward of diffusers' ``JointTransformerBlock``.

Image stream: norm1 -> plan -> [merge] -> attn (joint with the text tokens) -> [unmerge + blend +
gate + residual]; (SD3.5 dual attention: attn2 on norm1's second output, merged with the same plan);
[norm2 + modulation + merge] -> ff -> [unmerge + blend + gate + residual]. The text stream is diffusers'
own. In merged blocks the adaptive LayerNorms go through the backend's fused ops (sdtm/core/norms.py), and
without autograd the residual stream and the caches are updated in place (``engine.finish_sublayer``).

What a block does at a step was decided on the host before the transformer ran (``BlockLink``, set by
``SDTMState.prepare_blocks``); the code below reads no step or layer number, so ``torch.compile`` traces
it into a few graphs for a whole generation, the token count a dynamic size.

Blocks that do not merge at a step run diffusers' forward untouched (sdtm/core/hooks.py). The body below mirrors
``JointTransformerBlock.forward`` of diffusers 0.42 operation for operation, so a protected step (full
block, caches stored) gives the unpatched result bit for bit; tests/test_pipeline.py holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import _chunked_feed_forward

from ..core import engine, norms
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import (CallInfo, DenoisingInputs, ModelAdapter, Preset, SizeRule, argument, cast_module, is_int, latent_grid,
                   meta_tensor)


def _feed_forward(block, x: torch.Tensor, merged: bool) -> torch.Tensor:
    if block._chunk_size is None:
        return block.ff(x)
    if not merged:
        return _chunked_feed_forward(block.ff, x, block._chunk_dim, block._chunk_size)
    # The merged token count rarely divides the chunk size: the last chunk may be shorter.
    return torch.cat([block.ff(part) for part in x.split(block._chunk_size, dim=block._chunk_dim)], block._chunk_dim)


def sd3_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.FloatTensor,
    encoder_hidden_states: torch.FloatTensor,
    temb: torch.FloatTensor,
    joint_attention_kwargs: dict[str, Any] | None = None,
):
    """``JointTransformerBlock.forward`` of a block that merges or is protected in this call (``link``);
    same arguments and outputs as diffusers'."""
    action = engine.begin_block(link, hidden_states)
    joint_attention_kwargs = joint_attention_kwargs or {}
    ops = link.state.ops
    # Merged blocks normalise through the fused ops; protected blocks run diffusers' modules (bit for bit).
    fused_norms = action.mode is BlockMode.MERGED and norms.fusable(self)
    norm1_outputs = norms.norm1(self, hidden_states, temb, ops) if fused_norms else self.norm1(hidden_states, emb=temb)
    if self.use_dual_attention:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_hidden_states2, gate_msa2 = norm1_outputs
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = norm1_outputs

    if self.context_pre_only:
        norm_encoder_hidden_states = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )

    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Attention.
    attn_output, context_attn_output = self.attn(
        hidden_states=engine.merge_tokens(norm_hidden_states, attn_plan, link, ops),
        encoder_hidden_states=norm_encoder_hidden_states,
        **joint_attention_kwargs,
    )
    # Once merged for the attention, norm1's fused output is read no more: the sum can go there.
    spare = norm_hidden_states if fused_norms and attn_plan is not None else None
    hidden_states = engine.finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa, attn_plan, ops, residual_is_ours=False, spare=spare
    )

    if self.use_dual_attention:
        attn_output2 = self.attn2(
            hidden_states=engine.merge_tokens(norm_hidden_states2, attn_plan, link, ops), **joint_attention_kwargs
        )
        hidden_states = engine.finish_sublayer(
            link, "attn2", hidden_states, attn_output2, gate_msa2, attn_plan, ops, residual_is_ours=True
        )

    if fused_norms:
        ff_input = norms.norm2_merged(
            self, hidden_states, shift_mlp, scale_mlp, mlp_plan, link.state.config.pseudo_merge, ops
        )
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_input = engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    ff_output = _feed_forward(self, ff_input, mlp_plan is not None)
    hidden_states = engine.finish_sublayer(
        link, "mlp", hidden_states, ff_output, gate_mlp, mlp_plan, ops, residual_is_ours=True
    )

    # Process attention outputs for the `encoder_hidden_states` (diffusers' text stream, unchanged).
    if self.context_pre_only:
        encoder_hidden_states = None
    else:
        context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
        encoder_hidden_states = encoder_hidden_states + context_attn_output

        norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
        norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        if self._chunk_size is not None:
            context_ff_output = _chunked_feed_forward(
                self.ff_context, norm_encoder_hidden_states, self._chunk_dim, self._chunk_size
            )
        else:
            context_ff_output = self.ff_context(norm_encoder_hidden_states)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output

    return encoder_hidden_states, hidden_states


TEXT_TOKENS = 333  # SD3's pipeline: 77 CLIP + 256 T5 tokens
_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16,
                   out_channels=16, attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048)


def sd3_shaped_transformer(num_layers: int = 2, heads: int = 12, sample_size: int = 128, seed: int = 0,
                           device="cpu", dtype=torch.float32):
    """SD3's widths (333 text tokens from a 4096-wide context, patch 2, 16 latent channels), fewer blocks
    and C = heads * 64, random weights."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=heads * 64,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=sample_size // 2,
    )
    return cast_module(model, device, dtype)


# Tiny SD3 / SD3.5-style models built from config with random weights (no downloads), for the demo, the tests
# and the benchmarks. Text encoders are None: prompt embeddings are passed directly (``tiny_prompt_embeds``).
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


def tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0, dtype=torch.float32):
    """A ``StableDiffusion3Pipeline`` with a tiny transformer and VAE, no text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ..tiny import tiny_vae

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


class SD3Adapter(ModelAdapter):
    """SD3 / SD3.5: joint blocks (image and text streams), the timestep in the scheduler's units, an NCHW
    latent. Attention (and SD3.5's second attention) merge in the structure phase, the MLP in both."""

    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    block_forwards = {"JointTransformerBlock": sd3_block_forward}
    title = "SD3"

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        names = {"attn": "attn", "attn2": "attn", "mlp": "mlp"}
        if not getattr(block, "use_dual_attention", False):
            del names["attn2"]
        return names

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 3)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        height, width = latent_grid(transformer, hidden_states)
        return CallInfo(timestep, height, width, hidden_states.shape[0], hidden_states.device)


    # ---- what the command line, the demo and the benchmarks need (sdtm.models.base.ModelAdapter) -------------

    # sdtm macs
    presets = {
        "sd3-medium": Preset(dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                  pos_embed_max_size=192), steps=50, batch=2, dtype="float16",
                             gpu_check="tiny SD3-shaped (2 blocks, C=128)", h100_step_seconds=0.056),
        "sd3.5-medium": Preset(dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                    qk_norm="rms_norm")),
        "sd3.5-large": Preset(dict(_SD3_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                   pos_embed_max_size=192, qk_norm="rms_norm")),
    }
    config_classes = ("SD3Transformer2DModel",)
    config_int_keys = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                       "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                       "out_channels", "pos_embed_max_size")
    # diffusers accepts null for these: out_channels then follows in_channels, and without a positional
    # table size the sin-cos table is computed for each input size.
    config_nullable_int_keys = ("out_channels", "pos_embed_max_size")
    config_other_keys = ("dual_attention_layers", "qk_norm")

    def check_config(self, config: dict, path: str) -> None:
        value = config.get("dual_attention_layers", ())
        if not isinstance(value, (list, tuple)) or not all(is_int(v) and v >= 0 for v in value):
            raise ValueError(f"{path}: dual_attention_layers must be a list of layer indices (ints >= 0), "
                             f"got {value!r}.")
        value = config.get("qk_norm")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: qk_norm must be null or a string such as \"rms_norm\", got {value!r}.")
        heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
        caption_dim = config.get("caption_projection_dim", 1152)
        if caption_dim != heads * head_dim:
            raise ValueError(f"{path}: caption_projection_dim ({caption_dim}) must equal num_attention_heads x "
                             f"attention_head_dim ({heads} x {head_dim} = {heads * head_dim}), the blocks' width.")

    def text_tokens(self, config: dict) -> int:
        return TEXT_TOKENS

    def max_token_grid(self, config: dict) -> int | None:
        # diffusers' default table covers 96 x 96 tokens; null: computed for each input size.
        value = config.get("pos_embed_max_size", 96)
        return value if is_int(value) else None

    def meta_inputs(self, model, batch, grid_h, grid_w, text_tokens, frames=1) -> dict:
        make = meta_tensor
        c = model.config
        latent_h, latent_w = grid_h * c.patch_size, grid_w * c.patch_size
        return dict(hidden_states=make(batch, c.in_channels, latent_h, latent_w), timestep=make(batch),
                    encoder_hidden_states=make(batch, text_tokens, c.joint_attention_dim),
                    pooled_projections=make(batch, c.pooled_projection_dim))

    def block_inputs(self, model, block, batch, tokens, text_tokens, make=meta_tensor) -> dict:
        c = model.inner_dim
        return dict(hidden_states=make(batch, tokens, c), encoder_hidden_states=make(batch, text_tokens, c),
                    temb=make(batch, c))

    def block_shape(self, block) -> tuple:
        return (block.use_dual_attention, block.context_pre_only)

    # sdtm generate
    pipeline_classes = ("StableDiffusion3Pipeline",)
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    default_guidance = 7.0

    # sdtm demo (the reference's switch step 20 of 50, in proportion, so that both phases show at a few steps)
    demo_title = "tiny SD3 pipeline"
    # Large enough that the transformer dominates (2304 image tokens at the demo's default 96 pixels, blocks of
    # width 256), small enough to finish in well under a minute on two CPU cores.
    demo_spec = TinySpec(num_layers=4, heads=4, head_dim=64, joint_attention_dim=64, pooled_projection_dim=32,
                         sample_size=96, text_tokens=16)

    def tiny_pipeline(self, spec=None, seed=0, dtype=torch.float32):
        return tiny_pipeline(spec or TinySpec(), seed, dtype)

    def tiny_call_kwargs(self, spec, batch=1, seed=0, dtype=torch.float32) -> dict:
        return {**tiny_prompt_embeds(spec, batch, seed, dtype), "guidance_scale": 4.0}

    def tiny_size_rule(self, spec) -> SizeRule:
        # The tiny VAE does not down-sample: one token is patch_size x patch_size pixels.
        return SizeRule(2, "a token spans 2 x 2 pixels", spec.sample_size // spec.patch_size * spec.patch_size)

    def demo_switch_step(self, steps: int) -> int | None:
        return round(steps * 20 / 50)

    # sdtm bench e2e, the GPU check
    bench_title = "SD3-shaped transformer"
    bench_help = "SD3-shaped (C=768, 2 blocks, 333 text tokens, batch 2)"
    bench_text_tokens = TEXT_TOKENS
    bench_layers, bench_heads, bench_head_dim = 2, 12, 64

    def bench_transformer(self, num_layers=None, heads=None, sample_size=128, seed=0, device="cpu",
                          dtype=torch.float32):
        return sd3_shaped_transformer(self.bench_layers if num_layers is None else num_layers,
                                      self.bench_heads if heads is None else heads, sample_size, seed, device, dtype)

    def tiny_bench_transformer(self, latent, seed=0, device="cpu", dtype=torch.float32):
        return sd3_shaped_transformer(2, 2, max(128, latent), seed, device, dtype)

    def denoising_inputs(self, transformer, latent_h, latent_w, batch, text_tokens, generator,
                         frames=1) -> DenoisingInputs:
        """[batch, 16, h, w] latents, the text tokens and a pooled vector, a flow-matching Euler schedule
        (shift 3)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        device, dtype, config = transformer.device, transformer.dtype, transformer.config

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(device, dtype)

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        latents = draw(batch, config.in_channels, latent_h, latent_w)
        context = draw(batch, text_tokens, config.joint_attention_dim)
        pooled = draw(batch, config.pooled_projection_dim)

        def set_timesteps(steps: int) -> torch.Tensor:
            scheduler.set_timesteps(steps, device=latents.device)
            return scheduler.timesteps

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                               pooled_projections=pooled, return_dict=False)[0]

        return DenoisingInputs(scheduler, latents, set_timesteps, predict)

    host_topology = "SD3-medium topology"

    def host_transformer(self, setting) -> torch.nn.Module:
        """SD3-medium's topology (the last block without text output, patch 2, 16 latent channels) shrunk."""
        spec = TinySpec(num_layers=setting.layers, heads=setting.heads, head_dim=setting.head_dim,
                        joint_attention_dim=setting.joint_attention_dim,
                        pooled_projection_dim=setting.pooled_projection_dim, in_channels=16, patch_size=2,
                        sample_size=2 * setting.grid, text_tokens=setting.text_tokens)
        return tiny_transformer(spec, seed=setting.seed)

    # step caches
    cache_refusals = {"fbcache": "diffusers' FirstBlockCache subtracts the last block's text output, which SD3's "
                                 "last block returns as None"}
    cache_witnesses = ("norm1_context",)
    taylorseer_skips_last_block = True  # its None text output cannot be recorded

    def cache_dit_target(self, transformer):
        """The block adapter cache-dit registers for SD3's pipeline, on the transformer alone."""
        from cache_dit import BlockAdapter, ForwardPattern

        return BlockAdapter(transformer=transformer, blocks=transformer.transformer_blocks,
                            forward_pattern=ForwardPattern.Pattern_1, check_forward_pattern=True)
