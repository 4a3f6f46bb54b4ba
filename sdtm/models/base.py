"""What SDTM needs to know of a model family: its blocks, its image-token grid and step per call, its
sub-layers, and a block forward that merges. The plan, the ops, the schedule and the state are shared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class CallInfo:
    """What one transformer call tells SDTM: its timestep, the image-token grid (``frames`` frames of
    rows x columns, frame-major; 1 frame for images), the batch and the device of the image tokens.
    ``timestep * timestep_scale`` is in the scheduler's units (Flux is called with a thousandth of them)."""

    timestep: torch.Tensor | float
    grid_height: int
    grid_width: int
    batch: int
    device: torch.device
    timestep_scale: float = 1.0
    frames: int = 1


@dataclass(frozen=True)
class Preset:
    """A released model of the family in its real shapes (random weights), for ``sdtm macs --config NAME``
    and ``benchmarks/gpu_check.py --model NAME``.

    config: the transformer's config, with ``_class_name`` (``sdtm macs`` reads it, the GPU check builds it).
    steps / batch / dtype: its usual denoising steps, the batch of one transformer call (2: a CFG pair) and
        its dtype on a GPU. gpu_check: the description of the GPU check's smoke model (``--tiny``) when the
        check offers this preset, else None. h100_step_seconds: a rough unmerged second a step on an H100 at
        1024 x 1024 pixels and this batch, for the check's printed estimate only."""

    config: dict
    steps: int = 50
    batch: int = 2
    dtype: str = "float16"
    gpu_check: str | None = None
    h100_step_seconds: float | None = None
    # The GPU check's defaults where the released use would not fit its time budget (video): image side,
    # steps and generated frames (None / 1: 1024 pixels, ``steps``, an image).
    gpu_size: int | None = None
    gpu_steps: int | None = None
    gpu_frames: int = 1


@dataclass(frozen=True)
class SizeRule:
    """Which image sides a pipeline generates at: positive multiples of ``multiple`` (``reason`` says why, in
    a message) up to ``max_side`` pixels (None: any)."""

    multiple: int
    reason: str
    max_side: int | None = None


