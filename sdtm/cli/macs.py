"""Theoretical MACs of a whole SDTM schedule, counted on the meta device (no weights, no memory).

Every block's multiply-accumulates are counted once per token count with torch's FlopCounterMode on a
meta-device copy of the block, split into the feed-forward and the rest (the attention side: what merges
with the attention in the structure phase); the schedule (sdtm.core.schedule) then says how many image tokens
each side sees at each step. The plan's own matmul (IDM's source x destination cosine similarities) is
counted too; SSM's window scores are elementwise work of O(W K^2 C) and are not.

Three model families, each described by a ``_Family`` entry (its diffusers class, its config keys, how
to build meta inputs for the model and for one block). The blocks, their order, the kinds of their
sub-layers and the default switch step are the ones SDTM's model adapter (sdtm.models) uses at run time:

- SD3 / SD3.5 (``SD3Transformer2DModel``): joint blocks; the attention side holds the joint attention
  (SD3.5's second attention too) and the whole text stream, which never merges.
- PixArt-alpha / Sigma (``PixArtTransformer2DModel``, or the ``Transformer2DModel`` with
  ``norm_type="ada_norm_single"`` that older PixArt folders name): the attention side holds the
  self-attention and the cross-attention (image queries and outputs, and the text keys and values, which
  do not depend on the image token count).
- Flux.1 (``FluxTransformer2DModel``): FluxPipeline packs 2x2 latent pixels into one token, so the token
  grid is the latent's halved (the config's patch_size of 1 notwithstanding). The double-stream blocks
  (FLUX.1: 19) are counted like SD3's joint blocks (the image feed-forward ``ff`` merges in both phases,
  everything else is the attention side); then come the single-stream blocks (FLUX.1: 38), whose whole
  work is of the attention kind: they run on text + merged image tokens in the structure phase and
  unmerged in the detail phase, where they compute no plan. SDTM's layer index runs over both kinds,
  double-stream first.

``switch_step=None`` takes the family's default for the step count (``ModelAdapter.resolve_config``): 20
for SD3, the first 40% of the steps for PixArt and Flux.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core.config import SDTMConfig
from ..core.schedule import BlockAction, BlockMode, Phase, action_for_sublayers, block_action, merged_tokens

TEXT_TOKENS = 333  # SD3: 77 CLIP + 256 T5 tokens
PIXART_SIGMA_TEXT_TOKENS = 300  # PixArt-Sigma's T5 sequence length
PIXART_ALPHA_TEXT_TOKENS = 120  # PixArt-alpha's T5 sequence length
FLUX_DEV_TEXT_TOKENS = 512  # FluxPipeline's max_sequence_length for FLUX.1-dev
FLUX_SCHNELL_TEXT_TOKENS = 256  # and for FLUX.1-schnell
FLUX_PACKING = 2  # FluxPipeline packs 2x2 latent pixels into one token
VAE_SCALE = 8

SD3_CLASS = "SD3Transformer2DModel"
PIXART_CLASS = "PixArtTransformer2DModel"
FLUX_CLASS = "FluxTransformer2DModel"

_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)
# PixArt-XL-2 at 1024 pixels: 28 blocks of width 16 x 72 = 1152, T5-XXL captions (4096 wide).
_PIXART_COMMON = dict(_class_name=PIXART_CLASS, sample_size=128, patch_size=2, in_channels=4, out_channels=8,
                      num_layers=28, num_attention_heads=16, attention_head_dim=72, cross_attention_dim=1152,
                      caption_channels=4096, activation_fn="gelu-approximate", attention_bias=True,
                      norm_type="ada_norm_single", num_embeds_ada_norm=1000, norm_elementwise_affine=False,
                      norm_eps=1e-6)
# FLUX.1 at any size: 19 double-stream and 38 single-stream blocks of width 24 x 128 = 3072, 64 channels a
# packed token (16 latent channels x 2 x 2), T5-XXL (4096) and CLIP pooled (768) text.
_FLUX_COMMON = dict(_class_name=FLUX_CLASS, patch_size=1, in_channels=64, out_channels=None, num_layers=19,
                    num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                    pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
PRESETS: dict[str, dict] = {
    "sd3-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_SD3_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
    # PixArt-Sigma-XL-2-1024-MS: no resolution / aspect-ratio conditioning, 300 text tokens.
    "pixart-sigma": dict(_PIXART_COMMON, interpolation_scale=2, use_additional_conditions=False),
    # PixArt-XL-2-1024-MS (alpha): resolution and aspect-ratio conditioning, 120 text tokens.
    "pixart-alpha": dict(_PIXART_COMMON, interpolation_scale=2, use_additional_conditions=True),
    # FLUX.1-dev: guidance-distilled (a guidance embedding), 512 text tokens.
    "flux-dev": dict(_FLUX_COMMON, guidance_embeds=True),
    # FLUX.1-schnell: timestep-distilled, no guidance embedding, 256 text tokens.
    "flux-schnell": dict(_FLUX_COMMON, guidance_embeds=False),
}


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


# --- SD3 -------------------------------------------------------------------------------------------------

def _sd3_check_widths(config: dict, path: str) -> None:
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    caption_dim = config.get("caption_projection_dim", 1152)
    if caption_dim != heads * head_dim:
        raise ValueError(f"{path}: caption_projection_dim ({caption_dim}) must equal num_attention_heads x "
                         f"attention_head_dim ({heads} x {head_dim} = {heads * head_dim}), the blocks' width.")


def _sd3_model_inputs(model, batch: int, grid_h: int, grid_w: int, text_tokens: int) -> dict:
    c = model.config
    latent_h, latent_w = grid_h * c.patch_size, grid_w * c.patch_size
    return dict(hidden_states=_meta(batch, c.in_channels, latent_h, latent_w), timestep=_meta(batch),
                encoder_hidden_states=_meta(batch, text_tokens, c.joint_attention_dim),
                pooled_projections=_meta(batch, c.pooled_projection_dim))


def _sd3_block_inputs(model, block, batch: int, tokens: int, text_tokens: int) -> dict:
    c = model.inner_dim
    return dict(hidden_states=_meta(batch, tokens, c), encoder_hidden_states=_meta(batch, text_tokens, c),
                temb=_meta(batch, c))


# --- PixArt ----------------------------------------------------------------------------------------------

def _pixart_additional_conditions(config: dict) -> bool:
    """Whether the model embeds resolution and aspect ratio (diffusers: unset means sample_size == 128)."""
    value = config.get("use_additional_conditions")
    return config.get("sample_size", 128) == 128 if value is None else bool(value)


def _pixart_check_widths(config: dict, path: str) -> None:
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    width = heads * head_dim
    cross_dim = config.get("cross_attention_dim", 1152)
    if config.get("caption_channels") is not None and cross_dim is not None and cross_dim != width:
        raise ValueError(f"{path}: cross_attention_dim ({cross_dim}) must equal num_attention_heads x "
                         f"attention_head_dim ({heads} x {head_dim} = {width}), the width the caption "
                         "projection gives the text tokens.")
    if _pixart_additional_conditions(config) and width % 3:
        raise ValueError(f"{path}: with resolution and aspect-ratio conditioning (use_additional_conditions, "
                         f"or sample_size 128 without it) the width ({heads} x {head_dim} = {width}) must be a "
                         "multiple of 3.")


def _pixart_text_tokens(config: dict) -> int:
    """PixArt-alpha's 120 T5 tokens for a model conditioned on resolution and aspect ratio (alpha at 1024
    pixels), PixArt-Sigma's 300 otherwise."""
    return PIXART_ALPHA_TEXT_TOKENS if _pixart_additional_conditions(config) else PIXART_SIGMA_TEXT_TOKENS


