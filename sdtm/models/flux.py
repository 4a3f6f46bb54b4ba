"""Flux.1 (``FluxTransformer2DModel``): SDTM's forwards of diffusers' ``FluxTransformerBlock`` (double
stream) and ``FluxSingleTransformerBlock`` (single stream).

Flux packs 2x2 latent patches into one token and says where each token sits in ``img_ids`` (rows of
(0, row, column)); SDTM reads the grid from there, once per ``img_ids`` tensor. The transformer is called
with ``timestep / 1000``: the step is found at 1000 times that.

Rotary positions: a merged token takes the rotary rows (cos, sin) of its group's destination token, the
token that also anchors the group in the merge plan (``members`` lists it first), so attention sees
every merged token at one real position of its window; text rows are untouched. The table then differs
per sample ([B, S, D]), which diffusers' ``apply_rotary_emb`` does not broadcast, so merged attention runs
through ``merged_attention`` below, the arithmetic of diffusers' ``FluxAttnProcessor`` with per-sample
tables. Blocks whose attention uses another processor (e.g. IP-Adapter) refuse to merge it.

Double-stream blocks: as SD3's joint blocks. Image stream: norm1 -> plan -> [merge] -> joint attention
with the text tokens -> [unmerge + blend + gate + residual]; [norm2 + modulation + merge] -> ff ->
[unmerge + blend + gate + residual]; the text stream is diffusers' own. Sub-layers "attn" and "mlp".

Single-stream blocks: text and image tokens in one sequence; attention and the MLP branch read the same
normalised input and share one output projection. Only the image part merges: the sequence becomes
[text, merged image], attention and the MLP branch run on it, and the projection's image rows are
unmerged. The whole block is one sub-layer, "parallel", of the attention kind: it merges in the structure
phase and runs on every token in the detail phase. Why not merge its MLP branch alone in the detail
phase: the detail phase keeps attention on every token, so the MLP branch would need its own unmerge and
its own cache of the branch's projected output; a protected step computes the projection fused (as the
unpatched model, bit for bit) and would need an extra C x 4C product per token (about a quarter of the
block's work) to fill that cache. Detail steps merge the MLP of the double-stream blocks only.

Blocks that do not merge at a step run diffusers' forward untouched (sdtm/core/hooks.py); protected steps follow diffusers
0.42's forwards operation for operation (bit for bit) and store the caches.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..core import engine, norms
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import (CallInfo, DenoisingInputs, ModelAdapter, Preset, argument, cast_module, is_int, meta_tensor)

FLUX_TIMESTEP_SCALE = 1000.0


# --------------------------------------------------------------------------------------- rotary positions
def merged_rotary(
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor], plan, text_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of a merged sequence [text, merged image]: (cos, sin), each [B, T + M, D].

    image_rotary_emb: (cos, sin) [T + N, D] of the unmerged sequence; each merged row m of sample b takes
    the row of its first member (the group's destination, or the unmerged token itself)."""
    cos, sin = image_rotary_emb
    batch = plan.slot.shape[0]
    if cos.dim() != 2 or cos.shape[0] != text_tokens + plan.slot.shape[1]:
        raise ValueError(
            f"SDTM expects Flux rotary tables of shape [text + image tokens, D] = [{text_tokens} + "
            f"{plan.slot.shape[1]}, D], got {tuple(cos.shape)}."
        )
    anchor = plan.members.gather(1, plan.offsets[:, :-1])  # [B, M] token index of each merged row

    def table(rows: torch.Tensor) -> torch.Tensor:
        text = rows[:text_tokens].expand(batch, -1, -1)
        image = rows[text_tokens:][anchor]  # [B, M, D]
        return torch.cat([text, image], dim=1)

    return table(cos), table(sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, S, H, D] with per-sample tables [B, S, D] (pairs of adjacent
    channels, as diffusers' ``apply_rotary_emb(..., use_real_unbind_dim=-1)``)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


def merged_attention(
    attn: torch.nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor],
):
    """Diffusers' ``FluxAttnProcessor`` on merged image tokens, with per-sample rotary tables.

    hidden_states [B, M, C] (double stream: image tokens; single stream: [B, T + M, C], text first);
    encoder_hidden_states [B, T, C] or None; rotary (cos, sin) [B, T + M, D]. Returns what the processor
    returns: (image output [B, M, C], text output [B, T, C]) with text, else the sequence's output."""
    processor = attn.processor
    if type(processor).__name__ != "FluxAttnProcessor":
        raise ValueError(
            f"SDTM merges Flux attention computed by diffusers' FluxAttnProcessor; this block's attention uses "
            f"{type(processor).__name__}. Restore the default processor or remove SDTM."
        )
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))

    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False):
            e_query, e_key, e_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            e_query = attn.add_q_proj(encoder_hidden_states)
            e_key = attn.add_k_proj(encoder_hidden_states)
            e_value = attn.add_v_proj(encoder_hidden_states)
        e_query = attn.norm_added_q(e_query.unflatten(-1, (-1, attn.head_dim)))
        e_key = attn.norm_added_k(e_key.unflatten(-1, (-1, attn.head_dim)))
        e_value = e_value.unflatten(-1, (-1, attn.head_dim))
        query = torch.cat([e_query, query], dim=1)
        key = torch.cat([e_key, key], dim=1)
        value = torch.cat([e_value, value], dim=1)

    cos, sin = rotary
    query, key = _rotate(query, cos, sin), _rotate(key, cos, sin)
    out = dispatch_attention_fn(
        query, key, value, attn_mask=None,
        backend=processor._attention_backend, parallel_config=processor._parallel_config,
    )
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    text_tokens = encoder_hidden_states.shape[1]
    text, image = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
    image = attn.to_out[1](attn.to_out[0](image.contiguous()))
    return image, attn.to_add_out(text.contiguous())