@dataclass
class DenoisingInputs:
    """A denoising loop over a bare transformer, called as the family's pipeline calls it (random latents
    and prompt embeddings).

    scheduler: the pipeline's kind of scheduler. latents: the starting latents in the scheduler's layout
    (e.g. [B, C, h, w], or [B, N, C] for packed tokens). set_timesteps(steps): start a generation, returns
    the scheduler's timesteps. predict(x, t): the transformer's prediction for latents ``x`` at timestep ``t``
    in the scheduler's layout."""

    scheduler: Any
    latents: torch.Tensor
    set_timesteps: Callable[[int], torch.Tensor]
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def meta_tensor(*shape: int) -> torch.Tensor:
    """An empty tensor of ``shape`` on the meta device (MAC counting: no memory)."""
    return torch.empty(*shape, device="meta")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cast_module(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype``, in eval mode, through ``nn.Module.to``: diffusers' ``ModelMixin.to``
    warns on every dtype cast, even for models that keep no module in float32."""
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval()


class ModelAdapter:
    """One model family. Subclasses set the class attributes and implement ``call_info`` (what SDTM needs at
    run time, first below), and the attributes and methods of the second part below (what the command line,
    the demo, the tests and the benchmarks need: presets, MAC-counting inputs, pipeline classes and call
    conventions, tiny pipelines, benchmark shapes and denoising loops, step-cache facts). A family is then one
    module in sdtm/models/ plus its line in ``sdtm.models.ADAPTERS``.

    transformer_class: the diffusers transformer class name this adapter serves.
    block_forwards: class name of each kind of block SDTM patches (found anywhere in the transformer) ->
        the patched blocks' forward (same signature and outputs as the original).
    cfg_pairs: a batch holds conditional / unconditional pairs (classifier-free guidance in one call), so
        an odd batch turns the random destinations off (SPEC); False for guidance-distilled models.
    """

    name: str = ""
    transformer_class: str = ""
    block_forwards: dict[str, Callable[..., Any]] = {}
    cfg_pairs: bool = True
    # Default switch step (``switch_step=None``): this share of the steps runs the structure phase; None
    # keeps the reference's fixed step 20 (SD3).
    structure_share: float | None = None

    def resolve_config(self, config, num_steps: int):
        """``config`` (an SDTMConfig) with ``switch_step=None`` replaced by this family's default for
        ``num_steps`` steps: 20, or the last step of the first ``structure_share`` of the steps."""
        return config.resolved(num_steps, self.structure_share)

    def matches(self, transformer: torch.nn.Module) -> bool:
        return any(cls.__name__ == self.transformer_class for cls in type(transformer).__mro__)

    def forward_for(self, block: torch.nn.Module) -> Callable[..., Any] | None:
        """SDTM's forward for ``block``'s class (None for modules SDTM does not patch)."""
        for cls in type(block).__mro__:
            if cls.__name__ in self.block_forwards:
                return self.block_forwards[cls.__name__]
        return None

    def blocks(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks to patch, in module order (the order a diffusers transformer calls them); raises
        ValueError for a block variant SDTM cannot run."""
        blocks = [m for m in transformer.modules() if self.forward_for(m) is not None]
        if not blocks:
            kinds = " / ".join(self.block_forwards)
            raise ValueError(f"{type(transformer).__name__} has no {kinds} blocks.")
        for block in blocks:
            self.check_block(block)
        return blocks

    def check_block(self, block: torch.nn.Module) -> None:
        """Raise a ValueError when ``block`` is a variant the forward does not handle."""

    def sublayers(self, block: torch.nn.Module) -> dict[str, str]:
        """The block's sub-layers whose outputs are unmerged and cached, each with its kind: "attn" (merges
        in the structure phase) or "mlp" (merges in both phases)."""
        raise NotImplementedError

    def attention_modules(self, block: torch.nn.Module) -> list[torch.nn.Module]:
        """The block's attention modules (diffusers' attention classes among its children): a hook on one
        that returns stored outputs stops SDTM merging the block's attention."""
        from diffusers.hooks._common import _ATTENTION_CLASSES

        return [m for m in block.children() if isinstance(m, _ATTENTION_CLASSES)]

    def channels(self, transformer: torch.nn.Module) -> int:
        """Width of the image tokens the blocks see."""
        config = transformer.config
        return config.num_attention_heads * config.attention_head_dim

    def call_info(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        raise NotImplementedError

    # ==== what the command line, the demo and the benchmarks need ====================================
    # sdtm/cli/ and benchmarks/ name no family: they iterate over the registry
    # (sdtm.core.families.families()) and ask each adapter through the attributes and methods below.
    # The defaults suit a pipeline with classifier-free guidance that writes images.


    # --- names -----------------------------------------------------------------------------------------
    title: str = ""  # the family in messages and help texts, e.g. "SD3"

    # --- video: frames ------------------------------------------------------------------------------------
    # A video family generates ``frames`` frames (``--frames`` of sdtm macs / generate); its token grids
    # have ``latent_frames(frames)`` frames. Images: 1 frame, and no --frames.
    video: bool = False
    default_frames: int = 1  # the frames of a generation when none are asked (video: the frames users run)
    bench_frames: int = 1  # the frames of sdtm bench e2e and the GPU check's video shapes
    bench_latent: tuple[int, int] = (128, 128)  # sdtm bench e2e's latent (rows, columns): 64 x 64 tokens
    bench_small_latent: tuple[int, int] = (80, 104)  # its unmerged run with as many tokens as ratio 0.5 leaves

    def latent_frames(self, frames: int) -> int:
        """The token grid's frames for ``frames`` generated frames; a ValueError for a count the family's
        pipeline does not generate (images: only 1)."""
        if frames != 1:
            raise ValueError(f"{self.title or self.name} generates images: frames must be 1, got {frames}.")
        return 1

    def preview(self, output: Any) -> Any:
        """One image of a pipeline output for a picture (a video's middle frame; an image itself)."""
        return output

    # --- sdtm macs: counting a config on the meta device ------------------------------------------------
    presets: dict[str, Preset] = {}
    # The transformer classes a config.json of the family may name (the first: the class built).
    config_classes: tuple[str, ...] = ()
    # Keys that mark a config without ``_class_name`` as the family's.
    config_signature_keys: tuple[str, ...] = ()
    # The config keys read from a config.json (others are dropped): ints must be positive, the nullable
    # ones may also be null; the other keys are checked by ``check_config``.
    config_int_keys: tuple[str, ...] = ()
    config_nullable_int_keys: tuple[str, ...] = ()
    config_other_keys: tuple[str, ...] = ()
    token_side_name: str = "patch"  # what a token's side is, in messages: "patch" (the config's patch_size)
    feed_forward: str = "ff"  # the blocks' feed-forward sub-module (merges in both phases)

    def owns_config(self, config: dict) -> bool:
        """Whether ``config`` (a transformer config.json's object) is the family's: its ``_class_name`` is
        one of ``config_classes``, or it has none and one of ``config_signature_keys``."""
        name = config.get("_class_name")
        if name is None:
            return any(key in config for key in self.config_signature_keys)
        return name in self.config_classes

    def check_config(self, config: dict, path: str) -> None:
        """Raise a ValueError naming ``path`` and the key for a value of ``config_other_keys`` the
        transformer cannot take, or for widths that do not fit together."""

    def text_tokens(self, config: dict) -> int:
        """Text tokens per prompt of the family's pipeline for a model of ``config``."""
        raise NotImplementedError

    def token_side(self, config: dict) -> int:
        """Latent pixels a token spans on each side (the config's patch size by default)."""
        return config.get("patch_size", 2)

    def token_phrase(self, side: int) -> str:
        """A token's side in a size message: "patch 2"."""
        return f"patch {side}"

    def max_token_grid(self, config: dict) -> int | None:
        """The largest token grid side the positional table covers (None: any)."""
        return None

    def meta_inputs(self, model: torch.nn.Module, batch: int, grid_h: int, grid_w: int, text_tokens: int,
                    frames: int = 1) -> dict:
        """Keyword arguments of one forward of ``model`` (built on the meta device) on ``frames`` frames
        (images: 1) of ``grid_h`` x ``grid_w`` image tokens and ``text_tokens`` text tokens, all meta
        tensors."""
        raise NotImplementedError

    def block_inputs(self, model: torch.nn.Module, block: torch.nn.Module, batch: int, tokens: int,
                     text_tokens: int, make: Callable[..., torch.Tensor] = meta_tensor) -> dict:
        """Keyword arguments of one call of ``block`` on ``tokens`` image tokens [batch, tokens, C] (and
        ``text_tokens`` text tokens), each tensor made by ``make(*shape)`` (meta tensors by default)."""
        raise NotImplementedError

    def block_shape(self, block: torch.nn.Module) -> tuple:
        """A key equal for blocks of one shape (they cost the same)."""
        return (type(block).__name__,)

    # --- sdtm generate: a diffusers folder ----------------------------------------------------------------
    pipeline_classes: tuple[str, ...] = ()  # the pipeline classes a model_index.json may name
    text_components: tuple[str, ...] = ()  # the components that embed the prompts
    default_guidance: float | None = None  # --guidance when not given
    # The guidance is an input of the transformer (guidance-distilled), not classifier-free guidance.
    distilled_guidance: bool = False
    output_suffix: str = ".png"  # the file of one generated output
    pixel_multiple: int = 1  # the pipeline's own rule on the pixel sides, besides the token geometry

    def guidance_refusal(self, config: dict) -> str | None:
        """Why a model of transformer ``config`` takes no guidance (then none is passed), or None."""
        return None

    def generate_call_kwargs(self, guidance: float | None, frames: int = 1) -> dict:
        """The pipeline call's arguments besides prompts, size, steps and generators: the guidance, the
        frames of a video family, and the family's switches (no negative prompt is passed to any family)."""
        return {} if guidance is None else {"guidance_scale": guidance}

    def vae_scale_of_config(self, vae: dict) -> int | None:
        """The spatial down-sampling of a VAE from its config.json: ``2 ** (len(block_out_channels) - 1)``
        (None when the config does not say)."""
        channels = vae.get("block_out_channels")
        if not isinstance(channels, list) or not channels:
            return None
        return 2 ** (len(channels) - 1)

    def pipeline_output(self, result: Any) -> Any:
        """What a pipeline call returns, taken from its result object: ``result.images`` (a video
        pipeline's ``result.frames``); a tensor with ``output_type="latent"``."""
        return result.images

    def outputs(self, result: Any) -> list:
        """The outputs of a pipeline call's result, one per prompt."""
        return list(self.pipeline_output(result))

    def save_output(self, output: Any, file: Any) -> None:
        """Write one output (a PIL image here) to the binary file object ``file``."""
        output.save(file, format="PNG")

    # --- sdtm demo and the tests: tiny pipelines built from config, random weights --------------------------
    demo_title: str = ""  # e.g. "tiny SD3 pipeline"
    demo_spec: Any = None  # the shape of the demo's tiny pipeline (the family's tiny spec)

    def tiny_pipeline(self, spec: Any = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
        """The family's pipeline with a tiny transformer of ``spec`` (None: the family's smallest) and a tiny
        VAE that does not down-sample, no text encoders; call it with ``tiny_call_kwargs``."""
        raise NotImplementedError

    def tiny_call_kwargs(self, spec: Any, batch: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
        """The tiny pipeline's call arguments besides size, steps, generator and output type: random prompt
        embeddings for ``batch`` prompts and the family's guidance and switches."""
        raise NotImplementedError

    def tiny_size_rule(self, spec: Any) -> SizeRule:
        """The image sides the tiny pipeline of ``spec`` generates at (its VAE does not down-sample)."""
        return SizeRule(2, "a token spans 2 x 2 pixels")

    demo_size: int = 96  # the demo's default image side in pixels

    def tiny_frames(self, spec: Any) -> int:
        """The frames the tiny pipeline of ``spec`` generates (images: 1)."""
        return 1

    def tiny_tokens(self, spec: Any, size: int) -> int:
        """Image tokens of one transformer call of the tiny pipeline at ``size`` x ``size`` pixels (its VAE
        does not down-sample: (size / 2)^2)."""
        return (size // 2) ** 2

    def vae_scale(self, pipe: Any) -> int:
        """The spatial down-sampling of ``pipe``'s VAE (pixels a latent pixel spans on a side)."""
        return pipe.vae_scale_factor

    def describe_blocks(self, spec: Any) -> str:
        """The tiny transformer's blocks in words, e.g. "4 blocks"."""
        return f"{spec.num_layers} blocks"

    def demo_switch_step(self, steps: int) -> int | None:
        """The demo's switch step for ``steps`` steps (None: the family's default)."""
        return None

    # --- sdtm bench e2e, the GPU check: transformers of the family's shape, random weights ------------------
    bench_title: str = ""  # e.g. "SD3-shaped transformer"
    bench_help: str = ""  # the shrunk transformer in a help text
    bench_text_tokens: int = 0  # text tokens of the family's pipeline
    bench_layers: int = 2  # blocks of the shrunk transformer
    bench_heads: int = 1  # its heads
    bench_head_dim: int = 64  # the width of a head (C = heads x head width)

    def bench_transformer(self, num_layers: int | None = None, heads: int | None = None, sample_size: int = 128,
                          seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The family's transformer widths with ``num_layers`` blocks (default ``bench_layers``) of ``heads``
        heads (default ``bench_heads``), random weights (seeded), eval mode; ``sample_size``: the largest
        latent side it must take where a positional table limits it."""
        raise NotImplementedError

    def tiny_bench_transformer(self, latent: int, seed: int = 0, device="cpu",
                               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The GPU check's smoke model (``--tiny``): the family's widths shrunk to about 2 blocks for latents
        of side ``latent``."""
        raise NotImplementedError

    def denoising_inputs(self, transformer: torch.nn.Module, latent_h: int, latent_w: int, batch: int,
                         text_tokens: int, generator: torch.Generator, frames: int = 1) -> DenoisingInputs:
        """A denoising loop over ``transformer`` on random latents of ``latent_h`` x ``latent_w`` (the VAE's
        latent; ``frames`` latent frames for video) and random prompt embeddings of ``text_tokens`` tokens,
        drawn from ``generator``."""
        raise NotImplementedError

    # The host benchmark (``sdtm bench host``) shrinks one family's topology: the first family with one.
    host_topology: str | None = None  # e.g. "SD3-medium topology", in its report

    def host_transformer(self, setting: Any) -> torch.nn.Module:
        """The host benchmark's model: ``host_topology`` with ``setting.layers`` blocks of ``setting.heads``
        heads of width ``setting.head_dim``, latents of side ``2 * setting.grid``, text tokens
        ``setting.joint_attention_dim`` wide and a pooled vector ``setting.pooled_projection_dim`` wide,
        random weights (``setting.seed``), float32, eval mode."""
        raise NotImplementedError

    # --- step caches (sdtm/cli/caches.py) ---------------------------------------------------------------------
    # Cache name -> why it does not run on this family (the caches not named run).
    cache_refusals: dict[str, str] = {}
    # Sub-modules of a block that every real forward of the block calls, in order of preference: a hook on
    # the first one a block has counts the block's computed calls.
    cache_witnesses: tuple[str, ...] = ()
    # TaylorSeer caches every block but the last (whose outputs it cannot record).
    taylorseer_skips_last_block: bool = False

    def cache_dit_target(self, transformer: torch.nn.Module) -> Any:
        """What ``cache_dit.enable_cache`` is given when cache-dit has no adapter of its own for the
        transformer's class."""
        raise ValueError(f"cache-dit has no adapter for {type(transformer).__name__}.")

    def describe_switch_step(self) -> str:
        """The default switch step in words, for help texts."""
        if self.structure_share is None:
            return "20"
        return f"the last step of the first {self.structure_share:.0%} of the steps"


def argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    """A call's argument given by keyword or by position (None when absent)."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def latent_grid(transformer: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[int, int]:
    """Token grid of an NCHW latent cut into ``config.patch_size`` patches."""
    patch = transformer.config.patch_size
    return hidden_states.shape[-2] // patch, hidden_states.shape[-1] // patch