def _pixart_text_width(model) -> int:
    """Width of the text tokens the blocks' cross-attention reads (after the caption projection)."""
    if model.caption_projection is not None:
        return model.inner_dim
    return model.config.cross_attention_dim or model.inner_dim


def _pixart_model_inputs(model, batch: int, grid_h: int, grid_w: int, text_tokens: int) -> dict:
    c = model.config
    latent_h, latent_w = grid_h * c.patch_size, grid_w * c.patch_size
    caption = c.caption_channels if model.caption_projection is not None else _pixart_text_width(model)
    conditions = {"resolution": None, "aspect_ratio": None}
    if model.use_additional_conditions:
        conditions = {"resolution": _meta(batch, 2), "aspect_ratio": _meta(batch, 1)}
    return dict(hidden_states=_meta(batch, c.in_channels, latent_h, latent_w), timestep=_meta(batch),
                encoder_hidden_states=_meta(batch, text_tokens, caption), added_cond_kwargs=conditions)


def _pixart_block_inputs(model, block, batch: int, tokens: int, text_tokens: int) -> dict:
    c = model.inner_dim
    return dict(hidden_states=_meta(batch, tokens, c),
                encoder_hidden_states=_meta(batch, text_tokens, _pixart_text_width(model)),
                timestep=_meta(batch, 6 * c))  # adaln_single's output: six modulations per block