def _check_attention_kwargs(joint_attention_kwargs: dict) -> None:
    unsupported = sorted(k for k in joint_attention_kwargs if k != "image_rotary_emb")
    if unsupported:
        raise ValueError(
            f"SDTM cannot merge Flux attention called with joint_attention_kwargs {unsupported}; call without "
            "them or remove SDTM."
        )


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# --------------------------------------------------------------------------------------- double stream
def flux_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxTransformerBlock.forward`` of a block that merges or is protected in this call (``link``);
    same arguments and outputs as diffusers'."""
    action = engine.begin_block(link, hidden_states)
    joint_attention_kwargs = joint_attention_kwargs or {}
    ops = link.state.ops
    fused_norms = action.mode is BlockMode.MERGED and norms.fusable(self)
    if fused_norms:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = norms.norm1(self, hidden_states, temb, ops)
    else:
        norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
        encoder_hidden_states, emb=temb
    )

    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # Attention.
    if attn_plan is None:
        attention_outputs = self.attn(
            hidden_states=norm_hidden_states,
            encoder_hidden_states=norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            **joint_attention_kwargs,
        )
    else:
        _check_attention_kwargs(joint_attention_kwargs)
        attention_outputs = merged_attention(
            self.attn,
            engine.merge_tokens(norm_hidden_states, attn_plan, link, ops),
            norm_encoder_hidden_states,
            merged_rotary(image_rotary_emb, attn_plan, encoder_hidden_states.shape[1]),
        )
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]
    spare = norm_hidden_states if fused_norms and attn_plan is not None else None
    hidden_states = engine.finish_sublayer(
        link, "attn", hidden_states, attn_output, gate_msa, attn_plan, ops, residual_is_ours=False, spare=spare
    )

    if fused_norms:
        ff_input = norms.norm2_merged(
            self, hidden_states, shift_mlp, scale_mlp, mlp_plan, link.state.config.pseudo_merge, ops
        )
    else:
        norm_hidden_states = self.norm2(hidden_states)
        norm_hidden_states = norm_hidden_states * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff_input = engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops)
    ff_output = self.ff(ff_input)
    hidden_states = engine.finish_sublayer(
        link, "mlp", hidden_states, ff_output, gate_mlp, mlp_plan, ops, residual_is_ours=True
    )
    if len(attention_outputs) == 3:  # IP-Adapter's output, only when attention ran unmerged
        hidden_states = hidden_states + attention_outputs[2]

    # Text stream: diffusers' own.
    context_attn_output = c_gate_msa.unsqueeze(1) * context_attn_output
    encoder_hidden_states = encoder_hidden_states + context_attn_output
    norm_encoder_hidden_states = self.norm2_context(encoder_hidden_states)
    norm_encoder_hidden_states = norm_encoder_hidden_states * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    context_ff_output = self.ff_context(norm_encoder_hidden_states)
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * context_ff_output
    return _clip_fp16(encoder_hidden_states), hidden_states


