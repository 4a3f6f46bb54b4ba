"""Wan 2.1 / 2.2 video (``WanTransformer3DModel``): SDTM's forward of diffusers' ``WanTransformerBlock``.

Tokens: a latent video [B, C, F, H, W] cut into 1 x 2 x 2 patches, frame-major (F' frames of H' x W'
tokens). Windows tile each frame on its own (sy x sx, the 2-D families' plans with the frames stacked;
rows and columns of a frame that do not fill a window stay unmerged, as at the borders of an image), or
span ``st`` frames when a temporal window is set (sdtm/core/plans.py, ``Grid``).

Block (image tokens only; text enters through cross-attention), one plan per block from norm1's output:
norm1 + modulation -> plan -> [merge] -> self-attention with 3-D rotary positions -> [unmerge + blend +
gate + residual]; norm2 -> [merge] -> cross-attention (image queries, all text keys) -> [unmerge + blend
+ residual]; norm3 + modulation -> [merge] -> feed-forward -> [unmerge + blend + gate + residual].
Self- and cross-attention are attention sub-layers (merged in the structure phase), the feed-forward
merges in both phases. A merged token takes the rotary rows of its group's destination, as in Flux:
attention sees it at one real position (frame, row, column) of its window. Wan's attention processor
broadcasts per-sample rotary tables, so merged attention runs through diffusers' own modules.

Wan keeps the residual stream's sums in float32 (``(h.float() + gate * y).type_as(h)``); so does this
forward, merged or not. Protected steps follow ``WanTransformerBlock.forward`` of diffusers 0.42
operation for operation (bit for bit) and store the caches; blocks that do not merge at a step run
diffusers' forward untouched (sdtm/core/hooks.py).

Not supported: Wan 2.2 TI2V's per-token timesteps (``expand_timesteps``), refused at the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import engine
from ..core.schedule import BlockMode
from ..core.state import BlockLink
from .base import CallInfo, ModelAdapter, argument


def merged_rotary(rotary_emb: tuple[torch.Tensor, torch.Tensor], plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of the merged image tokens: (cos, sin), each [B, M, 1, D].

    rotary_emb: (cos, sin) [1, N, 1, D] of the unmerged tokens (``WanRotaryPosEmbed``); each merged row
    m of sample b takes the row of its first member (the group's destination, or the token itself)."""
    cos, sin = rotary_emb
    tokens = plan.slot.shape[1]
    if cos.dim() != 4 or cos.shape[0] != 1 or cos.shape[1] != tokens or cos.shape[2] != 1:
        raise ValueError(
            f"SDTM expects Wan rotary tables of shape [1, N={tokens}, 1, D] (WanRotaryPosEmbed), got "
            f"{tuple(cos.shape)}."
        )
    anchor = plan.members.gather(1, plan.offsets[:, :-1])  # [B, M] token index of each merged row
    return cos[0, :, 0][anchor].unsqueeze(2), sin[0, :, 0][anchor].unsqueeze(2)


def _check_processor(attention: torch.nn.Module) -> None:
    name = type(attention.processor).__name__
    if name != "WanAttnProcessor":
        raise ValueError(
            f"SDTM merges Wan attention computed by diffusers' WanAttnProcessor; this block's attention uses "
            f"{name}. Restore the default processor or remove SDTM."
        )


def _finish(link: BlockLink, name: str, residual: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
            plan, residual_is_ours: bool, spare: torch.Tensor | None = None) -> torch.Tensor:
    """Wan's ``(residual.float() + y * gate).type_as(residual)`` ([B, N, C]; gate [B, 1, C] float32, or
    None for a plain ``residual + y``), y [B, M, C] unmerged and blended when ``plan`` is given; the
    sub-layer's full output goes to its cache when the block's action says so."""
    if plan is None:
        out = y if gate is None else y * gate
        cache_out = link.cache_out.get(name)
        if cache_out is not None:
            cache_out.copy_(out.detach())
        return residual + y if gate is None else (residual.float() + out).type_as(residual)
    gate = gate[:, 0] if gate is not None else None
    out = engine.finish_sublayer(
        link, name, residual, y, gate, plan, link.state.ops, residual_is_ours=residual_is_ours, spare=spare
    )
    return out.type_as(residual)