# --- Flux ------------------------------------------------------------------------------------------------

def _flux_check_widths(config: dict, path: str) -> None:
    head_dim = config.get("attention_head_dim", 128)
    axes = config.get("axes_dims_rope", (16, 56, 56))
    if len(axes) != 3 or sum(axes) != head_dim:
        raise ValueError(f"{path}: axes_dims_rope ({list(axes)}) must be three rotary widths, one per position "
                         f"id column, summing to attention_head_dim ({head_dim}).")


def _flux_text_tokens(config: dict) -> int:
    """FLUX.1-dev's 512 T5 tokens for a model with a guidance embedding, FLUX.1-schnell's 256 otherwise."""
    return FLUX_DEV_TEXT_TOKENS if config.get("guidance_embeds", False) else FLUX_SCHNELL_TEXT_TOKENS


def _flux_model_inputs(model, batch: int, grid_h: int, grid_w: int, text_tokens: int) -> dict:
    c = model.config
    n = grid_h * grid_w
    inputs = dict(hidden_states=_meta(batch, n, c.in_channels), timestep=_meta(batch),
                  encoder_hidden_states=_meta(batch, text_tokens, c.joint_attention_dim),
                  pooled_projections=_meta(batch, c.pooled_projection_dim),
                  img_ids=_meta(n, 3), txt_ids=_meta(text_tokens, 3))
    if c.guidance_embeds:
        inputs["guidance"] = _meta(batch)
    return inputs


def _flux_block_inputs(model, block, batch: int, tokens: int, text_tokens: int) -> dict:
    """Either block kind takes the image and text streams apart; a single-stream block joins them into
    one sequence of text + image tokens. The rotary tables cover text and image rows."""
    c, head_dim = model.inner_dim, model.config.attention_head_dim
    rotary = (_meta(text_tokens + tokens, head_dim), _meta(text_tokens + tokens, head_dim))
    return dict(hidden_states=_meta(batch, tokens, c), encoder_hidden_states=_meta(batch, text_tokens, c),
                temb=_meta(batch, c), image_rotary_emb=rotary)


@dataclass(frozen=True)
class _Family:
    """What counting needs to know of one model family.

    class_name: the diffusers transformer class built on the meta device.
    int_keys / nullable_int_keys / other_keys: the config keys read from a config.json (others are
        dropped); ints must be positive, nullable ones may also be null.
    max_grid: the positional table's side (tokens) when the config names no ``pos_embed_max_size``
        (None: any grid, the sin-cos table is computed for each input size).
    token_side: latent pixels a token spans on each side, from the config (patch_size; Flux: the
        pipeline's 2x2 packing); ``token_side_name`` says which, in error messages.
    """

    class_name: str
    int_keys: tuple[str, ...]
    nullable_int_keys: tuple[str, ...]
    other_keys: tuple[str, ...]
    max_grid: int | None
    check_widths: Callable[[dict, str], None]
    text_tokens: Callable[[dict], int]
    model_inputs: Callable[..., dict]  # (model, batch, grid_h, grid_w, text_tokens) -> forward kwargs
    block_inputs: Callable[..., dict]  # (model, block, batch, image tokens, text_tokens) -> block kwargs
    block_shape: Callable[[torch.nn.Module], tuple]  # blocks of one shape cost the same
    feed_forward: str = "ff"  # the block's feed-forward submodule
    token_side: Callable[[dict], int] = lambda config: config.get("patch_size", 2)
    token_side_name: str = "patch"

    @property
    def keys(self) -> tuple[str, ...]:
        return self.int_keys + self.other_keys


