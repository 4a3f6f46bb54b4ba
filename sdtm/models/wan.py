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
from .base import (CallInfo, DenoisingInputs, ModelAdapter, Preset, SizeRule, argument, cast_module, is_int,
                   meta_tensor)

TEXT_TOKENS = 512  # umT5 tokens of WanPipeline's prompts (max_sequence_length)
TEMPORAL_FACTOR, SPATIAL_FACTOR = 4, 8  # Wan's VAE: 4 frames and 8 x 8 pixels a latent
# Wan 2.1's transformer configs (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers and -14B-Diffusers).
_WAN_COMMON = dict(patch_size=[1, 2, 2], attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                   freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                   added_kv_proj_dim=None, rope_max_seq_len=1024)


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

    # ---- what the command line, the demo and the benchmarks need (sdtm.models.base.ModelAdapter) -------------
    title = "Wan"
    video = True
    default_frames = 81  # Wan 2.1's clips: 81 frames, 21 latent frames
    bench_frames = 9  # 3 latent frames
    bench_latent = (64, 64)  # 3 x 32 x 32 = 3072 tokens
    bench_small_latent = (48, 44)  # 3 x 24 x 22 = 1584 tokens, about what ratio 0.5 merges 3072 to

    def latent_frames(self, frames: int) -> int:
        if not is_int(frames) or frames < 1 or (frames - 1) % TEMPORAL_FACTOR:
            near = max(1, (frames - 1) // TEMPORAL_FACTOR * TEMPORAL_FACTOR + 1) if is_int(frames) else 81
            raise ValueError(f"Wan generates 4k + 1 frames (its VAE packs 4 frames into one latent frame after "
                             f"the first), got {frames}; use e.g. {near} or {near + TEMPORAL_FACTOR}.")
        return (frames - 1) // TEMPORAL_FACTOR + 1

    def preview(self, output):
        return output[len(output) // 2]

    # sdtm macs: the 480p (832 x 480) and 720p (1280 x 720) clips of 81 frames the model cards use; batch 2:
    # classifier-free guidance's two calls a step (each of batch 1, the same MACs).
    presets = {
        # The GPU check: 17 frames (5 latent) of 512 x 512 pixels (5 x 32 x 32 = 5120 tokens), 10 steps.
        "wan2.1-1.3b": Preset(dict(_WAN_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
                              steps=50, batch=2, dtype="bfloat16",
                              gpu_check="tiny Wan-shaped (2 blocks, C=144, 17 frames)", gpu_size=512, gpu_steps=10,
                              gpu_frames=17),
        "wan2.1-14b": Preset(dict(_WAN_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
                             steps=50, batch=2, dtype="bfloat16"),
    }
    config_classes = ("WanTransformer3DModel",)
    config_signature_keys = ("ffn_dim", "freq_dim", "rope_max_seq_len")
    config_int_keys = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                       "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len")
    config_nullable_int_keys = ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
    config_other_keys = ("patch_size", "cross_attn_norm", "qk_norm", "eps")
    token_side_name = "patch"
    feed_forward = "ffn"

    def check_config(self, config: dict, path: str) -> None:
        patch = config.get("patch_size", [1, 2, 2])
        if not isinstance(patch, (list, tuple)) or len(patch) != 3 or not all(is_int(v) and v > 0 for v in patch):
            raise ValueError(f"{path}: patch_size must be three positive ints (frames, rows, columns), got {patch!r}.")
        if patch[0] != 1:
            raise ValueError(f"{path}: SDTM supports Wan patches of one frame (patch_size [1, h, w]), got {patch!r}.")
        if patch[1] != patch[2]:
            raise ValueError(f"{path}: SDTM supports square Wan patches, got {patch!r}.")
        if "image_dim" in config and config["image_dim"] is not None and config.get("added_kv_proj_dim") is None:
            raise ValueError(f"{path}: an image-conditioned Wan (image_dim) needs added_kv_proj_dim.")

    def text_tokens(self, config: dict) -> int:
        return TEXT_TOKENS

    def token_side(self, config: dict) -> int:
        return list(config.get("patch_size", [1, 2, 2]))[1]

    def meta_inputs(self, model, batch, grid_h, grid_w, text_tokens, frames=1) -> dict:
        c = model.config
        _, p_h, p_w = c.patch_size
        inputs = dict(hidden_states=meta_tensor(batch, c.in_channels, frames, grid_h * p_h, grid_w * p_w),
                      timestep=meta_tensor(batch), encoder_hidden_states=meta_tensor(batch, text_tokens, c.text_dim))
        if c.image_dim is not None:  # image-to-video: CLIP's 257 image tokens
            inputs["encoder_hidden_states_image"] = meta_tensor(batch, 257, c.image_dim)
        return inputs

    def block_inputs(self, model, block, batch, tokens, text_tokens, make=meta_tensor) -> dict:
        c = model.config
        width = c.num_attention_heads * c.attention_head_dim
        text = text_tokens + (257 if c.image_dim is not None else 0)
        rotary = make(1, tokens, 1, c.attention_head_dim)
        return dict(hidden_states=make(batch, tokens, width), encoder_hidden_states=make(batch, text, width),
                    temb=make(batch, 6, width), rotary_emb=(rotary, rotary))

    # sdtm generate: classifier-free guidance (two calls a step); a video per prompt, written as a GIF
    pipeline_classes = ("WanPipeline",)
    text_components = ("tokenizer", "text_encoder")
    default_guidance = 5.0
    output_suffix = ".gif"
    pixel_multiple = SPATIAL_FACTOR * 2  # WanPipeline's own rule: the VAE's factor x the patch

    def pipeline_output(self, result):
        return result.frames

    def generate_call_kwargs(self, guidance, frames=1) -> dict:
        return {**super().generate_call_kwargs(guidance), "num_frames": frames}

    def vae_scale_of_config(self, vae: dict) -> int | None:
        value = vae.get("scale_factor_spatial", SPATIAL_FACTOR)  # Wan's released VAEs leave it out: 8
        return value if is_int(value) and value > 0 else None

    def save_output(self, output, file) -> None:
        """One video (a list of PIL frames, or an array [F, H, W, 3] in [0, 1]) as an animated GIF, 16 fps
        (Wan's)."""
        from PIL import Image

        frames = output if isinstance(output, (list, tuple)) else list(output)
        images = [frame if isinstance(frame, Image.Image)
                  else Image.fromarray((torch.as_tensor(frame).clamp(0, 1) * 255).round().byte().numpy())
                  for frame in frames]
        images[0].save(file, format="GIF", save_all=True, append_images=images[1:], duration=1000 // 16, loop=0)

    # sdtm demo, the tests
    demo_title = "tiny Wan pipeline (video)"
    demo_spec = None  # set below the class: the demo's spec

    def tiny_pipeline(self, spec=None, seed=0, dtype=torch.float32):
        return tiny_wan_pipeline(spec or TinyWanSpec(), seed, dtype)

    def tiny_call_kwargs(self, spec, batch=1, seed=0, dtype=torch.float32) -> dict:
        return {**tiny_wan_prompt_embeds(spec, batch, seed, dtype), "guidance_scale": 5.0,
                "num_frames": spec.num_frames}

    def tiny_size_rule(self, spec) -> SizeRule:
        return SizeRule(SPATIAL_FACTOR * 2, "the tiny Wan VAE down-samples 8x and a token spans 2 x 2 latent pixels")

    demo_size = 192  # 12 x 12 tokens a latent frame

    def tiny_frames(self, spec) -> int:
        return spec.num_frames

    def tiny_tokens(self, spec, size) -> int:
        return self.latent_frames(spec.num_frames) * (size // (SPATIAL_FACTOR * 2)) ** 2

    def vae_scale(self, pipe) -> int:
        return pipe.vae_scale_factor_spatial

    def describe_blocks(self, spec) -> str:
        return f"{spec.num_layers} blocks, {spec.num_frames} frames ({self.latent_frames(spec.num_frames)} latent)"

    # sdtm bench e2e, the GPU check
    bench_title = "Wan-shaped transformer"
    bench_help = "Wan2.1-shaped (C=768, 2 blocks, 512 text tokens, 9 frames, batch 1)"
    bench_text_tokens = TEXT_TOKENS
    bench_layers, bench_heads, bench_head_dim = 2, 6, 128

    def bench_transformer(self, num_layers=None, heads=None, sample_size=128, seed=0, device="cpu",
                          dtype=torch.float32):
        return wan_shaped_transformer(self.bench_layers if num_layers is None else num_layers,
                                      self.bench_heads if heads is None else heads, seed=seed, device=device,
                                      dtype=dtype)

    def tiny_bench_transformer(self, latent, seed=0, device="cpu", dtype=torch.float32):
        return wan_shaped_transformer(2, 1, head_dim=144, ffn_dim=576, seed=seed, device=device, dtype=dtype)

    def denoising_inputs(self, transformer, latent_h, latent_w, batch, text_tokens, generator,
                         frames=1) -> DenoisingInputs:
        """[batch, 16, frames, h, w] latents, the text tokens, UniPC with flow sigmas (shift 3), as
        WanPipeline denoises (one call a step: the conditional one)."""
        from diffusers import UniPCMultistepScheduler

        device, dtype, config = transformer.device, transformer.dtype, transformer.config

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(device, dtype)

        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
        latents = draw(batch, config.in_channels, frames, latent_h, latent_w)
        context = draw(batch, text_tokens, config.text_dim)

        def set_timesteps(steps: int) -> torch.Tensor:
            scheduler.set_timesteps(steps, device=latents.device)
            return scheduler.timesteps

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=context,
                               return_dict=False)[0]

        return DenoisingInputs(scheduler, latents, set_timesteps, predict)

    # step caches: cache-dit has its own adapter for WanPipeline
    cache_witnesses = ("attn2",)


# --------------------------------------------------------------------------------------- shapes


def wan_shaped_transformer(num_layers: int = 2, heads: int = 6, head_dim: int = 128, ffn_dim: int | None = None,
                           seed: int = 0, device="cpu", dtype=torch.float32):
    """Wan 2.1's widths (heads of 128, a 4096-wide text context, 16 latent channels, the 1.3B model's
    feed-forward ratio 8960 / 1536) with fewer blocks and C = heads x head_dim, random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    width = heads * head_dim
    model = WanTransformer3DModel(**dict(_WAN_COMMON, attention_head_dim=head_dim), num_attention_heads=heads,
                                  ffn_dim=ffn_dim or round(width * 8960 / 1536 / 64) * 64, num_layers=num_layers)
    return cast_module(model, device, dtype)


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
    num_frames: int = 9  # the demo's frames (3 latent frames)

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


WanAdapter.demo_spec = TinyWanSpec(num_layers=4, heads=4, head_dim=48, ffn_dim=384, text_dim=32, text_tokens=16,
                                   num_frames=9)