def wan_block_forward(
    link: BlockLink,
    self,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    rotary_emb: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """``WanTransformerBlock.forward`` of a block that merges or is protected in this call (``link``);
    same arguments and output as diffusers'. hidden_states [B, N, C], temb [B, 6, C]."""
    action = engine.begin_block(link, hidden_states)
    if temb.ndim != 3:
        raise ValueError(
            "SDTM supports Wan blocks modulated per sample (temb [B, 6, C]); per-token modulation "
            "(Wan 2.2 TI2V) is not supported: remove SDTM."
        )
    ops = link.state.ops
    shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
        self.scale_shift_table + temb.float()
    ).chunk(6, dim=1)

    norm_hidden_states = (self.norm1(hidden_states.float()) * (1 + scale_msa) + shift_msa).type_as(hidden_states)
    plan = engine.compute_plan(link, norm_hidden_states, ops) if action.mode is BlockMode.MERGED else None
    attn_plan = plan if action.merge_attn else None
    mlp_plan = plan if action.merge_mlp else None

    # 1. Self-attention (3-D rotary positions; merged tokens at their destination's position).
    if attn_plan is None:
        attn_output = self.attn1(norm_hidden_states, None, None, rotary_emb)
    else:
        _check_processor(self.attn1)
        merged = engine.merge_tokens(norm_hidden_states, attn_plan, link, ops)
        attn_output = self.attn1(merged, None, None, merged_rotary(rotary_emb, attn_plan))
    spare = norm_hidden_states if attn_plan is not None else None
    hidden_states = _finish(link, "attn", hidden_states, attn_output, gate_msa, attn_plan, False, spare)

    # 2. Cross-attention: each image query on its own against all text tokens.
    norm_hidden_states = self.norm2(hidden_states.float()).type_as(hidden_states)
    attn_output = self.attn2(engine.merge_tokens(norm_hidden_states, attn_plan, link, ops), encoder_hidden_states,
                             None, None)
    hidden_states = _finish(link, "cross", hidden_states, attn_output, None, attn_plan, True)

    # 3. Feed-forward.
    norm_hidden_states = (self.norm3(hidden_states.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(
        hidden_states
    )
    ff_output = self.ffn(engine.merge_tokens(norm_hidden_states, mlp_plan, link, ops))
    return _finish(link, "mlp", hidden_states, ff_output, c_gate_msa, mlp_plan, True)


class WanAdapter(ModelAdapter):
    """Wan 2.1 / 2.2 text- and image-to-video: a latent video [B, C, F, H, W] in 1 x 2 x 2 patches, the
    timestep in the scheduler's units; classifier-free guidance calls the transformer twice per step
    (no cond / uncond pairs in one batch). Wan 2.2's two experts are two transformers, each patched
    (``apply_SDTM(pipe)`` patches ``transformer`` and ``transformer_2``)."""

    name = "wan"
    transformer_class = "WanTransformer3DModel"
    block_forwards = {"WanTransformerBlock": wan_block_forward}
    cfg_pairs = False
    structure_share = 0.4  # unvalidated on real weights (README)

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        return {"attn": "attn", "cross": "attn", "mlp": "mlp"}

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        hidden_states = argument(args, kwargs, "hidden_states", 0)
        timestep = argument(args, kwargs, "timestep", 1)
        if timestep is None:
            raise ValueError("SDTM needs the transformer's timestep argument to know the denoising step.")
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 1:
            raise ValueError(
                "SDTM does not support per-token timesteps (Wan 2.2 TI2V's expand_timesteps); remove SDTM "
                "for this model."
            )
        if hidden_states.dim() != 5:
            raise ValueError(f"SDTM expects a Wan latent video [B, C, F, H, W], got {tuple(hidden_states.shape)}.")
        p_t, p_h, p_w = transformer.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        return CallInfo(timestep, height // p_h, width // p_w, hidden_states.shape[0], hidden_states.device,
                        frames=frames // p_t)


# --------------------------------------------------------------------------------------- tiny models
@dataclass(frozen=True)
class TinyWanSpec:
    """Shape of a tiny Wan 2.1-style transformer (random weights) for the demo, the tests and the
    benchmarks. Its VAE compresses 4x in time and 8x in space, as Wan's: ``num_frames = 4k + 1`` video
    frames are k + 1 latent frames, an H x W video has (H / 16) x (W / 16) tokens per latent frame."""

    num_layers: int = 2
    heads: int = 2
    head_dim: int = 12  # Wan's rotary splits it into time, rows and columns: a multiple of 6 (or more)
    ffn_dim: int = 48
    text_dim: int = 16
    latent_channels: int = 4
    text_tokens: int = 7
    cross_attn_norm: bool = True

    @property
    def channels(self) -> int:
        return self.heads * self.head_dim


def tiny_wan_transformer(spec: TinyWanSpec = TinyWanSpec(), seed: int = 0, dtype=torch.float32):
    """A ``WanTransformer3DModel`` with random weights (seeded), in eval mode."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=spec.latent_channels, out_channels=spec.latent_channels, text_dim=spec.text_dim, freq_dim=16,
        ffn_dim=spec.ffn_dim, num_layers=spec.num_layers, cross_attn_norm=spec.cross_attn_norm,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )
    return model.to(dtype).eval()


def tiny_wan_pipeline(spec: TinyWanSpec = TinyWanSpec(), seed: int = 0, dtype=torch.float32, experts: int = 1):
    """A ``WanPipeline`` with a tiny transformer and VAE, no text encoder (call it with
    ``tiny_wan_prompt_embeds``). ``experts=2``: Wan 2.2-style, a second transformer (``transformer_2``)
    denoises the low-noise half of the steps (``boundary_ratio=0.5``)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=spec.latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * spec.latent_channels,
        latents_std=[1.0] * spec.latent_channels,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=vae.to(dtype).eval(), scheduler=scheduler,
        transformer=tiny_wan_transformer(spec, seed, dtype),
        transformer_2=tiny_wan_transformer(spec, seed + 1, dtype) if experts == 2 else None,
        boundary_ratio=0.5 if experts == 2 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_prompt_embeds(spec: TinyWanSpec, batch: int = 1, seed: int = 0, dtype=torch.float32) -> dict:
    """Keyword arguments with random prompt and negative prompt embeddings (T5-like sequences)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, spec.text_tokens, spec.text_dim)
    return {
        "prompt_embeds": torch.randn(*shape, generator=generator).to(dtype),
        "negative_prompt_embeds": torch.randn(*shape, generator=generator).to(dtype),
    }