_SD3 = _Family(
    class_name=SD3_CLASS,
    int_keys=("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
              "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
              "pos_embed_max_size"),
    # diffusers accepts null for these: out_channels then follows in_channels, and without a positional
    # table size the sin-cos table is computed for each input size.
    nullable_int_keys=("out_channels", "pos_embed_max_size"),
    other_keys=("dual_attention_layers", "qk_norm"),
    max_grid=96,
    check_widths=_sd3_check_widths,
    text_tokens=lambda config: TEXT_TOKENS,
    model_inputs=_sd3_model_inputs,
    block_inputs=_sd3_block_inputs,
    block_shape=lambda block: (block.use_dual_attention, block.context_pre_only),
)
_PIXART = _Family(
    class_name=PIXART_CLASS,
    int_keys=("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
              "out_channels", "cross_attention_dim", "caption_channels", "num_embeds_ada_norm", "norm_num_groups"),
    # out_channels: null follows in_channels; cross_attention_dim: null leaves out the cross-attention;
    # caption_channels: null takes text tokens already cross_attention_dim wide.
    nullable_int_keys=("out_channels", "cross_attention_dim", "caption_channels"),
    other_keys=("interpolation_scale", "use_additional_conditions", "norm_type", "activation_fn", "attention_bias",
                "upcast_attention", "norm_elementwise_affine", "norm_eps", "dropout", "attention_type"),
    max_grid=None,
    check_widths=_pixart_check_widths,
    text_tokens=_pixart_text_tokens,
    model_inputs=_pixart_model_inputs,
    block_inputs=_pixart_block_inputs,
    block_shape=lambda block: (block.attn2 is None, block.only_cross_attention),
)
_FLUX = _Family(
    class_name=FLUX_CLASS,
    int_keys=("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers", "attention_head_dim",
              "num_attention_heads", "joint_attention_dim", "pooled_projection_dim"),
    nullable_int_keys=("out_channels",),  # null: out_channels follows in_channels
    other_keys=("guidance_embeds", "axes_dims_rope"),
    max_grid=None,  # rotary positions from the ids: any grid
    check_widths=_flux_check_widths,
    text_tokens=_flux_text_tokens,
    model_inputs=_flux_model_inputs,
    block_inputs=_flux_block_inputs,
    block_shape=lambda block: (type(block).__name__,),  # double- or single-stream
    token_side=lambda config: FLUX_PACKING,
    token_side_name="packing",
)
_FAMILIES = {family.class_name: family for family in (_SD3, _PIXART, _FLUX)}
_CLASS_LIST = f"{SD3_CLASS}, {PIXART_CLASS} or {FLUX_CLASS}"


def _adapter(family: _Family):
    """SDTM's model adapter of ``family`` (its blocks, sub-layer kinds and default switch step)."""
    from ..models import ADAPTERS

    return next(adapter for adapter in ADAPTERS if adapter.transformer_class == family.class_name)


def family_of(config: dict) -> _Family:
    """The family of a transformer config: its ``_class_name``; without one, Flux for a config with Flux's
    keys (``num_single_layers``, ``axes_dims_rope``, ``guidance_embeds``), PixArt for one with PixArt's
    (``norm_type``, ``caption_channels``, ``cross_attention_dim``), SD3 otherwise."""
    name = config.get("_class_name")
    if name in _FAMILIES:
        return _FAMILIES[name]
    if name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_single":
        return _PIXART
    if name is None:
        if any(k in config for k in ("num_single_layers", "axes_dims_rope", "guidance_embeds")):
            return _FLUX
        pixart_keys = ("norm_type", "caption_channels", "cross_attention_dim")
        return _PIXART if any(k in config for k in pixart_keys) else _SD3
    raise ValueError(f"a {name!r} config is not an {_CLASS_LIST} one.")


def default_text_tokens(config: dict) -> int:
    """Text tokens per prompt when none are given: SD3's 333; PixArt-alpha's 120 for a PixArt model
    conditioned on resolution and aspect ratio (alpha at 1024 pixels), PixArt-Sigma's 300 otherwise;
    FLUX.1-dev's 512 for a Flux model with a guidance embedding, FLUX.1-schnell's 256 otherwise."""
    return family_of(config).text_tokens(config)