# --------------------------------------------------------------------------------------- single stream
def flux_single_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` of a block that merges or is protected in this call
    (``link``; detail steps leave it unchanged: nothing of it merges there); same arguments and outputs as
    diffusers'."""
    action = engine.begin_block(link, hidden_states)
    joint_attention_kwargs = joint_attention_kwargs or {}
    text_tokens = encoder_hidden_states.shape[1]

    if action.mode is BlockMode.PROTECTED:  # diffusers' forward, plus the cache of the image rows
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        norm_hidden_states, gate = self.norm(residual, emb=temb)
        mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
        attn_output = self.attn(
            hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **joint_attention_kwargs
        )
        out = gate.unsqueeze(1) * self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
        cache_out = link.cache_out.get("parallel")
        if cache_out is not None:
            cache_out.copy_(out[:, text_tokens:].detach())
        out = _clip_fp16(residual + out)
        return out[:, :text_tokens], out[:, text_tokens:]

    # Structure phase: [text, merged image] through attention and the MLP branch.
    _check_attention_kwargs(joint_attention_kwargs)
    ops = link.state.ops
    norm = self.norm
    shift, scale, gate = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    if norms.plain_layer_norm(norm.norm):
        norm_image = ops.norm_modulate(hidden_states, shift, scale, norm.norm.eps)
    else:
        norm_image = norm.norm(hidden_states) * (1 + scale[:, None]) + shift[:, None]
    norm_text = norm.norm(encoder_hidden_states) * (1 + scale[:, None]) + shift[:, None]
    plan = engine.compute_plan(link, norm_image, ops)
    sequence = torch.cat([norm_text, engine.merge_tokens(norm_image, plan, link, ops)], dim=1)
    mlp_hidden_states = self.act_mlp(self.proj_mlp(sequence))
    attn_output = merged_attention(self.attn, sequence, None, merged_rotary(image_rotary_emb, plan, text_tokens))
    projected = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))  # [B, T + M, C]
    text = _clip_fp16(encoder_hidden_states + gate.unsqueeze(1) * projected[:, :text_tokens])
    image = engine.finish_sublayer(
        link, "parallel", hidden_states, projected[:, text_tokens:].contiguous(), gate, plan, ops,
        residual_is_ours=False, spare=norm_image,
    )
    return text, _clip_fp16(image)


# --------------------------------------------------------------------------------------- shapes and tiny models
DEV_TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev
SCHNELL_TEXT_TOKENS = 256  # and for FLUX.1-schnell
PACKING = 2  # FluxPipeline packs 2x2 latent pixels into one token
# FLUX.1 at any size: 19 double-stream and 38 single-stream blocks of width 24 x 128 = 3072, 64 channels a
# packed token (16 latent channels x 2 x 2), T5-XXL (4096) and CLIP pooled (768) text.
_FLUX_COMMON = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, out_channels=None,
                    num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))


def flux_shaped_transformer(num_layers: int = 1, num_single_layers: int | None = None, heads: int = 6,
                            seed: int = 0, device="cpu", dtype=torch.float32):
    """FLUX.1-dev's widths (head width 128 with rotary axes 16 + 56 + 56, 16 latent channels packed 2x2 into
    64, T5 context 4096 wide, pooled CLIP vector 768 wide, guidance embedding), ``num_layers``
    double-stream blocks and ``num_single_layers`` single-stream ones (default twice as many, as in
    FLUX.1-dev's 19 + 38), C = heads * 128, random weights."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers,
        num_single_layers=2 * num_layers if num_single_layers is None else num_single_layers,
        attention_head_dim=128, num_attention_heads=heads, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=(16, 56, 56),
    )
    return cast_module(model, device, dtype)


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

    from ..tiny import tiny_vae

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


# --------------------------------------------------------------------------------------- the adapter
class FluxAdapter(ModelAdapter):
    """Flux.1 (dev, schnell and fine-tunes with the same blocks): packed 2x2 latent tokens placed by
    ``img_ids``, the timestep in thousandths of the scheduler's units, batches without cond/uncond pairs
    (guidance-distilled; true CFG calls the transformer twice)."""

    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    block_forwards = {
        "FluxTransformerBlock": flux_block_forward,
        "FluxSingleTransformerBlock": flux_single_block_forward,
    }
    cfg_pairs = False
    structure_share = 0.4  # unvalidated on real weights (README)
    title = "Flux"

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        if _is(block, "FluxSingleTransformerBlock"):
            return {"parallel": "attn"}
        return {"attn": "attn", "mlp": "mlp"}

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 3)
        img_ids = argument(args, kwargs, "img_ids", 4)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        if img_ids is None:
            raise ValueError("SDTM needs Flux's img_ids argument to know the image-token grid.")
        height, width = image_grid(transformer, img_ids, hidden_states.shape[1])
        return CallInfo(timestep, height, width, hidden_states.shape[0], hidden_states.device,
                        timestep_scale=FLUX_TIMESTEP_SCALE)


    # ---- what the command line, the demo and the benchmarks need (sdtm.models.base.ModelAdapter) -------------

    # sdtm macs: FluxPipeline packs 2x2 latent pixels into one token (the config's patch_size of 1
    # notwithstanding); the double-stream blocks are counted like SD3's joint blocks, the single-stream ones
    # are all of the attention kind.
    presets = {
        # FLUX.1-dev: guidance-distilled (a guidance embedding), 512 text tokens.
        "flux-dev": Preset(dict(_FLUX_COMMON, guidance_embeds=True), steps=28, batch=1, dtype="bfloat16",
                           gpu_check="tiny FLUX.1-dev-shaped (1 double-stream + 2 single-stream blocks, C=128)",
                           h100_step_seconds=0.25),
        # FLUX.1-schnell: timestep-distilled, no guidance embedding, 256 text tokens.
        "flux-schnell": Preset(dict(_FLUX_COMMON, guidance_embeds=False), steps=4, batch=1, dtype="bfloat16"),
    }
    config_classes = ("FluxTransformer2DModel",)
    config_signature_keys = ("num_single_layers", "axes_dims_rope", "guidance_embeds")
    config_int_keys = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                       "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim")
    config_nullable_int_keys = ("out_channels",)  # null: out_channels follows in_channels
    config_other_keys = ("guidance_embeds", "axes_dims_rope")
    token_side_name = "packing"

    def check_config(self, config: dict, path: str) -> None:
        if "guidance_embeds" in config and not isinstance(config["guidance_embeds"], bool):
            raise ValueError(f"{path}: guidance_embeds must be true or false, got {config['guidance_embeds']!r}.")
        axes = config.get("axes_dims_rope", (16, 56, 56))
        if not isinstance(axes, (list, tuple)) or not axes or not all(is_int(v) and v > 0 and v % 2 == 0 for v in axes):
            raise ValueError(f"{path}: axes_dims_rope must be a list of positive even ints (rotary widths), "
                             f"got {axes!r}.")
        head_dim = config.get("attention_head_dim", 128)
        if len(axes) != 3 or sum(axes) != head_dim:
            raise ValueError(f"{path}: axes_dims_rope ({list(axes)}) must be three rotary widths, one per position "
                             f"id column, summing to attention_head_dim ({head_dim}).")

    def text_tokens(self, config: dict) -> int:
        """FLUX.1-dev's 512 T5 tokens for a model with a guidance embedding, FLUX.1-schnell's 256 otherwise."""
        return DEV_TEXT_TOKENS if config.get("guidance_embeds", False) else SCHNELL_TEXT_TOKENS

    def token_side(self, config: dict) -> int:
        return PACKING  # whatever the transformer's patch size (1); rotary positions cover any grid

    def token_phrase(self, side: int) -> str:
        return f"{side}x{side} packing"

    def meta_inputs(self, model, batch, grid_h, grid_w, text_tokens, frames=1) -> dict:
        c = model.config
        n = grid_h * grid_w
        inputs = dict(hidden_states=meta_tensor(batch, n, c.in_channels), timestep=meta_tensor(batch),
                      encoder_hidden_states=meta_tensor(batch, text_tokens, c.joint_attention_dim),
                      pooled_projections=meta_tensor(batch, c.pooled_projection_dim),
                      img_ids=meta_tensor(n, 3), txt_ids=meta_tensor(text_tokens, 3))
        if c.guidance_embeds:
            inputs["guidance"] = meta_tensor(batch)
        return inputs

    def block_inputs(self, model, block, batch, tokens, text_tokens, make=meta_tensor) -> dict:
        """Either block kind takes the image and text streams apart; a single-stream block joins them into
        one sequence of text + image tokens. The rotary tables cover text and image rows."""
        c, head_dim = model.inner_dim, model.config.attention_head_dim
        rotary = (make(text_tokens + tokens, head_dim), make(text_tokens + tokens, head_dim))
        return dict(hidden_states=make(batch, tokens, c), encoder_hidden_states=make(batch, text_tokens, c),
                    temb=make(batch, c), image_rotary_emb=rotary)

    # sdtm generate: guidance-distilled, no negative prompt and one transformer pass per step
    pipeline_classes = ("FluxPipeline",)
    text_components = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
    default_guidance = 3.5
    distilled_guidance = True

    def guidance_refusal(self, config: dict) -> str | None:
        if config.get("guidance_embeds", False):
            return None
        return "has no guidance embedding (transformer/config.json guidance_embeds is false, as in FLUX.1-schnell)"

    # sdtm demo: Flux.1-dev's proportions, twice as many single-stream as double-stream blocks; batch 1
    demo_title = "tiny Flux.1 pipeline"
    demo_spec = TinyFluxSpec(num_layers=2, num_single_layers=4, heads=4, head_dim=64, axes_dims_rope=(16, 24, 24),
                             joint_attention_dim=64, pooled_projection_dim=32, text_tokens=16)

    def tiny_pipeline(self, spec=None, seed=0, dtype=torch.float32):
        return tiny_flux_pipeline(spec or TinyFluxSpec(), seed, dtype)

    def tiny_call_kwargs(self, spec, batch=1, seed=0, dtype=torch.float32) -> dict:
        # Guidance-distilled: the guidance is an input of the transformer, no negative prompt, one pass.
        return {**tiny_flux_prompt_embeds(spec, batch, seed, dtype), "guidance_scale": 3.5}

    def describe_blocks(self, spec) -> str:
        return f"{spec.num_layers} double-stream + {spec.num_single_layers} single-stream blocks"

    # sdtm bench e2e, the GPU check
    bench_title = "FLUX.1-dev-shaped transformer"
    bench_help = ("FLUX.1-dev-shaped (C=768, 1 double-stream + 2 single-stream blocks, 512 text tokens, batch 1: "
                  "guidance-distilled)")
    bench_text_tokens = DEV_TEXT_TOKENS
    bench_layers, bench_heads, bench_head_dim = 1, 6, 128

    def bench_transformer(self, num_layers=None, heads=None, sample_size=128, seed=0, device="cpu",
                          dtype=torch.float32):
        """``num_layers`` double-stream blocks and twice as many single-stream ones; any latent size."""
        return flux_shaped_transformer(self.bench_layers if num_layers is None else num_layers, None,
                                       self.bench_heads if heads is None else heads, seed, device, dtype)

    def tiny_bench_transformer(self, latent, seed=0, device="cpu", dtype=torch.float32):
        return flux_shaped_transformer(1, 2, 1, seed, device, dtype)

    def denoising_inputs(self, transformer, latent_h, latent_w, batch, text_tokens, generator,
                         frames=1) -> DenoisingInputs:
        """Latents packed into (h/2)(w/2) tokens of 2x2 patches placed by ``img_ids``, ``timestep / 1000``,
        the distilled guidance 3.5 (models with a guidance embedding), FluxPipeline's schedule (sigmas 1 ..
        1/steps, shift from the image token count)."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        device, dtype, config = transformer.device, transformer.dtype, transformer.config

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(device, dtype)

        if latent_h % 2 or latent_w % 2:
            raise ValueError(f"Flux packs 2x2 latent patches: the latent must have even sides, got "
                             f"{latent_h}x{latent_w}.")
        rows, cols = latent_h // 2, latent_w // 2
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        latents = draw(batch, rows * cols, config.in_channels)
        context = draw(batch, text_tokens, config.joint_attention_dim)
        pooled = draw(batch, config.pooled_projection_dim)
        img_ids = torch.zeros(rows, cols, 3)
        img_ids[..., 1] += torch.arange(rows)[:, None]
        img_ids[..., 2] += torch.arange(cols)[None, :]
        extra = {"img_ids": img_ids.reshape(-1, 3).to(device, dtype),
                 "txt_ids": torch.zeros(text_tokens, 3).to(device, dtype),
                 "guidance": torch.full((batch,), 3.5, device=device, dtype=torch.float32)
                 if config.guidance_embeds else None}
        # FluxPipeline's schedule: the shift grows with the image token count.
        mu = 0.5 + (1.15 - 0.5) * (rows * cols - 256) / (4096 - 256)

        def set_timesteps(steps: int) -> torch.Tensor:
            sigmas = np.linspace(1.0, 1 / steps, steps)
            scheduler.set_timesteps(steps, device=latents.device, sigmas=sigmas, mu=mu)
            return scheduler.timesteps

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer(hidden_states=x, timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
                               encoder_hidden_states=context, pooled_projections=pooled, return_dict=False,
                               **extra)[0]

        return DenoisingInputs(scheduler, latents, set_timesteps, predict)

    # step caches: diffusers' FirstBlockCache through enable_cache; cache-dit has its own adapter
    cache_witnesses = ("norm1_context", "proj_mlp")  # double-stream blocks, single-stream blocks

def _is(module: torch.nn.Module, class_name: str) -> bool:
    return any(c.__name__ == class_name for c in type(module).__mro__)


def image_grid(transformer: torch.nn.Module, img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """(rows, columns) of the token grid ``img_ids`` [N, 3] (or [B, N, 3]) describes; a ValueError unless
    token n sits at (0, n // columns, n % columns), as exactly as the ids' dtype can say it (FluxPipeline
    makes its ids in the model's dtype, so bf16 rounds positions past 256). Reading the ids is a device
    read: the result is remembered in the SDTM state for this very tensor object (a weak reference, so a
    new tensor at a freed one's address is read again) while its version is unchanged."""
    state = getattr(transformer, "_sdtm_state", None)
    memo = state.adapter_memo if state is not None else {}
    version = None if img_ids.is_inference() else img_ids._version  # inference tensors have no version
    held = memo.get("img_ids")
    if held is not None and held[0]() is img_ids and held[1:3] == (version, num_tokens):
        return held[3]
    grid = _read_image_grid(img_ids, num_tokens)
    memo["img_ids"] = (weakref.ref(img_ids), version, num_tokens, grid)
    return grid


def _read_image_grid(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    ids = img_ids.detach()
    if ids.dim() == 3:
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[-1] != 3 or ids.shape[0] != num_tokens:
        raise ValueError(
            f"SDTM expects Flux img_ids of shape [{num_tokens}, 3] (one row per image token), got "
            f"{tuple(img_ids.shape)}."
        )
    ids_dtype = ids.dtype
    ids = ids.to(device="cpu", dtype=torch.float64)
    # Row 0 is exact in every dtype: its length is the grid's width.
    first_row = ids[:, 1] == 0
    width = int(first_row.to(torch.int64).cumprod(0).sum())
    height = num_tokens // width if width else 0
    n = torch.arange(num_tokens, dtype=torch.float64)
    expected = torch.stack([torch.zeros_like(n), torch.div(n, max(width, 1), rounding_mode="floor"),
                            n % max(width, 1)], dim=1)
    if ids_dtype.is_floating_point:
        expected = expected.to(ids_dtype).to(torch.float64)  # the rounding FluxPipeline's ids went through
    if width == 0 or height * width != num_tokens or not torch.equal(ids, expected):
        raise ValueError(
            "SDTM needs Flux img_ids that place the image tokens row by row on one grid (token n at "
            "(0, n // width, n % width), as FluxPipeline makes them); these do not (e.g. reference-image "
            "tokens appended, as Flux Kontext does)."
        )
    return height, width