def _read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError when it cannot be read or holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}.")
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The activations diffusers' FeedForward builds.
_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu", "geglu-approximate", "swiglu", "linear-silu")


def _check_key(family: _Family, path: str, key: str, value) -> None:
    """Raise a ValueError naming ``path`` and ``key`` when ``value`` is not what the transformer expects."""
    if key in family.int_keys:
        if value is None and key in family.nullable_int_keys:
            return
        if not _is_int(value) or value < 1:
            expected = "a positive int or null" if key in family.nullable_int_keys else "a positive int"
            raise ValueError(f"{path}: {key} must be {expected}, got {value!r}.")
    elif key == "dual_attention_layers":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
            raise ValueError(f"{path}: dual_attention_layers must be a list of layer indices (ints >= 0), "
                             f"got {value!r}.")
    elif key == "qk_norm" and value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: qk_norm must be null or a string such as \"rms_norm\", got {value!r}.")
    elif key == "norm_type" and value != "ada_norm_single":
        raise ValueError(f"{path}: norm_type must be \"ada_norm_single\" (PixArt's), got {value!r}.")
    elif key == "interpolation_scale" and value is not None and (
            not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{path}: interpolation_scale must be a positive number or null, got {value!r}.")
    elif key == "use_additional_conditions" and value is not None and not isinstance(value, bool):
        raise ValueError(f"{path}: {key} must be true, false or null, got {value!r}.")
    elif key == "guidance_embeds" and not isinstance(value, bool):
        raise ValueError(f"{path}: guidance_embeds must be true or false, got {value!r}.")
    elif key == "axes_dims_rope" and (not isinstance(value, (list, tuple)) or not value
                                      or not all(_is_int(v) and v > 0 and v % 2 == 0 for v in value)):
        raise ValueError(f"{path}: axes_dims_rope must be a list of positive even ints (rotary widths), "
                         f"got {value!r}.")
    elif key == "activation_fn" and value not in _ACTIVATIONS:
        raise ValueError(f"{path}: activation_fn must be one of {', '.join(_ACTIVATIONS)} (diffusers' feed-forward "
                         f"activations), got {value!r}.")


def validate_config(raw: dict, path: str) -> dict:
    """The transformer keys of the config object ``raw`` read from ``path`` (lists as tuples) with the
    ``_class_name`` of its family, checked; ValueError naming the file and the key otherwise."""
    try:
        family = family_of(raw)
    except ValueError:
        raise ValueError(f"{path} is a {raw['_class_name']!r} config, not an {_CLASS_LIST} one; pass the "
                         "transformer's config.json or a diffusers SD3, PixArt or Flux folder.") from None
    if "num_layers" not in raw:
        raise ValueError(f"{path} has no num_layers; is it a {family.class_name} config.json?")
    config = {k: v for k, v in raw.items() if k in family.keys}
    for key, value in config.items():
        _check_key(family, path, key, value)
    family.check_widths(config, path)
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return {"_class_name": family.class_name, **config}


def build_meta_transformer(config: dict) -> torch.nn.Module:
    """The transformer of ``config`` (its family's diffusers class; keys starting with ``_`` left out) on
    the meta device (no weights, no memory); ValueError when diffusers rejects the config."""
    import diffusers

    family = family_of(config)
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return getattr(diffusers, family.class_name)(**kwargs)
    except (TypeError, ValueError, NotImplementedError, ZeroDivisionError) as error:
        raise ValueError(f"{family.class_name} cannot be built from this config: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def config_file(name_or_path: str) -> str:
    """The transformer config file that ``--config name_or_path`` (not a preset) names."""
    path = name_or_path
    if os.path.isdir(path):
        candidates = [os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config file.")
    return path


def load_config(name_or_path: str) -> dict:
    """A preset name, a transformer ``config.json``, or a diffusers folder (its transformer/config.json),
    checked: ValueError naming the file, the key and what is expected. The model is built and run once
    on one image token on the meta device, so that widths that do not fit together fail here."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    path = config_file(name_or_path)
    config = validate_config(_read_json_object(path), path)
    try:
        meta = _MetaModel(config, batch=1, text_tokens=1)
        meta.forward(1, 1)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    except RuntimeError as error:
        raise ValueError(f"{path}: {family_of(config).class_name} cannot run this config: "
                         f"{_first_line(error)}") from None
    return config


def load_vae_scale(name_or_path: str) -> int:
    """The latent down-sampling factor for ``--config name_or_path``: ``2 ** (len(block_out_channels) - 1)``
    of a diffusers folder's vae/config.json; 8 (SD3's, PixArt's and Flux's) for presets and bare transformer
    config files."""
    if name_or_path in PRESETS or not os.path.isdir(name_or_path):
        return VAE_SCALE
    if not os.path.isfile(os.path.join(name_or_path, "transformer", "config.json")):
        return VAE_SCALE  # a transformer folder (config.json at its top): no VAE to read
    path = os.path.join(name_or_path, "vae", "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} has no vae/config.json to read the latent factor from; pass "
                         "its transformer/config.json instead to assume a factor of 8.")
    channels = _read_json_object(path).get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError(f"{path}: block_out_channels must be a non-empty list (the latent factor is "
                         f"2 ** (len(block_out_channels) - 1)), got {channels!r}.")
    return 2 ** (len(channels) - 1)


@dataclass
class StepMacs:
    """One denoising step: mean tokens per block call and MACs without / with SDTM."""

    step: int
    phase: str
    attn_tokens: float
    mlp_tokens: float
    baseline_macs: int
    sdtm_macs: int


@dataclass
class MacReport:
    """Totals over all steps (MACs, batch included) and their breakdown."""

    config: dict
    height: int
    width: int
    grid: tuple[int, int]
    steps: int
    batch: int
    baseline_macs: int
    sdtm_macs: int
    plan_macs: int
    per_step: list[StepMacs] = field(default_factory=list)
    phases: dict = field(default_factory=dict)
    vae_scale: int = VAE_SCALE
    text_tokens: int = TEXT_TOKENS
    model: str = SD3_CLASS
    switch_step: int | None = None  # the last structure-phase step the count used (the family's by default)

    @property
    def mac_ratio(self) -> float:
        return self.baseline_macs / self.sdtm_macs

    def to_json(self) -> dict:
        out = asdict(self)
        out["mac_ratio"] = self.mac_ratio
        return out


class _MetaModel:
    """A meta-device transformer whose blocks are counted once per image token count.

    ``blocks`` are the blocks SDTM patches, in the order the transformer calls them (the order of SDTM's
    layer index); ``kinds`` the kinds of each block's sub-layers ("attn", "mlp")."""

    def __init__(self, config: dict, batch: int, text_tokens: int):
        self.family = family_of(config)
        self.model = build_meta_transformer(config)
        adapter = _adapter(self.family)
        self.blocks = adapter.blocks(self.model)
        self.kinds = [frozenset(adapter.sublayers(block).values()) for block in self.blocks]
        self.batch, self.text_tokens = batch, text_tokens
        self.channels = self.model.inner_dim

    def forward(self, grid_h: int, grid_w: int) -> FlopCounterMode:
        """The FLOP counter of one forward on a ``grid_h`` x ``grid_w`` grid of image tokens."""
        inputs = self.family.model_inputs(self.model, self.batch, grid_h, grid_w, self.text_tokens)
        with FlopCounterMode(display=False) as counter:
            self.model(**inputs)
        return counter

    def outside_blocks(self, grid_h: int, grid_w: int) -> int:
        """MACs of one forward outside the blocks (embeddings, output projection)."""
        counter = self.forward(grid_h, grid_w)
        ids = {id(block) for block in self.blocks}
        # Counter keys are module paths under the model's class name, e.g.
        # "FluxTransformer2DModel.single_transformer_blocks.3"; the leading dot keeps
        # "transformer_blocks.3" from matching "single_transformer_blocks.3".
        names = tuple("." + name for name, module in self.model.named_modules() if id(module) in ids)
        blocks = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith(names))
        return (counter.get_total_flops() - blocks) // 2

    def block(self, layer: int, tokens: int) -> tuple[int, int]:
        """(MACs of everything but the feed-forward, MACs of the feed-forward) of block ``layer`` on
        ``tokens`` image tokens."""
        # Blocks of one shape cost the same: count the first block of each shape only.
        shape = self.family.block_shape(self.blocks[layer])
        first = next(i for i, other in enumerate(self.blocks) if self.family.block_shape(other) == shape)
        return self._count(first, tokens)

    @functools.lru_cache(maxsize=None)
    def _count(self, layer: int, tokens: int) -> tuple[int, int]:
        inputs = self.family.block_inputs(self.model, self.blocks[layer], self.batch, tokens, self.text_tokens)
        with FlopCounterMode(display=False) as counter:
            self.blocks[layer](**inputs)
        name = self.family.feed_forward
        counts = counter.get_flop_counts()
        ff = next((sum(v.values()) for k, v in counts.items() if k.endswith("." + name) or k == name), 0)
        return (counter.get_total_flops() - ff) // 2, ff // 2


def _token_grid(config: dict, height: int, width: int, vae_scale: int) -> tuple[int, int]:
    """The image token grid (rows, columns) of ``height`` x ``width`` pixels; ValueError when the size does
    not divide into tokens or the grid exceeds the model's positional table."""
    family = family_of(config)
    patch = family.token_side(config)
    if height % (vae_scale * patch) or width % (vae_scale * patch):
        raise ValueError(f"height and width must be multiples of {vae_scale * patch} (VAE factor {vae_scale} x "
                         f"{family.token_side_name} {patch}), got {height}x{width}.")
    grid_h, grid_w = height // (vae_scale * patch), width // (vae_scale * patch)
    max_grid = config.get("pos_embed_max_size", family.max_grid)
    if max_grid is not None and max(grid_h, grid_w) > max_grid:
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid, larger than the model's "
                         f"positional table ({max_grid}); use at most {max_grid * vae_scale * patch} pixels a side.")
    return grid_h, grid_w


def schedule_macs(config: dict, height: int, width: int, steps: int, batch: int = 2,
                  sdtm: SDTMConfig | None = None, text_tokens: int | None = None,
                  vae_scale: int = VAE_SCALE) -> MacReport:
    """MACs of ``steps`` transformer calls at ``height`` x ``width`` pixels (latents ``vae_scale`` times
    smaller), without and with ``sdtm`` (default: SDTMConfig with the family's default switch step);
    a ``switch_step`` of None is the family's default for ``steps`` steps (20 for SD3, the first 40% of
    the steps for PixArt and Flux); ``text_tokens`` None: the family's default (``default_text_tokens``)."""
    family = family_of(config)
    if text_tokens is None:
        text_tokens = family.text_tokens(config)
    if min(height, width, steps, batch, text_tokens, vae_scale) <= 0:
        raise ValueError("height, width, steps, batch, text_tokens and vae_scale must be positive.")
    sdtm = _adapter(family).resolve_config(sdtm if sdtm is not None else SDTMConfig(switch_step=None), steps)
    grid = _token_grid(config, height, width, vae_scale)
    meta = _MetaModel(config, batch, text_tokens)
    report = MacReport(config=config, height=height, width=width, grid=grid, steps=steps, batch=batch,
                       baseline_macs=0, sdtm_macs=0, plan_macs=0, vae_scale=vae_scale, text_tokens=text_tokens,
                       model=family.class_name, switch_step=sdtm.switch_step)
    try:
        _count_schedule(meta, report, sdtm)
    except RuntimeError as error:  # e.g. a meta tensor too large for int64 sizes
        raise ValueError(f"cannot count the MACs of {grid[0] * grid[1]} image and {text_tokens} text tokens at "
                         f"batch {batch}: {_first_line(error)}; use fewer tokens or a smaller batch.") from None
    return report


def _tokens_and_plan(action: BlockAction, n: int, k: int, windows: int, batch_channels: int) -> tuple[int, int, int]:
    """(attention tokens, feed-forward tokens, plan matmul MACs) of one block call under ``action`` (the
    block's own, after ``action_for_sublayers``) on ``n`` image tokens in ``windows`` windows of ``k``
    tokens (``batch_channels``: batch x width). IDM's plan compares the ``windows * (k - 1)`` sources with
    the ``windows`` destinations; it is computed only by blocks that merge in the detail phase."""
    merged = merged_tokens(action, n, k, windows)
    plan = 0
    if action.mode is BlockMode.MERGED and action.phase is Phase.DETAIL:
        plan = batch_channels * windows * (k - 1) * windows
    return (merged if action.merge_attn else n), (merged if action.merge_mlp else n), plan


def _count_schedule(meta: _MetaModel, report: MacReport, sdtm: SDTMConfig) -> None:
    """Fill ``report``'s totals, per-step table and phases from the block counts of ``meta``."""
    (grid_h, grid_w), steps, batch = report.grid, report.steps, report.batch
    n, layers = grid_h * grid_w, len(meta.blocks)
    k = sdtm.sx * sdtm.sy
    windows = (grid_h // sdtm.sy) * (grid_w // sdtm.sx)
    outside = meta.outside_blocks(grid_h, grid_w)
    full = sum(sum(meta.block(layer, n)) for layer in range(layers)) + outside
    report.baseline_macs = full * steps
    phases: dict = defaultdict(lambda: {"block_calls": 0, "macs": 0})
    for step in range(steps):
        step_macs, attn_sum, mlp_sum, modes = outside, 0, 0, set()
        for layer in range(layers):
            action = action_for_sublayers(block_action(sdtm, step, steps, layer, layers, n, windows),
                                          meta.kinds[layer])
            attn_tokens, mlp_tokens, plan = _tokens_and_plan(action, n, k, windows, batch * meta.channels)
            macs = meta.block(layer, attn_tokens)[0] + meta.block(layer, mlp_tokens)[1] + plan
            key = action.phase.value if action.mode is BlockMode.MERGED else action.mode.value
            phases[key]["block_calls"] += 1
            phases[key]["macs"] += macs
            modes.add(key)
            report.plan_macs += plan
            step_macs += macs
            attn_sum += attn_tokens
            mlp_sum += mlp_tokens
        label = "/".join(sorted(modes))
        report.per_step.append(StepMacs(step, label, attn_sum / layers, mlp_sum / layers, full, step_macs))
        report.sdtm_macs += step_macs
    phases["outside blocks"] = {"block_calls": 0, "macs": outside * steps}
    report.phases = dict(phases)


def format_report(report: MacReport, name: str) -> str:
    grid_h, grid_w = report.grid
    lines = [
        f"{name}: {report.height}x{report.width} (VAE factor {report.vae_scale}, {grid_h}x{grid_w} = "
        f"{grid_h * grid_w} tokens), {report.text_tokens} text tokens, "
        f"{report.steps} steps, batch {report.batch}, switch step {report.switch_step}",
        f"baseline {report.baseline_macs / 1e12:10.3f} TMACs ({report.baseline_macs / report.steps / 1e12:.3f} a step)",
        f"SDTM     {report.sdtm_macs / 1e12:10.3f} TMACs (plan matmuls {report.plan_macs / 1e12:.3f})",
        f"MAC ratio {report.mac_ratio:.3f}",
        "",
        f"{'phase':16}{'block calls':>12}{'TMACs':>12}",
    ]
    for phase, values in report.phases.items():
        lines.append(f"{phase:16}{values['block_calls']:>12}{values['macs'] / 1e12:>12.3f}")
    return "\n".join(lines)


def plot_report(report: MacReport, path: str) -> None:
    """Tokens per block and MACs per step over the schedule, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.step for s in report.per_step]
    fig, (tokens_ax, macs_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    tokens_ax.plot(steps, [s.attn_tokens for s in report.per_step], label="attention")
    tokens_ax.plot(steps, [s.mlp_tokens for s in report.per_step], label="feed-forward", linestyle="--")
    tokens_ax.set_ylabel("image tokens (mean per block)")
    tokens_ax.legend()
    macs_ax.plot(steps, [s.baseline_macs / 1e12 for s in report.per_step], label="unmerged")
    macs_ax.plot(steps, [s.sdtm_macs / 1e12 for s in report.per_step], label="SDTM")
    macs_ax.set_ylabel("TMACs per step")
    macs_ax.set_xlabel("denoising step")
    macs_ax.legend()
    fig.suptitle(f"MAC ratio {report.mac_ratio:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
